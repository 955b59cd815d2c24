//! `fluxfit worker`: one loaded model that runs the jobs of a broker's pool.
//!
//! The worker advertises itself with a heartbeat (its model, budget and what that budget fits,
//! [`Advert`]), reads its pool's stream through the consumer group, runs each job with the
//! plan its own planner picks ([`crate::runner::execute`], as the server's runner), publishes
//! the job's events, records the result under the job id and acknowledges. While a job runs
//! the heartbeat also keeps the delivery claimed, so a long job is not taken over; a worker
//! that dies stops both, and the job goes to another worker after the visibility timeout.
//! A stop request (SIGTERM) lets the running job finish and be acknowledged first.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use fluxfit::pipeline::watch::{Preview, Watch};
use fluxfit::pipeline::Model;
use fluxfit::planner::choice::{choose, Asked, Choosing, Quant};
use fluxfit::planner::{Budget, Workload};

use crate::broker::{Broker, BrokerConfig, BrokerError, Delivery};
use crate::job::{ImageLimits, JobSpec, ModelInfo};
use crate::runner::{execute, Outcome, Planning};
use crate::wire::{Advert, FitKind, Fits, RunResult};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The broker; its pool is set from the model and budget.
    pub broker: BrokerConfig,
    /// Unique among the workers of a deployment (the consumer name).
    pub name: String,
    pub budget: Option<Budget>,
    pub vae_tile: Option<usize>,
    pub max_side: usize,
    pub default_steps: Option<usize>,
    pub default_guidance: Option<f32>,
    /// A preview every this many steps on the job's events; 0 for none.
    pub preview_every: usize,
    /// How often the heartbeat is renewed and a running job's claim kept (a lapsed heartbeat,
    /// three of these, means the worker is gone).
    pub heartbeat: Duration,
}

/// Events kept per job stream: previews replace nothing there, so a long job's stream is
/// capped.
const EVENTS_KEPT: usize = 200;
/// How long a finished job's events stay readable.
const EVENTS_TTL: Duration = Duration::from_secs(3600);

/// What the heartbeat reports beside the advertisement, updated by the job loop.
#[derive(Default)]
struct Live {
    /// The job running and its stream entry (kept claimed by the heartbeat).
    busy: Option<(String, String)>,
    done: u64,
    failed: u64,
    cancelled: u64,
}

pub struct Worker {
    model: Model,
    planning: Planning,
    info: ModelInfo,
    cfg: WorkerConfig,
    advert: Advert,
    live: Arc<Mutex<Live>>,
}

fn log(line: std::fmt::Arguments) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

impl Worker {
    /// Works out what `model` can serve under the budget (running its planner over each kind
    /// of job), and so its pool.
    pub fn new(model: Model, mut cfg: WorkerConfig) -> Self {
        let info = ModelInfo::of(
            &model,
            cfg.max_side,
            cfg.default_steps,
            cfg.default_guidance,
        );
        let planning = Planning::of(&model, cfg.budget, cfg.vae_tile);
        let fits = cfg.budget.map(|b| largest_fits(&planning, b, cfg.max_side));
        let pool = pool_name(&info, &planning, cfg.vae_tile);
        cfg.broker.pool = pool.clone();
        let advert = Advert {
            name: cfg.name.clone(),
            pool,
            model: info.clone(),
            device: planning.device.name.clone(),
            budget: cfg.budget.map(|b| b.bytes),
            plan: model.plan().spec(),
            fits,
            busy: None,
            done: 0,
            failed: 0,
            cancelled: 0,
            since: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            version: fluxfit::version().to_string(),
        };
        Self {
            model,
            planning,
            info,
            cfg,
            advert,
            live: Arc::default(),
        }
    }

    pub fn advert(&self) -> &Advert {
        &self.advert
    }

    /// Runs jobs until `stop` is set; then the running job finishes and is acknowledged, the
    /// heartbeat is removed, and it returns. A broker that goes away is reconnected to.
    pub fn run(mut self, stop: &AtomicBool) -> Result<(), BrokerError> {
        let mut broker = Broker::connect(self.cfg.broker.clone())?;
        let beat_stop = Arc::new(AtomicBool::new(false));
        let beat = {
            let (cfg, advert, live, every, s) = (
                self.cfg.broker.clone(),
                self.advert.clone(),
                self.live.clone(),
                self.cfg.heartbeat,
                beat_stop.clone(),
            );
            std::thread::Builder::new()
                .name("fluxfit-heartbeat".into())
                .spawn(move || heartbeat(cfg, advert, live, every, &s))
                .map_err(|e| BrokerError::Reply {
                    command: "heartbeat",
                    reply: format!("starting its thread: {e}"),
                })?
        };
        // What this worker's name held when it last stopped, first.
        match broker.reclaim_own(&self.cfg.name) {
            Ok(own) => {
                for d in own {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    self.handle(&mut broker, d);
                }
            }
            Err(e) => log(format_args!("fluxfit worker: {e}")),
        }
        while !stop.load(Ordering::SeqCst) {
            match broker.claim(&self.cfg.name, Duration::from_secs(1)) {
                Ok(Some(d)) => self.handle(&mut broker, d),
                Ok(None) => {}
                Err(e) => {
                    log(format_args!("fluxfit worker: {e}; reconnecting"));
                    match reconnect(&self.cfg.broker, stop) {
                        Some(b) => broker = b,
                        None => break,
                    }
                }
            }
        }
        beat_stop.store(true, Ordering::SeqCst);
        let _ = beat.join();
        let _ = broker.retire(&self.cfg.name);
        Ok(())
    }

    /// One delivery, to its result (or, for a failure short of the limit, back to pending).
    fn handle(&mut self, broker: &mut Broker, d: Delivery) {
        let id = d.job_id.clone();
        let max = self.cfg.broker.max_deliveries;
        // A run that recorded its result but died before acknowledging: acknowledge now.
        if matches!(broker.result(&id), Ok(Some(_))) {
            let _ = broker.complete(&d, "");
            return;
        }
        if d.deliveries > max {
            let error = format!(
                "delivered {} times and never finished: the workers running it stopped without a result (killed, or out of memory?)",
                d.deliveries - 1
            );
            self.give_up(broker, &d, error);
            return;
        }
        if let Ok(Some(why)) = broker.cancelled(&id) {
            self.finish(
                broker,
                &d,
                RunResult::Cancelled {
                    reason: why,
                    step: 0,
                    total: 0,
                    worker: self.cfg.name.clone(),
                },
            );
            return;
        }
        // The server checked the job against this pool's model: a refusal here is a version
        // mismatch or a corrupted entry, and would be refused again by every worker.
        let work = serde_json::from_str::<JobSpec>(&d.request)
            .map_err(|e| format!("the job's request is not one this worker reads: {e}"))
            .and_then(|spec| {
                let limits = ImageLimits {
                    max_side: self.info.max_side as u32 * 2,
                    max_decoded_bytes: 1 << 30,
                };
                let seed = spec.seed.unwrap_or_else(crate::random_seed);
                spec.prepare(&self.info, None, None, limits, seed)
                    .map_err(|e| e.message)
            });
        let mut work = match work {
            Ok(w) => w,
            Err(error) => {
                self.give_up(broker, &d, error);
                return;
            }
        };
        if d.reclaimed {
            log(format_args!(
                "fluxfit worker: job {id}: taken over (delivery {})",
                d.deliveries
            ));
        }
        self.live_mut().busy = Some((id.clone(), d.entry.clone()));
        let previews = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
        let watch = {
            let previews = previews.clone();
            Arc::new(Watch::new(self.cfg.preview_every, move |p: Preview| {
                if let Ok(mut v) = previews.lock() {
                    v.push(crate::runner::preview_event(&p));
                }
            }))
        };
        self.model.set_watch(Some(watch.clone()));
        let started = Instant::now();
        let name = self.cfg.name.clone();
        let mut report = |kind: &'static str, mut data: serde_json::Value| {
            if kind == "started" {
                data["worker"] = name.clone().into();
            }
            let _ = publish(broker, &id, kind, data);
            // Previews made since the last event (the model hands them out between steps).
            let ready: Vec<_> = previews
                .lock()
                .map(|mut v| v.drain(..).collect())
                .unwrap_or_default();
            for p in ready {
                let _ = publish(broker, &id, "preview", p);
            }
            if kind == "step" && matches!(broker.cancelled(&id), Ok(Some(_))) {
                watch.cancel();
            }
        };
        let outcome = execute(&mut self.model, &self.planning, &mut work, &id, &mut report);
        self.model.set_watch(None);
        self.live_mut().busy = None;
        let worker = self.cfg.name.clone();
        match outcome {
            Outcome::Done(e) => {
                let seconds = started.elapsed().as_secs_f64();
                log(format_args!(
                    "fluxfit worker: job {id}: done in {seconds:.1} s"
                ));
                self.finish(
                    broker,
                    &d,
                    RunResult::Done {
                        png: base64::engine::general_purpose::STANDARD.encode(&e.png),
                        width: e.width,
                        height: e.height,
                        seed: e.seed,
                        peak_bytes: e.peak,
                        seconds,
                        worker,
                    },
                );
            }
            Outcome::Cancelled { step, total } => {
                let reason = broker
                    .cancelled(&id)
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| "cancelled".into());
                self.finish(
                    broker,
                    &d,
                    RunResult::Cancelled {
                        reason,
                        step,
                        total,
                        worker,
                    },
                );
            }
            Outcome::Failed(error) => {
                log(format_args!(
                    "fluxfit worker: job {id}: failed (delivery {} of {max}): {error}",
                    d.deliveries
                ));
                self.live_mut().failed += 1;
                match broker.fail(&d, &error) {
                    Ok(true) => self.announce(broker, &d, RunResult::Failed { error, worker }),
                    // Left pending: retried after the visibility timeout.
                    Ok(false) => {
                        let _ = publish(
                            broker,
                            &id,
                            "retry",
                            serde_json::json!({ "error": error, "delivery": d.deliveries,
                                                "of": max }),
                        );
                    }
                    Err(e) => log(format_args!("fluxfit worker: job {id}: {e}")),
                }
            }
        }
    }

    fn live_mut(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A job no worker could run: to the dead letters now, with its error.
    fn give_up(&self, broker: &mut Broker, d: &Delivery, error: String) {
        log(format_args!("fluxfit worker: job {}: {error}", d.job_id));
        self.live_mut().failed += 1;
        if let Err(e) = broker.dead_letter(d, &error) {
            log(format_args!("fluxfit worker: job {}: {e}", d.job_id));
            return;
        }
        self.announce(
            broker,
            d,
            RunResult::Failed {
                error,
                worker: self.cfg.name.clone(),
            },
        );
    }

    /// Records the result and acknowledges (retrying while the broker is away), then tells
    /// the server.
    fn finish(&self, broker: &mut Broker, d: &Delivery, result: RunResult) {
        let text = serde_json::to_string(&result).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match broker.complete(d, &text) {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    log(format_args!(
                        "fluxfit worker: job {}: recording its result: {e}; retrying",
                        d.job_id
                    ));
                    std::thread::sleep(Duration::from_secs(1));
                    if let Ok(b) = Broker::connect(self.cfg.broker.clone()) {
                        *broker = b;
                    }
                }
                Err(e) => {
                    // Left pending: another worker will run it again after the visibility
                    // timeout.
                    log(format_args!(
                        "fluxfit worker: job {}: could not record its result: {e}",
                        d.job_id
                    ));
                    return;
                }
            }
        }
        {
            let mut live = self.live_mut();
            match result {
                RunResult::Done { .. } => live.done += 1,
                RunResult::Cancelled { .. } => live.cancelled += 1,
                RunResult::Failed { .. } => live.failed += 1,
            }
        }
        self.announce(broker, d, result);
    }

    /// The job's final event (the server then reads the recorded result), and its events
    /// set to lapse.
    fn announce(&self, broker: &mut Broker, d: &Delivery, result: RunResult) {
        let kind = match result {
            RunResult::Done { .. } => "done",
            RunResult::Failed { .. } => "failed",
            RunResult::Cancelled { .. } => "cancelled",
        };
        if let RunResult::Failed { error, worker } = &result {
            // The dead letter's result, for the server (a done job recorded its own).
            let failed = RunResult::Failed {
                error: error.clone(),
                worker: worker.clone(),
            };
            let _ = broker.record(
                &d.job_id,
                &serde_json::to_string(&failed).unwrap_or_default(),
            );
        }
        let _ = publish(broker, &d.job_id, kind, serde_json::json!({}));
        let _ = broker.expire_events(&d.job_id, EVENTS_TTL);
    }
}

/// Appends `{kind, data}` to the job's event stream.
fn publish(
    broker: &mut Broker,
    job: &str,
    kind: &str,
    data: serde_json::Value,
) -> Result<String, BrokerError> {
    let event = serde_json::json!({ "kind": kind, "data": data }).to_string();
    broker.publish_event(job, &event, EVENTS_KEPT)
}

/// Connects again, once a second, until it works or `stop` is set.
fn reconnect(cfg: &BrokerConfig, stop: &AtomicBool) -> Option<Broker> {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        match Broker::connect(cfg.clone()) {
            Ok(b) => return Some(b),
            Err(e) => log(format_args!("fluxfit worker: {e}; retrying")),
        }
    }
}

/// Renews the advertisement (with the job running and the counters) every `every`, keeps the
/// running job's delivery claimed, until `stop`; on its own connection, so a long step does
/// not delay it.
fn heartbeat(
    cfg: BrokerConfig,
    mut advert: Advert,
    live: Arc<Mutex<Live>>,
    every: Duration,
    stop: &AtomicBool,
) {
    let mut broker: Option<Broker> = None;
    let mut lost: Option<String> = None;
    while !stop.load(Ordering::SeqCst) {
        if broker.is_none() {
            broker = Broker::connect(cfg.clone()).ok();
        }
        if let Some(b) = broker.as_mut() {
            let busy = {
                let l = live.lock().unwrap_or_else(|p| p.into_inner());
                advert.busy = l.busy.as_ref().map(|(job, _)| job.clone());
                advert.done = l.done;
                advert.failed = l.failed;
                advert.cancelled = l.cancelled;
                l.busy.clone()
            };
            let text = serde_json::to_string(&advert).unwrap_or_default();
            let mut ok = b.heartbeat(&advert.name, &text, every * 3).is_ok();
            if let Some((job, entry)) = busy {
                match b.touch(&advert.name, &entry) {
                    Ok(true) => {}
                    // Taken over (this worker stalled past the visibility timeout): the first
                    // result stored is kept, whichever finishes first.
                    Ok(false) if lost.as_ref() != Some(&job) => {
                        log(format_args!(
                            "fluxfit worker: job {job}: another worker took it over"
                        ));
                        lost = Some(job);
                    }
                    Ok(false) => {}
                    Err(_) => ok = false,
                }
            }
            if !ok {
                broker = None;
            }
        }
        let until = Instant::now() + every;
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The largest job of each kind the planner fits `budget`, by bisection over square sides
/// (a plan's peak grows with the image's tokens).
fn largest_fits(planning: &Planning, budget: Budget, max_side: usize) -> Fits {
    use fluxfit::pipeline::request::MIN_SIDE;
    let fits = |side: usize, kind: FitKind| {
        let request = Workload::asked(
            &planning.spec,
            Asked {
                width: Some(side),
                height: Some(side),
                steps: Some(1),
                t5_tokens: None,
                image_input: kind != FitKind::Text,
                cond_size: (kind == FitKind::Edit).then_some((side, side)),
                redux_images: 0,
            },
        );
        choose(
            &planning.spec,
            &Choosing {
                request,
                device: planning.device.clone(),
                budget,
                dtype: planning.dtype,
                attn_chunk: planning.attn_chunk,
                quant: Quant::Stored,
            },
        )
        .is_ok()
    };
    let largest = |kind: FitKind| {
        let (mut lo, mut hi) = (MIN_SIDE / 16, max_side.max(MIN_SIDE) / 16);
        if !fits(lo * 16, kind) {
            return 0;
        }
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if fits(mid * 16, kind) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let t = lo * lo;
        if kind == FitKind::Edit {
            2 * t
        } else {
            t
        }
    };
    let kontext = planning.spec.variant == fluxfit::variant::Variant::DevKontext;
    Fits {
        text: if kontext { 0 } else { largest(FitKind::Text) },
        image: if kontext { 0 } else { largest(FitKind::Image) },
        edit: if kontext { largest(FitKind::Edit) } else { 0 },
    }
}

/// The pool: the model's name and a hash of everything that decides what a worker makes and
/// fits (model, LoRAs, defaults, device, budget, precision), so that any worker of a pool
/// runs any of its jobs the same.
fn pool_name(info: &ModelInfo, planning: &Planning, vae_tile: Option<usize>) -> String {
    let key = serde_json::json!({
        "model": info,
        "device": planning.device.name,
        "budget": planning.budget.map(|b| b.bytes),
        "dtype": format!("{:?}", planning.dtype),
        "attn_chunk": planning.attn_chunk,
        "vae_tile": vae_tile,
        "version": fluxfit::version(),
    })
    .to_string();
    // FNV-1a: stable across builds and machines (std's hasher is not).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let name: String = info
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("{name}-{:012x}", h >> 16)
}

/// Sets the returned flag on the first SIGTERM or Ctrl-C; a second one exits at once.
pub fn stop_on_signal() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let _ = std::thread::Builder::new()
        .name("fluxfit-signals".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(crate::wait_for_signal());
            s.store(true, Ordering::SeqCst);
            log(format_args!(
                "fluxfit worker: stopping: the running job finishes and is acknowledged first (again to stop at once)"
            ));
            rt.block_on(crate::wait_for_signal());
            std::process::exit(130);
        });
    stop
}
