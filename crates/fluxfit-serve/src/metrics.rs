//! Counters for `GET /metrics`, in Prometheus' text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::jobs::Status;

#[derive(Default)]
pub struct Metrics {
    done: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    rejected_full: AtomicU64,
    steps: AtomicU64,
    /// Seconds of the last step, as f64 bits.
    last_step_s: AtomicU64,
    peak_bytes: AtomicU64,
}

impl Metrics {
    pub fn outcome(&self, s: Status) {
        let c = match s {
            Status::Done => &self.done,
            Status::Failed => &self.failed,
            _ => &self.cancelled,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected(&self) {
        self.rejected_full.fetch_add(1, Ordering::Relaxed);
    }

    pub fn step(&self, seconds: f64) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.last_step_s.store(seconds.to_bits(), Ordering::Relaxed);
    }

    pub fn peak(&self, bytes: u64) {
        self.peak_bytes.fetch_max(bytes, Ordering::Relaxed);
    }

    /// The exposition text; `queued`, `running` and `capacity` are read from the queue.
    pub fn render(&self, queued: usize, running: bool, capacity: usize) -> String {
        let mut s = String::new();
        let g = |s: &mut String, name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        g(
            &mut s,
            "fluxfit_queue_depth",
            "gauge",
            "Jobs waiting in the queue.",
            queued.to_string(),
        );
        g(
            &mut s,
            "fluxfit_queue_capacity",
            "gauge",
            "Jobs the queue holds.",
            capacity.to_string(),
        );
        g(
            &mut s,
            "fluxfit_job_running",
            "gauge",
            "Whether a job is computing.",
            u8::from(running).to_string(),
        );
        let _ = writeln!(
            s,
            "# HELP fluxfit_jobs_total Finished jobs by outcome.\n# TYPE fluxfit_jobs_total counter"
        );
        for (outcome, c) in [
            ("done", &self.done),
            ("failed", &self.failed),
            ("cancelled", &self.cancelled),
        ] {
            let _ = writeln!(
                s,
                "fluxfit_jobs_total{{outcome=\"{outcome}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let last = f64::from_bits(self.last_step_s.load(Ordering::Relaxed));
        g(
            &mut s,
            "fluxfit_rejected_total",
            "counter",
            "Requests refused with 429 (queue full).",
            self.rejected_full.load(Ordering::Relaxed).to_string(),
        );
        g(
            &mut s,
            "fluxfit_steps_total",
            "counter",
            "Denoising steps run.",
            self.steps.load(Ordering::Relaxed).to_string(),
        );
        g(
            &mut s,
            "fluxfit_step_rate",
            "gauge",
            "Steps per second of the last step.",
            if last > 0.0 {
                format!("{:.4}", 1.0 / last)
            } else {
                "0".into()
            },
        );
        g(
            &mut s,
            "fluxfit_device_memory_peak_bytes",
            "gauge",
            "Largest peak device memory of a job (measured on the CPU, from the pool on CUDA).",
            self.peak_bytes.load(Ordering::Relaxed).to_string(),
        );
        s
    }
}
