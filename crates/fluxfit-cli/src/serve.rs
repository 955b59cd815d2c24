//! `fluxfit serve`: loads the model once and serves the HTTP API and web UI
//! (crates/fluxfit-serve) until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use fluxfit::planner::choice::{gpu_index, Quant};
use fluxfit::planner::{Budget, DeviceProfile};
use fluxfit_serve::{Config, Server};

use crate::run_args::{Planning, RunArgs};

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
    let model = args.run.load_planned(Planning {
        width: None,
        height: None,
        image_input: false,
        cond_size: None,
        redux: None,
        redux_images: 0,
        quant: Quant::Stored,
        attn_chunk: Some(fluxfit::model::attention::DEFAULT_CHUNK),
    })?;
    let budget = match &args.run.vram {
        Some(v) => Budget::resolve(
            Some(v),
            &DeviceProfile::for_device(model.device()),
            gpu_index(model.device()),
        )?,
        None => None,
    };
    let config = Config {
        listen: args.listen,
        api_key: args.api_key.filter(|k| !k.is_empty()),
        insecure: args.insecure,
        queue: args.queue,
        output_dir: args.output_dir,
        budget,
        vae_tile: args.run.vae_tile,
        max_upload: args.max_upload_mib << 20,
        max_side: args.max_side,
        preview_every: args.preview_every,
        grace: Duration::from_secs(args.grace),
        default_steps: args.run.steps,
        default_guidance: args.run.guidance,
        ..Config::default()
    };
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
