//! `fluxfit serve`: loads the model once and serves the HTTP API and web UI
//! (crates/fluxfit-serve) until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use fluxfit::planner::Budget;
use fluxfit_serve::broker::{redact, BrokerConfig};
use fluxfit_serve::{Config, Runs, Server};

use crate::run_args::RunArgs;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address and port to listen on. Anything but loopback needs --api-key (or --insecure).
    #[arg(long, default_value = "127.0.0.1:7860")]
    pub listen: SocketAddr,
    /// Bearer token the API wants (`Authorization: Bearer KEY`); also read from
    /// FLUXFIT_API_KEY.
    #[arg(long, env = "FLUXFIT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Listen beyond loopback without an API key (a trusted network only).
    #[arg(long)]
    pub insecure: bool,
    /// Jobs waiting beyond the running one; more are answered 429 with Retry-After.
    #[arg(long, default_value_t = 8)]
    pub queue: usize,
    /// Where images are written (never replacing a file); the gallery lists it.
    #[arg(long, default_value = "outputs")]
    pub output_dir: PathBuf,
    /// Largest request body in MiB (uploaded images included).
    #[arg(long, default_value_t = 32)]
    pub max_upload_mib: usize,
    /// Largest image side in pixels (outputs; uploads may be twice this and are downscaled).
    #[arg(long, default_value_t = fluxfit::pipeline::request::MAX_SIDE)]
    pub max_side: usize,
    /// A latent preview every N steps on the event stream (0: none).
    #[arg(long, default_value_t = 1)]
    pub preview_every: usize,
    /// On SIGTERM, seconds the running job may take to finish before it is cancelled.
    #[arg(long, default_value_t = 60)]
    pub grace: u64,
    /// Put jobs on this broker for `fluxfit worker`s instead of running them here: the
    /// server loads no model (redis://[user:password@]host:port[/db], rediss:// for TLS,
    /// redis+unix:///path). --queue then bounds the jobs in flight on the workers.
    #[arg(
        long,
        env = "FLUXFIT_BROKER",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub broker: Option<String>,
    /// Prefix of the broker's keys: deployments sharing one Redis each take their own.
    #[arg(long, default_value = "fluxfit", requires = "broker")]
    pub namespace: String,
    #[command(flatten)]
    pub run: RunArgs,
}

pub fn run(args: ServeArgs) -> Result<()> {
    if args.run.seed.is_some() {
        bail!("--seed: each job has its own seed (random unless the request gives one)");
    }
    if !args.listen.ip().is_loopback() && args.api_key.is_none() && !args.insecure {
        // Said before the model loads (the server checks again).
        bail!(
            "--listen {}: not a loopback address, and no --api-key was given; give a key, or --insecure if the network is trusted",
            args.listen
        );
    }
    if args.queue == 0 {
        bail!("--queue 0: the queue must hold at least one job");
    }
    if let Some(url) = &args.broker {
        return serve_broker(&args, url);
    }
    let (model, budget) = args.run.load_for_jobs()?;
    let config = config(&args, budget);
    let name = model.name.clone();
    let plan = model.plan().spec();
    let server = Server::start(model, config)?;
    errln!(
        "fluxfit serve: {name} (plan {plan}) on http://{} — the web UI is at that address, the API under /v1",
        server.addr()
    );
    server.run_until_signal();
    Ok(())
}

/// The server's settings from its flags.
fn config(args: &ServeArgs, budget: Option<Budget>) -> Config {
    Config {
        listen: args.listen,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        insecure: args.insecure,
        queue: args.queue,
        output_dir: args.output_dir.clone(),
        budget,
        vae_tile: args.run.vae_tile,
        max_upload: args.max_upload_mib << 20,
        max_side: args.max_side,
        preview_every: args.preview_every,
        grace: Duration::from_secs(args.grace),
        default_steps: args.run.steps,
        default_guidance: args.run.guidance,
        ..Config::default()
    }
}

/// `serve --broker`: no model here; jobs go to the workers.
fn serve_broker(args: &ServeArgs, url: &str) -> Result<()> {
    let m = &args.run.model;
    let model_flags = m.model != "tiny"
        || m.flow.is_some()
        || m.vae.is_some()
        || m.t5.is_some()
        || m.clip.is_some()
        || !m.lora.is_empty()
        || args.run.vram.is_some()
        || args.run.plan.is_some()
        || args.run.steps.is_some()
        || args.run.guidance.is_some();
    if model_flags {
        bail!("--broker: this server runs no model, its workers do: give the model flags (--model, --flow, --lora, --vram, --steps, …) to `fluxfit worker`");
    }
    let broker = BrokerConfig {
        namespace: args.namespace.clone(),
        ..BrokerConfig::new(url)
    };
    let server = Server::start_with(Runs::Broker(broker), config(args, None))?;
    errln!(
        "fluxfit serve: jobs go to the workers of {} on http://{} — the web UI is at that address, the API under /v1",
        redact(url),
        server.addr()
    );
    server.run_until_signal();
    Ok(())
}
