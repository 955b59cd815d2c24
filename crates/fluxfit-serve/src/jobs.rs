//! The jobs a server holds: a bounded queue in front of the one runner that computes, every
//! job's status, and its event log for the SSE stream. Plain threads and a mutex: the runner
//! is a thread that owns the model, and HTTP handlers only enqueue, read and cancel.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use fluxfit::pipeline::watch::Watch;
use serde::Serialize;

use crate::error::ApiError;
use crate::job::{Mode, Work};
use crate::metrics::Metrics;

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl Status {
    pub fn is_final(self) -> bool {
        matches!(self, Status::Done | Status::Failed | Status::Cancelled)
    }
}

/// One entry of a job's event log, as the SSE stream sends it.
#[derive(Debug, Clone, Serialize)]
pub struct JobEvent {
    /// Position in the log (the SSE `id`).
    pub seq: usize,
    /// `queued`, `phase`, `step`, `preview`, `done`, `failed`, `cancelled`.
    pub kind: &'static str,
    pub data: serde_json::Value,
}

/// The image a finished job wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ImageRef {
    pub name: String,
    pub url: String,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
}

/// What can change about a job, under its lock.
pub struct JobState {
    pub status: Status,
    pub step: usize,
    pub total: usize,
    pub events: Vec<JobEvent>,
    pub image: Option<ImageRef>,
    pub error: Option<String>,
    /// Taken by the runner when the job starts.
    pub work: Option<Work>,
    /// Set while the job runs: cancelling reaches the denoising loop through it.
    pub watch: Option<Arc<Watch>>,
    pub started: Option<Instant>,
    pub seconds: Option<f64>,
    /// Peak device memory of the finished run.
    pub peak_bytes: Option<u64>,
}

pub struct Job {
    pub id: String,
    /// Run by a worker through the broker, not by this server's runner.
    pub remote: bool,
    pub mode: Mode,
    /// The request as submitted (without its images), for `GET /v1/jobs/{id}`.
    pub params: serde_json::Value,
    pub created: u64,
    state: Mutex<JobState>,
    /// Bumped on every event: SSE streams wait on it, so no event is missed between a read of
    /// the log and the wait.
    changed: tokio::sync::watch::Sender<usize>,
}

impl Job {
    /// A queued job; without `work` it is remote (a worker runs it).
    fn new(
        id: String,
        mode: Mode,
        params: serde_json::Value,
        created: u64,
        total: usize,
        work: Option<Work>,
    ) -> Arc<Self> {
        Arc::new(Job {
            id,
            remote: work.is_none(),
            mode,
            params,
            created,
            state: Mutex::new(JobState {
                status: Status::Queued,
                step: 0,
                total,
                events: Vec::new(),
                image: None,
                error: None,
                work,
                watch: None,
                started: None,
                seconds: None,
                peak_bytes: None,
            }),
            changed: tokio::sync::watch::channel(0).0,
        })
    }

    pub fn state(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<usize> {
        self.changed.subscribe()
    }

    /// Appends an event. Previews replace the previous preview in the log: a late subscriber
    /// gets the newest one, and a long job's log stays small.
    pub fn push(&self, kind: &'static str, data: serde_json::Value) {
        let mut s = self.state();
        if kind == "preview" {
            s.events.retain(|e| e.kind != "preview");
        }
        let seq = s.events.last().map_or(0, |e| e.seq + 1);
        s.events.push(JobEvent { seq, kind, data });
        drop(s);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Ends the job with `status`, its final event carrying `data`.
    pub fn finish(&self, status: Status, data: serde_json::Value) {
        {
            let mut s = self.state();
            if s.status.is_final() {
                return;
            }
            s.status = status;
            s.work = None;
            s.watch = None;
            s.seconds = s.started.map(|t| t.elapsed().as_secs_f64());
        }
        let kind = match status {
            Status::Done => "done",
            Status::Failed => "failed",
            _ => "cancelled",
        };
        self.push(kind, data);
    }

    /// The job as `GET /v1/jobs/{id}` shows it.
    pub fn view(&self, position: Option<usize>) -> serde_json::Value {
        let s = self.state();
        serde_json::json!({
            "id": self.id,
            "mode": self.mode.name(),
            "status": s.status,
            "position": position,
            "step": s.step,
            "total": s.total,
            "image": s.image,
            "error": s.error,
            "seconds": s.seconds,
            "peak_bytes": s.peak_bytes,
            "created": self.created,
            "params": self.params,
            "events": format!("/v1/jobs/{}/events", self.id),
        })
    }
}

struct Queue {
    waiting: VecDeque<Arc<Job>>,
    all: HashMap<String, Arc<Job>>,
    /// Finished jobs, oldest first: forgotten beyond [`KEEP_FINISHED`] (their images stay).
    finished: VecDeque<String>,
    running: Option<Arc<Job>>,
    /// Jobs on the broker, not finished yet (`--broker`), oldest first.
    remote: Vec<Arc<Job>>,
    /// Cancellations of remote jobs for the broker to pass on: (job id, reason).
    cancels: Vec<(String, String)>,
    accepting: bool,
}

/// Finished jobs remembered for `GET /v1/jobs/{id}`.
const KEEP_FINISHED: usize = 1000;

/// The queue and every known job.
pub struct Jobs {
    queue: Mutex<Queue>,
    wake: Condvar,
    capacity: usize,
    next: AtomicU64,
    /// Seconds a client is told to wait when the queue is full.
    retry_after: AtomicU64,
    /// Told apart from earlier runs of the server in job ids (and so in file names).
    run: u16,
    metrics: Arc<Metrics>,
}

impl Jobs {
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            queue: Mutex::new(Queue {
                waiting: VecDeque::new(),
                all: HashMap::new(),
                finished: VecDeque::new(),
                running: None,
                remote: Vec::new(),
                cancels: Vec::new(),
                accepting: true,
            }),
            wake: Condvar::new(),
            capacity,
            next: AtomicU64::new(1),
            retry_after: AtomicU64::new(5),
            run: crate::random_seed() as u16,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Jobs waiting, and whether one runs (a job whose result is out no longer does).
    pub fn depth(&self) -> (usize, bool) {
        let q = self.lock();
        let running = q
            .running
            .as_ref()
            .is_some_and(|j| !j.state().status.is_final());
        (q.waiting.len(), running)
    }

    /// The jobs queued and running, then the newest finished ones, at most `limit`.
    pub fn list(&self, limit: usize) -> Vec<serde_json::Value> {
        let q = self.lock();
        let mut out: Vec<serde_json::Value> = Vec::new();
        if let Some(j) = &q.running {
            out.push(j.view(None));
        }
        for j in &q.remote {
            out.push(j.view(None));
        }
        for (i, j) in q.waiting.iter().enumerate() {
            out.push(j.view(Some(i + 1)));
        }
        for id in q.finished.iter().rev() {
            if let Some(j) = q.all.get(id) {
                if q.running.as_ref().is_none_or(|r| r.id != j.id)
                    && !q.remote.iter().any(|r| r.id == j.id)
                {
                    out.push(j.view(None));
                }
            }
        }
        out.truncate(limit);
        out
    }

    /// The seconds a full queue asks clients to wait: about one job's time.
    pub fn set_retry_after(&self, secs: u64) {
        self.retry_after
            .store(secs.clamp(1, 600), Ordering::Relaxed);
    }

    /// Whether `n` more jobs fit beside the `held` ones: a stopping server is a 503, a full
    /// queue a 429 with `Retry-After` and `full(held, capacity)` as its message.
    fn room(
        &self,
        q: &Queue,
        held: usize,
        n: usize,
        full: impl FnOnce(usize, usize) -> String,
    ) -> Result<(), ApiError> {
        if !q.accepting {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is stopping and takes no new jobs",
            ));
        }
        if held + n > self.capacity {
            let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, full(held, self.capacity));
            e.retry_after = Some(self.retry_after.load(Ordering::Relaxed));
            return Err(e);
        }
        Ok(())
    }

    /// Queues `n` jobs at once, or none: a full queue (or a stopping server) answers 429 /
    /// 503 for all of them.
    pub fn submit(
        &self,
        works: Vec<(Mode, serde_json::Value, Work)>,
    ) -> Result<Vec<Arc<Job>>, ApiError> {
        let mut q = self.lock();
        self.room(&q, q.waiting.len(), works.len(), |held, cap| {
            format!("the queue is full ({held} of {cap} waiting); retry later")
        })?;
        let mut out = Vec::with_capacity(works.len());
        for (mode, params, work) in works {
            let total = work.req.steps;
            let job = self.new_job(mode, params, total, Some(work));
            let id = job.id.clone();
            job.push(
                "queued",
                serde_json::json!({ "position": q.waiting.len() + 1 }),
            );
            q.waiting.push_back(job.clone());
            q.all.insert(id, job.clone());
            out.push(job);
        }
        drop(q);
        self.wake.notify_all();
        Ok(out)
    }

    fn new_job(
        &self,
        mode: Mode,
        params: serde_json::Value,
        total: usize,
        work: Option<Work>,
    ) -> Arc<Job> {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{:04x}-{n:04}", crate::names::stamp(), self.run);
        Job::new(id, mode, params, created, total, work)
    }

    /// Records `n` jobs that workers will run (`--broker`), or none: the queue's capacity
    /// bounds the jobs in flight on the broker. `works` are (mode, params, steps).
    pub fn submit_remote(
        &self,
        works: Vec<(Mode, serde_json::Value, usize)>,
    ) -> Result<Vec<Arc<Job>>, ApiError> {
        let mut q = self.lock();
        self.room(&q, q.remote.len(), works.len(), |held, cap| {
            format!("{held} of {cap} jobs are in flight on the workers; retry later")
        })?;
        let mut out = Vec::with_capacity(works.len());
        for (mode, params, total) in works {
            let job = self.new_job(mode, params, total, None);
            q.remote.push(job.clone());
            q.all.insert(job.id.clone(), job.clone());
            out.push(job);
        }
        Ok(out)
    }

    /// A remote job this server put on the broker before it restarted, under its old id:
    /// followed again, its result collected into this run's gallery. None when known already.
    pub fn adopt(
        &self,
        id: &str,
        mode: Mode,
        params: serde_json::Value,
        created: u64,
        total: usize,
    ) -> Option<Arc<Job>> {
        let mut q = self.lock();
        if q.all.contains_key(id) {
            return None;
        }
        let job = Job::new(id.to_string(), mode, params, created, total, None);
        q.remote.push(job.clone());
        q.all.insert(job.id.clone(), job.clone());
        Some(job)
    }

    /// A remote job has ended (or will no longer be followed).
    pub fn finished_remote(&self, job: &Arc<Job>) {
        let mut q = self.lock();
        if let Some(i) = q.remote.iter().position(|j| j.id == job.id) {
            q.remote.remove(i);
            remember(&mut q, &job.id);
        }
    }

    /// Remote jobs in flight: (queued on the broker, running on a worker).
    pub fn remote_depth(&self) -> (usize, usize) {
        let q = self.lock();
        let running = q
            .remote
            .iter()
            .filter(|j| j.state().status == Status::Running)
            .count();
        (q.remote.len() - running, running)
    }

    /// The cancellations of remote jobs asked since the last call, for the broker.
    pub fn take_cancels(&self) -> Vec<(String, String)> {
        std::mem::take(&mut self.lock().cancels)
    }

    pub fn get(&self, id: &str) -> Option<(Arc<Job>, Option<usize>)> {
        let q = self.lock();
        let job = q.all.get(id)?.clone();
        let pos = q.waiting.iter().position(|j| j.id == id).map(|p| p + 1);
        Some((job, pos))
    }

    /// Cancels a job: a queued one leaves the queue at once, a running one stops after the
    /// step in progress. Returns false when the job had already finished.
    pub fn cancel(&self, job: &Arc<Job>, why: &str) -> bool {
        let mut q = self.lock();
        if job.remote {
            if job.state().status.is_final() {
                return false;
            }
            // The worker that runs it (or will be handed it) is told through the broker; one
            // not started yet ends now.
            q.cancels.push((job.id.clone(), why.to_string()));
            let queued = job.state().status == Status::Queued;
            if queued {
                if let Some(i) = q.remote.iter().position(|j| j.id == job.id) {
                    q.remote.remove(i);
                    remember(&mut q, &job.id);
                }
                drop(q);
                self.metrics.outcome(Status::Cancelled);
                job.finish(
                    Status::Cancelled,
                    serde_json::json!({ "reason": why, "step": 0 }),
                );
            }
            return true;
        }
        if let Some(i) = q.waiting.iter().position(|j| j.id == job.id) {
            q.waiting.remove(i);
            remember(&mut q, &job.id);
            let positions = positions(&q);
            drop(q);
            job.finish(
                Status::Cancelled,
                serde_json::json!({ "reason": why, "step": 0 }),
            );
            self.metrics.outcome(Status::Cancelled);
            announce(positions);
            return true;
        }
        drop(q);
        let s = job.state();
        if s.status.is_final() {
            return false;
        }
        if let Some(w) = &s.watch {
            w.cancel();
        }
        true
    }

    /// The runner's next job, waiting for one; `None` once the server stops and the queue
    /// is empty.
    pub fn next_job(&self) -> Option<Arc<Job>> {
        let mut q = self.lock();
        loop {
            if let Some(job) = q.waiting.pop_front() {
                q.running = Some(job.clone());
                let positions = positions(&q);
                drop(q);
                announce(positions);
                return Some(job);
            }
            if !q.accepting {
                return None;
            }
            q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The runner is done with `job`.
    pub fn finished(&self, job: &Arc<Job>) {
        let mut q = self.lock();
        q.running = None;
        remember(&mut q, &job.id);
    }

    /// Stops taking jobs and cancels those still queued; the running one goes on.
    pub fn stop(&self) -> Option<Arc<Job>> {
        let mut q = self.lock();
        q.accepting = false;
        let waiting: Vec<_> = q.waiting.drain(..).collect();
        for j in &waiting {
            remember(&mut q, &j.id);
        }
        let running = q.running.clone();
        drop(q);
        for j in waiting {
            self.metrics.outcome(Status::Cancelled);
            j.finish(
                Status::Cancelled,
                serde_json::json!({ "reason": "the server is stopping", "step": 0 }),
            );
        }
        self.wake.notify_all();
        running
    }
}

fn remember(q: &mut Queue, id: &str) {
    q.finished.push_back(id.to_string());
    while q.finished.len() > KEEP_FINISHED {
        if let Some(old) = q.finished.pop_front() {
            q.all.remove(&old);
        }
    }
}

fn positions(q: &Queue) -> Vec<(Arc<Job>, usize)> {
    q.waiting
        .iter()
        .enumerate()
        .map(|(i, j)| (j.clone(), i + 1))
        .collect()
}

/// Tells every waiting job its new place in the queue.
fn announce(positions: Vec<(Arc<Job>, usize)>) {
    for (job, position) in positions {
        job.push("queued", serde_json::json!({ "position": position }));
    }
}
