//! Helpers shared by the CLI's test binaries: running `fluxfit`, its outcome, fixtures, PNGs.
#![allow(dead_code)]

use std::io::Write;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn fluxfit(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fluxfit"));
    cmd.current_dir(dir)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run fluxfit");
    {
        let mut pipe = child.stdin.take().expect("stdin");
        if let Some(text) = stdin {
            pipe.write_all(text.as_bytes()).expect("write stdin");
        }
    }
    child.wait_with_output().expect("fluxfit output")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `fluxfit ARGS` (subcommand included) with `stdin` and expects success.
#[track_caller]
pub fn succeeds_with(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let o = fluxfit(dir, args, stdin);
    assert!(
        o.status.success(),
        "fluxfit {args:?} failed:\n{}",
        stderr(&o)
    );
    o
}

/// (width, height, RGB bytes) of a PNG.
pub fn pixels(path: &Path) -> (u32, u32, Vec<u8>) {
    let file = std::fs::File::open(path).expect("png");
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Runs `fluxfit ARGS` (subcommand included) and expects success.
#[track_caller]
pub fn succeeds(dir: &Path, args: &[&str]) -> Output {
    succeeds_with(dir, args, None)
}

/// Runs `fluxfit ARGS` (subcommand included), expects a clean failure and returns stderr,
/// which must name every one of `names`.
#[track_caller]
pub fn command_fails(dir: &Path, args: &[&str], names: &[&str]) -> String {
    let o = fluxfit(dir, args, None);
    let err = stderr(&o);
    assert!(!o.status.success(), "fluxfit {args:?} succeeded:\n{err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "fluxfit {args:?} panicked:\n{err}"
    );
    assert!(
        err.contains("error"),
        "fluxfit {args:?}: no error line:\n{err}"
    );
    for name in names {
        assert!(
            err.contains(name),
            "fluxfit {args:?}: stderr does not name `{name}`:\n{err}"
        );
    }
    err
}

/// The tiny dev flow model (BFL layout).
pub fn bfl_flow() -> PathBuf {
    fixtures().join("tiny-bfl/flux1-tiny-dev.safetensors")
}

/// `--vae`, `--t5`, `--clip` of the tiny fixtures (BFL autoencoder, diffusers text encoders).
pub fn parts() -> Vec<String> {
    let f = fixtures();
    [
        ("--vae", f.join("tiny-bfl/ae.safetensors")),
        ("--t5", f.join("tiny-diffusers/text_encoder_2")),
        ("--clip", f.join("tiny-diffusers/text_encoder")),
    ]
    .into_iter()
    .flat_map(|(flag, p)| [flag.to_string(), p.display().to_string()])
    .collect()
}

#[path = "../../../fluxfit-serve/tests/http_client/mod.rs"]
mod http_client;
#[allow(unused_imports)]
pub use http_client::{agent, text};

/// POSTs JSON; the status and the JSON answer.
pub fn post(url: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let mut r = agent().post(url).send_json(body).unwrap();
    (r.status().as_u16(), r.body_mut().read_json().unwrap())
}

/// The JSON answer of a GET.
pub fn get(url: &str) -> serde_json::Value {
    agent()
        .get(url)
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap()
}

/// A `fluxfit` process whose stderr is kept (and read on, so it never blocks).
pub struct Proc {
    child: Child,
    log: Arc<Mutex<String>>,
    lines: Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn start(dir: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fluxfit"))
            .current_dir(dir)
            .args(args)
            .env("HF_HUB_OFFLINE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run fluxfit");
        let err = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = channel();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = tx.send(line);
            }
        });
        Self { child, log, lines }
    }

    /// The first line of its stderr that contains `what`.
    pub fn wait_for(&self, what: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line.contains(what) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "no `{what}` from fluxfit; its stderr:\n{}",
                    self.log.lock().unwrap()
                ),
            }
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                t.elapsed() < limit,
                "the process did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `fluxfit serve --listen 127.0.0.1:0 ARGS`, once it listens, and its base URL.
pub fn serve(dir: &Path, args: &[&str]) -> (Proc, String) {
    let mut all = vec!["serve", "--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let p = Proc::start(dir, &all);
    let line = p.wait_for("on http://");
    let base = format!(
        "http://{}",
        line.split("on http://")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
    );
    (p, base)
}
