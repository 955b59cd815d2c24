//! `fluxfit worker`: loads the model once and runs the jobs a `fluxfit serve --broker` puts on
//! the broker, until SIGTERM (which lets the running job finish first).

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use fluxfit_serve::broker::{redact, Broker, BrokerConfig};
use fluxfit_serve::worker::{stop_on_signal, Worker, WorkerConfig};

use crate::run_args::RunArgs;

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The broker the server puts jobs on (redis://[user:password@]host:port[/db], rediss://
    /// for TLS, redis+unix:///path).
    #[arg(
        long,
        env = "FLUXFIT_BROKER",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub broker: String,
    /// Prefix of the broker's keys (the server's --namespace).
    #[arg(long, default_value = "fluxfit")]
    pub namespace: String,
    /// This worker's name, unique in the deployment [default: HOST-PID].
    #[arg(long)]
    pub name: Option<String>,
    /// Seconds a job may go without this worker's heartbeat before another worker takes it
    /// over (the heartbeat keeps a running job's claim meanwhile).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub visibility: u64,
    /// Runs of a job without a result after which it goes to the dead letters.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub max_deliveries: u64,
    /// Largest image side in pixels this worker takes.
    #[arg(long, default_value_t = fluxfit::pipeline::request::MAX_SIDE)]
    pub max_side: usize,
    /// A latent preview every N steps on the job's events (0: none).
    #[arg(long, default_value_t = 1)]
    pub preview_every: usize,
    #[command(flatten)]
    pub run: RunArgs,
}

pub fn run(args: WorkerArgs) -> Result<()> {
    if args.run.seed.is_some() {
        bail!("--seed: each job has its own seed (random unless the request gives one)");
    }
    let name = match &args.name {
        Some(n) if n.is_empty() || n.len() > 128 || n.contains(char::is_whitespace) => {
            bail!("--name `{n}`: 1 to 128 characters, no spaces")
        }
        Some(n) => n.clone(),
        None => format!(
            "{}-{}",
            fluxfit_serve::names::hostname(),
            std::process::id()
        ),
    };
    let visibility = Duration::from_secs(args.visibility);
    let broker = BrokerConfig {
        namespace: args.namespace.clone(),
        visibility,
        max_deliveries: args.max_deliveries,
        ..BrokerConfig::new(args.broker.clone())
    };
    // An unreachable broker or a wrong password is said before the model loads (minutes, for
    // a large one).
    Broker::connect(broker.clone())?;
    let (model, budget) = args.run.load_for_jobs()?;
    let worker = Worker::new(
        model,
        WorkerConfig {
            broker,
            name: name.clone(),
            budget,
            vae_tile: args.run.vae_tile,
            max_side: args.max_side,
            default_steps: args.run.steps,
            default_guidance: args.run.guidance,
            preview_every: args.preview_every,
            // Well inside the visibility timeout, so a running job's claim never lapses.
            heartbeat: (visibility / 4).clamp(Duration::from_millis(250), Duration::from_secs(3)),
        },
    );
    let a = worker.advert();
    let fits = match a.fits {
        Some(f) => format!(
            "fits up to {} / {} / {} image tokens (text / image / edit)",
            f.text, f.image, f.edit
        ),
        None => "no budget: any size".into(),
    };
    errln!(
        "fluxfit worker {name}: {} (plan {}, {fits}) on pool {} of {}",
        a.model.name,
        a.plan,
        a.pool,
        redact(&args.broker)
    );
    let stop = stop_on_signal();
    worker.run(&stop)?;
    errln!("fluxfit worker {name}: stopped");
    Ok(())
}
