//! `fluxfit serve --broker`: the server side of remote execution. Jobs are checked and routed
//! here, put on a pool's stream, and followed: each job's events and result come back through
//! the broker into the same [`Job`] a local run fills, so the SSE stream, the gallery, the
//! cancellation and the OpenAI endpoints do not know who ran it.
//!
//! - routing ([`Remote::submit`]): each live worker advertises its model, budget and what
//!   that budget fits ([`Advert`]); a job goes to the least loaded pool whose model runs its
//!   mode and whose budget fits its size, and is refused with every pool's reason when none
//!   does;
//! - a watcher thread reads the heartbeats and the pools' backlogs once a second;
//! - a collector thread reads the events of the jobs in flight, passes cancellations on, and
//!   on a job's final event writes its PNG into the output folder.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use base64::Engine as _;

use crate::broker::{Broker, BrokerConfig, BrokerError};
use crate::error::ApiError;
use crate::http::Submitted;
use crate::job::ImageLimits;
use crate::jobs::{Job, Jobs, Status};
use crate::metrics::Metrics;
use crate::runner::{finish_done, finish_failed, save_png};
use crate::wire::{job_payload, Advert, RunResult};

/// How long a cancellation request waits for the worker that will be handed the job.
const CANCEL_TTL: Duration = Duration::from_secs(24 * 3600);
/// A job with no event for this long has its result looked up directly (its final event may
/// have been lost with a broker restart).
const QUIET: Duration = Duration::from_secs(5);

/// What the watcher last saw.
#[derive(Default)]
struct Seen {
    /// Every worker seen since the server started, and whether its heartbeat is live.
    workers: BTreeMap<String, (Advert, bool)>,
    /// Per pool: (entries not handed out yet, entries handed out and not acknowledged).
    backlog: HashMap<String, (u64, u64)>,
    /// Deployment-wide: (deliveries taken over, jobs dead-lettered).
    counters: (u64, u64),
    /// Whether the last look at the broker worked.
    reachable: bool,
}

pub struct Remote {
    cfg: BrokerConfig,
    /// This server's tag on its job records: its machine and output folder, so that a
    /// restarted server adopts its own jobs and no other server's.
    tag: String,
    seen: RwLock<Seen>,
    /// The connection jobs are submitted on.
    submitter: Mutex<Option<Broker>>,
    track: Mutex<Sender<Arc<Job>>>,
    stop: AtomicBool,
}

fn log(line: std::fmt::Arguments) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

impl Remote {
    /// Connects (an unreachable broker is an error now, not at the first job), then starts the
    /// watcher and the collector.
    pub fn start(
        cfg: BrokerConfig,
        jobs: Arc<Jobs>,
        metrics: Arc<Metrics>,
        output_dir: PathBuf,
    ) -> Result<Arc<Self>, BrokerError> {
        let mut submitter = Broker::connect(cfg.clone())?;
        let (tx, rx) = channel();
        let folder = std::fs::canonicalize(&output_dir).unwrap_or_else(|_| output_dir.clone());
        let tag = format!("{}:{}", crate::names::hostname(), folder.display());
        // Jobs this server put on the broker before it stopped, not collected yet.
        let mut adopted = Vec::new();
        for (id, record) in submitter.records()? {
            let Ok(r) = serde_json::from_str::<Record>(&record) else {
                continue;
            };
            if r.server != tag {
                continue;
            }
            if let Some(job) = jobs.adopt(&id, r.mode, r.params, r.created, r.steps) {
                adopted.push(job);
            }
        }
        if !adopted.is_empty() {
            log(format_args!(
                "fluxfit serve: following {} job(s) this server put on the broker before it restarted",
                adopted.len()
            ));
        }
        for job in adopted {
            let _ = tx.send(job);
        }
        let remote = Arc::new(Self {
            tag,
            cfg: cfg.clone(),
            seen: RwLock::default(),
            submitter: Mutex::new(Some(submitter)),
            track: Mutex::new(tx),
            stop: AtomicBool::new(false),
        });
        let mut watching = None;
        remote.watch_once(&mut watching);
        let r = remote.clone();
        std::thread::Builder::new()
            .name("fluxfit-watcher".into())
            .spawn(move || {
                while !r.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_secs(1));
                    r.watch_once(&mut watching);
                }
            })
            .map_err(thread_error)?;
        let r = remote.clone();
        std::thread::Builder::new()
            .name("fluxfit-collector".into())
            .spawn(move || collect(&r, &jobs, &metrics, &output_dir, rx))
            .map_err(thread_error)?;
        Ok(remote)
    }

    /// Stops the watcher and the collector (jobs still running on workers finish there; their
    /// results stay in the broker).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn seen(&self) -> std::sync::RwLockReadGuard<'_, Seen> {
        self.seen.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The live workers' advertisements.
    pub fn live(&self) -> Vec<Advert> {
        self.seen()
            .workers
            .values()
            .filter(|(_, live)| *live)
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// Reads the heartbeats, the backlogs and the counters once, on the watcher's connection
    /// (made again after an error).
    fn watch_once(&self, con: &mut Option<Broker>) {
        if con.is_none() {
            *con = Broker::connect(self.cfg.clone()).ok();
        }
        let workers = match con.as_mut().map(Broker::live_workers) {
            Some(Ok(w)) => w,
            _ => {
                *con = None;
                self.seen
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .reachable = false;
                return;
            }
        };
        let Some(b) = con.as_mut() else { return };
        let adverts: Vec<Advert> = workers
            .iter()
            .filter_map(|w| serde_json::from_str(&w.serves).ok())
            .collect();
        let mut backlog = HashMap::new();
        for a in &adverts {
            if !backlog.contains_key(&a.pool) {
                if let Ok(n) = b.backlog(&a.pool) {
                    backlog.insert(a.pool.clone(), n);
                }
            }
        }
        let counters = b.counters().unwrap_or_default();
        let mut seen = self.seen.write().unwrap_or_else(|p| p.into_inner());
        for (_, live) in seen.workers.values_mut() {
            *live = false;
        }
        for a in adverts {
            seen.workers.insert(a.name.clone(), (a, true));
        }
        // Workers gone for good are remembered (as down) up to a bound.
        while seen.workers.len() > 256 {
            let Some(gone) = seen
                .workers
                .iter()
                .find(|(_, (_, live))| !live)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            seen.workers.remove(&gone);
        }
        seen.backlog = backlog;
        seen.counters = counters;
        seen.reachable = true;
    }

    /// Checks each job against the live pools, picks one for each, records them all in
    /// `jobs` (or none: a full queue is a 429), and puts them on their streams.
    pub fn submit(
        &self,
        jobs: &Jobs,
        specs: Vec<Submitted>,
        limits: ImageLimits,
    ) -> Result<Vec<Arc<Job>>, ApiError> {
        let mut routed = Vec::with_capacity(specs.len());
        for (spec, image, mask) in specs {
            routed.push(self.route(spec, image, mask, limits)?);
        }
        let works = routed
            .iter()
            .map(|r| (r.spec.mode, r.params.clone(), r.steps))
            .collect();
        let made = jobs.submit_remote(works)?;
        for (job, r) in made.iter().zip(&routed) {
            let record = serde_json::to_string(&Record {
                server: self.tag.clone(),
                mode: r.spec.mode,
                params: r.params.clone(),
                created: job.created,
                steps: r.steps,
            })
            .unwrap_or_default();
            if let Err(e) = self.put(&r.pool, &job.id, &r.payload, &record) {
                // Neither this job nor the rest are on the broker: they end here.
                for j in &made {
                    j.finish(
                        Status::Failed,
                        serde_json::json!({ "error": format!("the broker is unreachable: {e}") }),
                    );
                    jobs.finished_remote(j);
                }
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the broker is unreachable: {e}"),
                ));
            }
            job.push(
                "queued",
                serde_json::json!({ "position": null, "pool": r.pool }),
            );
            let _ = self
                .track
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send(job.clone());
        }
        Ok(made)
    }

    /// The job and its record onto the broker, on the submitting connection, connecting
    /// again once if it broke.
    fn put(&self, pool: &str, id: &str, payload: &str, record: &str) -> Result<(), BrokerError> {
        let mut slot = self.submitter.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = slot.as_mut() {
            if b.submit_recorded(pool, id, payload, record).is_ok() {
                return Ok(());
            }
        }
        *slot = None;
        let mut b = Broker::connect(self.cfg.clone())?;
        b.submit_recorded(pool, id, payload, record)?;
        *slot = Some(b);
        Ok(())
    }

    /// The pool for one job: the least loaded whose model runs it and whose budget fits it.
    fn route(
        &self,
        mut spec: crate::job::JobSpec,
        image: Option<Vec<u8>>,
        mask: Option<Vec<u8>>,
        limits: ImageLimits,
    ) -> Result<Routed, ApiError> {
        let (pools, backlog) = {
            let seen = self.seen();
            let mut pools: BTreeMap<String, (Advert, usize)> = BTreeMap::new();
            for (a, live) in seen.workers.values() {
                if *live {
                    pools
                        .entry(a.pool.clone())
                        .or_insert_with(|| (a.clone(), 0))
                        .1 += 1;
                }
            }
            (pools, seen.backlog.clone())
        };
        if pools.is_empty() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no worker is serving this server's broker: start `fluxfit worker --broker URL` with a model",
            ));
        }
        // The seed is drawn once, so every worker that may run it makes the same image.
        let seed = spec.seed.unwrap_or_else(crate::random_seed);
        let mut refusals: Vec<(String, ApiError)> = Vec::new();
        let mut best: Option<(f64, String, crate::job::Work)> = None;
        for (pool, (a, count)) in &pools {
            let work = match spec.prepare(&a.model, image.clone(), mask.clone(), limits, seed) {
                Ok(w) => w,
                Err(e) => {
                    refusals.push((format!("{} ({})", a.model.name, pool), e));
                    continue;
                }
            };
            let (kind, tokens) = work.demand();
            if let Some(why) = a.refuses(kind, tokens) {
                refusals.push((
                    format!("{} ({})", a.model.name, pool),
                    ApiError::invalid("width", why),
                ));
                continue;
            }
            let (lag, pending) = backlog.get(pool).copied().unwrap_or_default();
            let load = (lag + pending) as f64 / *count as f64;
            if best.as_ref().is_none_or(|(l, _, _)| load < *l) {
                best = Some((load, pool.clone(), work));
            }
        }
        let Some((_, pool, work)) = best else {
            let param = refusals.first().and_then(|(_, e)| e.param.clone());
            let reasons: Vec<String> = refusals
                .iter()
                .map(|(who, e)| format!("{who}: {}", e.message))
                .collect();
            let mut e = ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("no live worker can run this job: {}", reasons.join("; ")),
            );
            e.param = param;
            return Err(e);
        };
        spec.seed = Some(work.req.seed);
        spec.steps = Some(work.req.steps);
        spec.guidance = Some(work.req.guidance);
        let mut params = serde_json::to_value(&spec).unwrap_or_default();
        if let Some(p) = params.as_object_mut() {
            p.insert("width".into(), work.req.width.into());
            p.insert("height".into(), work.req.height.into());
        }
        Ok(Routed {
            payload: job_payload(&spec, image.as_deref(), mask.as_deref()),
            steps: work.req.steps,
            spec,
            params,
            pool,
        })
    }

    /// The `/metrics` lines of the broker: per worker, per pool, and the counters.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write as _;
        let seen = self.seen();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP fluxfit_broker_up Whether the server reached the broker at its last look.\n# TYPE fluxfit_broker_up gauge\nfluxfit_broker_up {}",
            u8::from(seen.reachable)
        );
        let _ = writeln!(s, "# HELP fluxfit_worker_up Whether a worker's heartbeat is live.\n# TYPE fluxfit_worker_up gauge");
        for (name, (a, live)) in &seen.workers {
            let _ = writeln!(
                s,
                "fluxfit_worker_up{{worker=\"{}\",pool=\"{}\",model=\"{}\"}} {}",
                label(name),
                label(&a.pool),
                label(&a.model.name),
                u8::from(*live)
            );
        }
        let _ = writeln!(s, "# HELP fluxfit_worker_busy Whether a worker is running a job.\n# TYPE fluxfit_worker_busy gauge");
        for (name, (a, live)) in &seen.workers {
            let _ = writeln!(
                s,
                "fluxfit_worker_busy{{worker=\"{}\"}} {}",
                label(name),
                u8::from(*live && a.busy.is_some())
            );
        }
        let _ = writeln!(s, "# HELP fluxfit_worker_jobs_total Jobs a worker finished, by outcome (since it started).\n# TYPE fluxfit_worker_jobs_total counter");
        for (name, (a, _)) in &seen.workers {
            for (outcome, n) in [
                ("done", a.done),
                ("failed", a.failed),
                ("cancelled", a.cancelled),
            ] {
                let _ = writeln!(
                    s,
                    "fluxfit_worker_jobs_total{{worker=\"{}\",outcome=\"{outcome}\"}} {n}",
                    label(name)
                );
            }
        }
        let _ = writeln!(s, "# HELP fluxfit_pool_queued Jobs on a pool's stream no worker has taken yet.\n# TYPE fluxfit_pool_queued gauge");
        for (pool, (lag, _)) in &seen.backlog {
            let _ = writeln!(s, "fluxfit_pool_queued{{pool=\"{}\"}} {lag}", label(pool));
        }
        let _ = writeln!(s, "# HELP fluxfit_pool_pending Jobs a worker has taken and not acknowledged.\n# TYPE fluxfit_pool_pending gauge");
        for (pool, (_, pending)) in &seen.backlog {
            let _ = writeln!(
                s,
                "fluxfit_pool_pending{{pool=\"{}\"}} {pending}",
                label(pool)
            );
        }
        let (reclaimed, dead) = seen.counters;
        let _ = writeln!(
            s,
            "# HELP fluxfit_reclaimed_total Deliveries taken over from a worker past the visibility timeout.\n# TYPE fluxfit_reclaimed_total counter\nfluxfit_reclaimed_total {reclaimed}"
        );
        let _ = writeln!(
            s,
            "# HELP fluxfit_dead_letters_total Jobs moved to the dead letters.\n# TYPE fluxfit_dead_letters_total counter\nfluxfit_dead_letters_total {dead}"
        );
        s
    }
}

/// A label value as Prometheus' text format quotes it.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn thread_error(e: std::io::Error) -> BrokerError {
    BrokerError::Reply {
        command: "thread",
        reply: e.to_string(),
    }
}

/// A server's record of a job it put on the broker and has not collected.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    server: String,
    mode: crate::job::Mode,
    params: serde_json::Value,
    created: u64,
    steps: usize,
}

/// A job routed to a pool.
struct Routed {
    spec: crate::job::JobSpec,
    params: serde_json::Value,
    steps: usize,
    pool: String,
    payload: String,
}

/// A job followed by the collector.
struct Followed {
    job: Arc<Job>,
    /// The last event id read.
    after: String,
    heard: Instant,
}

/// Starts following `job`'s events from the first.
fn follow(followed: &mut BTreeMap<String, Followed>, job: Arc<Job>) {
    followed.insert(
        job.id.clone(),
        Followed {
            job,
            after: "0".into(),
            heard: Instant::now(),
        },
    );
}

/// The collector's loop: see the module doc.
fn collect(
    remote: &Remote,
    jobs: &Jobs,
    metrics: &Metrics,
    output_dir: &std::path::Path,
    rx: Receiver<Arc<Job>>,
) {
    let mut broker: Option<Broker> = None;
    let mut followed: BTreeMap<String, Followed> = BTreeMap::new();
    while !remote.stop.load(Ordering::SeqCst) {
        while let Ok(job) = rx.try_recv() {
            follow(&mut followed, job);
        }
        let b = match broker.as_mut() {
            Some(b) => b,
            None => match Broker::connect(remote.cfg.clone()) {
                Ok(b) => broker.insert(b),
                Err(e) => {
                    log(format_args!("fluxfit serve: {e}; retrying"));
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let mut ok = true;
        for (id, why) in jobs.take_cancels() {
            ok &= b.cancel(&id, &why, CANCEL_TTL).is_ok();
        }
        // Jobs cancelled before a worker took them ended here already.
        let ended: Vec<String> = followed
            .iter()
            .filter(|(_, f)| f.job.state().status.is_final())
            .map(|(id, _)| id.clone())
            .collect();
        for id in ended {
            ok &= b.drop_record(&id).is_ok();
            followed.remove(&id);
        }
        if followed.is_empty() {
            if let Ok(job) = rx.recv_timeout(Duration::from_millis(200)) {
                follow(&mut followed, job);
            }
            continue;
        }
        let after: Vec<(String, String)> = followed
            .iter()
            .map(|(id, f)| (id.clone(), f.after.clone()))
            .collect();
        match b.events_of(&after, Duration::from_millis(200)) {
            Ok(events) => {
                for (id, eid, event) in events {
                    let Some(f) = followed.get_mut(&id) else {
                        continue;
                    };
                    f.after = eid;
                    f.heard = Instant::now();
                    if apply(&f.job, metrics, &event) {
                        ok &= settle(b, jobs, metrics, output_dir, &f.job).is_ok();
                    }
                }
            }
            Err(_) => ok = false,
        }
        // Quiet jobs: their result may be there without its final event.
        for f in followed.values_mut() {
            if ok && f.heard.elapsed() > QUIET && !f.job.state().status.is_final() {
                f.heard = Instant::now();
                ok &= settle(b, jobs, metrics, output_dir, &f.job).is_ok();
            }
        }
        if !ok {
            broker = None;
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// One event into the job's log; true when it was the final one.
fn apply(job: &Job, metrics: &Metrics, event: &str) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(event) else {
        return false;
    };
    let data = v["data"].clone();
    let kind: &'static str = match v["kind"].as_str() {
        Some("started") => {
            let mut s = job.state();
            s.status = Status::Running;
            s.started = Some(Instant::now());
            drop(s);
            "started"
        }
        Some("phase") => "phase",
        Some("preview") => "preview",
        Some("retry") => "retry",
        Some("step") => {
            let mut s = job.state();
            s.step = data["step"].as_u64().unwrap_or(0) as usize;
            s.total = data["total"].as_u64().unwrap_or(0) as usize;
            drop(s);
            if let Some(rate) = data["rate"].as_f64().filter(|r| *r > 0.0) {
                metrics.step(1.0 / rate);
            }
            "step"
        }
        Some("done" | "failed" | "cancelled") => return true,
        _ => return false,
    };
    job.push(kind, data);
    false
}

/// Ends `job` with its recorded result, if there is one yet: its PNG written into the output
/// folder as a local run writes it.
fn settle(
    b: &mut Broker,
    jobs: &Jobs,
    metrics: &Metrics,
    output_dir: &std::path::Path,
    job: &Arc<Job>,
) -> Result<(), BrokerError> {
    let Some(text) = b.result(&job.id)? else {
        return Ok(());
    };
    match serde_json::from_str::<RunResult>(&text) {
        Ok(RunResult::Done {
            png,
            width,
            height,
            seed,
            peak_bytes,
            seconds,
            worker,
        }) => {
            let saved = base64::engine::general_purpose::STANDARD
                .decode(png)
                .map_err(|e| e.to_string())
                .and_then(|bytes| save_png(output_dir, &job.id, &bytes).map_err(|e| e.to_string()));
            match saved {
                Ok(name) => {
                    let image = crate::jobs::ImageRef {
                        url: format!("/v1/images/{name}"),
                        name,
                        width,
                        height,
                        seed,
                    };
                    log(format_args!(
                        "fluxfit serve: job {}: done by {worker} in {seconds:.1} s",
                        job.id
                    ));
                    finish_done(job, metrics, image, peak_bytes, Some(seconds));
                }
                Err(e) => finish_failed(
                    job,
                    metrics,
                    format!("writing the image from worker {worker}: {e}"),
                ),
            }
        }
        Ok(RunResult::Failed { error, .. }) => finish_failed(job, metrics, error),
        Ok(RunResult::Cancelled {
            reason,
            step,
            total,
            ..
        }) => {
            if !job.state().status.is_final() {
                metrics.outcome(Status::Cancelled);
            }
            job.finish(
                Status::Cancelled,
                serde_json::json!({ "reason": reason, "step": step, "total": total }),
            );
        }
        Err(e) => finish_failed(
            job,
            metrics,
            format!("the worker's result is unreadable: {e}"),
        ),
    }
    jobs.finished_remote(job);
    Ok(())
}
