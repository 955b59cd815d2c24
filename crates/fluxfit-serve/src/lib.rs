//! `fluxfit serve`: one loaded model behind an HTTP API and a web UI.
//!
//! - [`job`]: what a client asks for, checked and decoded at submission;
//! - [`jobs`]: the bounded queue, each job's status and event log;
//! - [`runner`]: the one thread that owns the model and computes, a job at a time;
//! - [`http`]: routes (native jobs with SSE progress, OpenAI's images API, plan, gallery,
//!   metrics, the UI);
//! - [`gallery`], [`metrics`], [`names`]: the output folder, counters, safe names.
//!
//! The library does what `fluxfit generate`, `fill` and `edit` do, with the same plans,
//! images and metadata; the CLI only parses flags and loads the model.

pub mod broker;
pub mod conn;
pub mod error;
pub mod gallery;
pub mod http;
pub mod job;
pub mod jobs;
pub mod metrics;
pub mod names;
pub mod remote;
pub mod runner;
pub mod wire;
pub mod worker;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fluxfit::pipeline::Model;
use fluxfit::planner::Budget;

use crate::job::{ImageLimits, ModelInfo};
use crate::jobs::Jobs;
use crate::metrics::Metrics;
use crate::runner::{Planning, Runner};

/// How a server runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Bearer token the API wants; needed (or `insecure`) to listen beyond loopback.
    pub api_key: Option<String>,
    pub insecure: bool,
    /// Jobs waiting beyond the running one; more are answered 429.
    pub queue: usize,
    pub output_dir: PathBuf,
    /// The device budget the planner fits each job into (`--vram`); none keeps the model's
    /// plan.
    pub budget: Option<Budget>,
    pub vae_tile: Option<usize>,
    /// Largest request body (uploads included).
    pub max_upload: usize,
    /// Largest image side accepted, for outputs and uploads.
    pub max_side: usize,
    /// A preview every this many steps (and after the last); 0 for none.
    pub preview_every: usize,
    /// On shutdown, how long the running job may take to finish before it is cancelled.
    pub grace: Duration,
    /// How long a client may take to send a request's line and headers, and its body.
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// Steps and guidance of jobs that give none [default: the model variant's].
    pub default_steps: Option<usize>,
    pub default_guidance: Option<f32>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7860)),
            api_key: None,
            insecure: false,
            queue: 8,
            output_dir: PathBuf::from("outputs"),
            budget: None,
            vae_tile: None,
            max_upload: 32 << 20,
            max_side: fluxfit::pipeline::request::MAX_SIDE,
            preview_every: 1,
            grace: Duration::from_secs(60),
            header_timeout: conn::HEADER_TIMEOUT,
            body_timeout: conn::BODY_TIMEOUT,
            default_steps: None,
            default_guidance: None,
        }
    }
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("--listen {0}: not a loopback address, and no --api-key was given; give a key, or --insecure if the network is trusted")]
    Exposed(SocketAddr),
    #[error("--listen {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("--output-dir {dir}: {error}")]
    Output { dir: PathBuf, error: String },
    #[error("{0}")]
    Other(String),
}

/// A running server: HTTP on its own threads, the runner on another.
pub struct Server {
    addr: SocketAddr,
    runtime: tokio::runtime::Runtime,
    stop_http: Option<tokio::sync::oneshot::Sender<()>>,
    http: Option<tokio::task::JoinHandle<()>>,
    runner: Option<std::thread::JoinHandle<()>>,
    /// Behind a broker: the watcher and collector.
    remote: Option<Arc<remote::Remote>>,
    jobs: Arc<Jobs>,
    grace: Duration,
}

/// Who runs a server's jobs, before the server starts.
pub enum Runs {
    /// The server's own model.
    Model(Box<Model>),
    /// Workers behind a broker (`--broker`): the server loads no model.
    Broker(broker::BrokerConfig),
}

impl Server {
    /// Binds, starts the runner with `model`, and serves until [`Server::shutdown`].
    pub fn start(model: Model, config: Config) -> Result<Self, ServeError> {
        Self::start_with(Runs::Model(Box::new(model)), config)
    }

    /// Binds, starts what runs the jobs (the runner with a model, or the broker's watcher
    /// and collector), and serves until [`Server::shutdown`].
    pub fn start_with(runs: Runs, config: Config) -> Result<Self, ServeError> {
        if let Some(k) = &config.api_key {
            if k.is_empty() || k.trim() != k {
                return Err(ServeError::Other(
                    "--api-key: empty, or with spaces around it that no client would send".into(),
                ));
            }
        }
        if !config.listen.ip().is_loopback() && config.api_key.is_none() && !config.insecure {
            return Err(ServeError::Exposed(config.listen));
        }
        let out = &config.output_dir;
        std::fs::create_dir_all(out).map_err(|e| ServeError::Output {
            dir: out.clone(),
            error: e.to_string(),
        })?;
        let probe = out.join(format!(".fluxfit-write-test-{}", std::process::id()));
        std::fs::write(&probe, b"").map_err(|e| ServeError::Output {
            dir: out.clone(),
            error: format!("not writable: {e}"),
        })?;
        let _ = std::fs::remove_file(&probe);

        let metrics = Arc::new(Metrics::default());
        let jobs = Arc::new(Jobs::new(config.queue, metrics.clone()));
        let (backend, runner) = match runs {
            Runs::Model(model) => {
                let model = *model;
                let info = ModelInfo::of(
                    &model,
                    config.max_side,
                    config.default_steps,
                    config.default_guidance,
                );
                let planning = Planning::of(&model, config.budget, config.vae_tile);
                let backend = http::Backend::Local(Box::new(http::LocalModel {
                    info,
                    planning: planning.clone(),
                    plan_spec: model.plan().spec(),
                }));
                let runner = Runner {
                    model,
                    jobs: jobs.clone(),
                    metrics: metrics.clone(),
                    planning,
                    output_dir: config.output_dir.clone(),
                    preview_every: config.preview_every,
                };
                (backend, Some(runner))
            }
            Runs::Broker(cfg) => {
                let remote = remote::Remote::start(
                    cfg,
                    jobs.clone(),
                    metrics.clone(),
                    config.output_dir.clone(),
                )
                .map_err(|e| ServeError::Other(format!("--broker: {e}")))?;
                (http::Backend::Broker(remote), None)
            }
        };
        let app = Arc::new(http::App {
            jobs: jobs.clone(),
            metrics: metrics.clone(),
            backend,
            output_dir: config.output_dir.clone(),
            api_key: config.api_key.clone(),
            limits: ImageLimits {
                max_side: config.max_side as u32 * 2,
                max_decoded_bytes: 1 << 30,
            },
            preparing: tokio::sync::Semaphore::new(2),
        });
        let remote = match &app.backend {
            http::Backend::Broker(r) => Some(r.clone()),
            http::Backend::Local(_) => None,
        };

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("fluxfit-http")
            .build()
            .map_err(|e| ServeError::Other(format!("starting the HTTP runtime: {e}")))?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(config.listen))
            .map_err(|error| ServeError::Bind {
                addr: config.listen,
                error,
            })?;
        let addr = listener.local_addr().map_err(|error| ServeError::Bind {
            addr: config.listen,
            error,
        })?;
        let runner = match runner {
            Some(runner) => Some(
                std::thread::Builder::new()
                    .name("fluxfit-runner".into())
                    .spawn(move || runner.run())
                    .map_err(|e| ServeError::Other(format!("starting the runner: {e}")))?,
            ),
            None => None,
        };
        let (stop_http, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = http::router(app, config.max_upload, config.body_timeout);
        let header_timeout = config.header_timeout;
        let http = runtime.spawn(async move {
            conn::serve(listener, router, header_timeout, async move {
                let _ = stopped.await;
            })
            .await;
        });
        Ok(Self {
            addr,
            runtime,
            stop_http: Some(stop_http),
            http: Some(http),
            runner,
            remote,
            jobs,
            grace: config.grace,
        })
    }

    /// The address it listens on (the port chosen when 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until SIGTERM or Ctrl-C, then shuts down.
    pub fn run_until_signal(self) {
        self.runtime.block_on(wait_for_signal());
        let what = if self.remote.is_some() {
            "jobs on the workers go on there; their results are collected for up to"
        } else {
            "the running one finishes (or is cancelled after"
        };
        let _ = writeln!(
            std::io::stderr(),
            "stopping: no new jobs; {what} {}s{}",
            self.grace.as_secs(),
            if self.remote.is_some() { "" } else { ")" }
        );
        self.shutdown();
    }

    /// Stops taking jobs, cancels the queued ones, lets the running one finish (cancelling it
    /// after the grace period), then stops HTTP once every response is sent. Every image
    /// finished before is on disk whole.
    pub fn shutdown(mut self) {
        let running = self.jobs.stop();
        if let Some(remote) = self.remote.take() {
            // Jobs on workers go on there; their results are collected while the grace
            // period lasts, and stay in the broker after it.
            let deadline = Instant::now() + self.grace;
            while self.jobs.remote_depth() != (0, 0) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            remote.stop();
        }
        if let Some(runner) = self.runner.take() {
            let deadline = Instant::now() + self.grace;
            while !runner.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if !runner.is_finished() {
                if let Some(job) = &running {
                    self.jobs.cancel(job, "the server is stopping");
                }
                // A cancelled job stops within a step; one stuck inside a step is left to the
                // process's exit rather than waited for without end.
                let deadline = Instant::now() + Duration::from_secs(10);
                while !runner.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if runner.is_finished() {
                let _ = runner.join();
            } else {
                let _ = writeln!(std::io::stderr(), "fluxfit serve: the running job did not stop within 10 s of its cancellation; exiting without it");
            }
        }
        if let Some(tx) = self.stop_http.take() {
            let _ = tx.send(());
        }
        if let Some(http) = self.http.take() {
            let _ = self
                .runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), http).await });
        }
    }
}

pub(crate) async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

pub use fluxfit::noise::random_seed;
