//! A `redis-server` of a test's own, on a Unix socket in a temporary folder (no port to race
//! for between tests), with append-only persistence there. Shared by the broker tests and
//! `fluxfit-cli`'s worker tests.
//!
//! Without `redis-server` on the PATH a test is skipped, unless `FLUXFIT_REQUIRE_REDIS=1` (as
//! CI sets), where it fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fluxfit_serve::broker::BrokerConfig;

pub struct Redis {
    child: Child,
    pub socket: PathBuf,
}

impl Redis {
    /// A redis-server on a Unix socket in `dir` (no port to race for between tests), with
    /// append-only persistence there, or None where there is no redis-server.
    pub fn start(dir: &Path) -> Option<Self> {
        Self::start_with(dir, &[])
    }

    /// The same with more `redis-server` arguments (paths in them relative to `dir`).
    pub fn start_with(dir: &Path, extra: &[&str]) -> Option<Self> {
        let socket = dir.join("redis.sock");
        let child = Command::new("redis-server")
            .current_dir(dir)
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    std::env::var("FLUXFIT_REQUIRE_REDIS").as_deref() != Ok("1"),
                    "redis-server is required (FLUXFIT_REQUIRE_REDIS=1) but cannot start: {e}"
                );
                eprintln!("no redis-server here ({e}): skipped");
                return None;
            }
        };
        let r = Self { child, socket };
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&r.socket).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(r)
    }

    pub fn cfg(&self, visibility_ms: u64) -> BrokerConfig {
        BrokerConfig {
            visibility: Duration::from_millis(visibility_ms),
            max_deliveries: 3,
            ..BrokerConfig::new(format!("redis+unix://{}", self.socket.display()))
        }
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis of its own in a new temporary folder (None: skipped, see the module doc).
pub fn fresh_redis() -> Option<(tempfile::TempDir, Redis)> {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path())?;
    Some((dir, redis))
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Redis {
    /// The URL clients connect with.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }
}
