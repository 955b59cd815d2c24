//! The one thread that computes: it owns the model, takes jobs from the queue one at a time,
//! lets the planner pick each job's plan (size and mode change it), runs the job with a
//! [`Watch`] for cancellation and previews, and writes the image with the CLI's metadata.
//! [`execute`] is that run alone, shared with `fluxfit worker` ([`crate::worker`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use fluxfit::candle_core::DType;
use fluxfit::candle_core::Tensor;
use fluxfit::image::resize_lanczos;
use fluxfit::image::{encode, to_rgb8, write_new, Format};
use fluxfit::memory::plan::Plan;
use fluxfit::pipeline::regions::{Canvas, RegionEvent};
use fluxfit::pipeline::watch::{Preview, Watch};
use fluxfit::pipeline::{Event, Generated, Model};
use fluxfit::planner::choice::{choose, Asked, Choosing, Quant};
use fluxfit::planner::{Budget, DeviceProfile, ModelSpec, Workload};

use crate::job::{Input, Work};
use crate::jobs::{ImageRef, Job, Jobs, Status};
use crate::metrics::Metrics;

/// How the runner plans each job.
#[derive(Clone)]
pub struct Planning {
    pub spec: ModelSpec,
    pub device: DeviceProfile,
    /// With a budget the planner picks each job's plan; without, the model's plan is kept.
    pub budget: Option<Budget>,
    pub dtype: DType,
    pub attn_chunk: Option<usize>,
    /// The tile of `--vae-tile`, kept over the planner's.
    pub vae_tile: Option<usize>,
}

impl Planning {
    /// How jobs on `model` are planned: under `budget` when there is one, with `--vae-tile`'s
    /// tile kept over the planner's.
    pub fn of(model: &Model, budget: Option<Budget>, vae_tile: Option<usize>) -> Self {
        Self {
            spec: ModelSpec::from_model(model),
            device: DeviceProfile::for_device(model.device()),
            budget,
            dtype: model.dtype(),
            attn_chunk: model.plan().attn_chunk,
            vae_tile,
        }
    }

    /// Under a budget, the fastest plan that fits `w` (an error naming the nearest
    /// alternatives when none does); without one, `None`: the model keeps its plan.
    pub fn choose(&self, w: &Work) -> fluxfit::Result<Option<Plan>> {
        let Some(budget) = self.budget else {
            return Ok(None);
        };
        let choice = choose(
            &self.spec,
            &Choosing {
                request: self.workload(w),
                device: self.device.clone(),
                budget,
                dtype: self.dtype,
                attn_chunk: self.attn_chunk,
                quant: Quant::Stored,
            },
        )?;
        let mut plan = choice.plan;
        if self.vae_tile.is_some() {
            plan.vae_tile = self.vae_tile;
        }
        Ok(Some(plan))
    }

    /// The request as the planner sees it.
    pub fn workload(&self, w: &Work) -> Workload {
        let (image_input, cond_size) = w.shape();
        // Regions run one region at a time: that is the size to plan for.
        let (width, height) = match &w.input {
            Input::Regions { grid, .. } => (grid[0].w, grid[0].h),
            _ => (w.req.width, w.req.height),
        };
        Workload::asked(
            &self.spec,
            Asked {
                width: Some(width),
                height: Some(height),
                steps: Some(w.req.steps),
                t5_tokens: Some(w.req.t5_tokens),
                image_input,
                cond_size,
                redux_images: 0,
            },
        )
    }
}

pub struct Runner {
    pub model: Model,
    pub jobs: Arc<Jobs>,
    pub metrics: Arc<Metrics>,
    pub planning: Planning,
    pub output_dir: PathBuf,
    pub preview_every: usize,
}

impl Runner {
    /// Runs jobs until the queue stops.
    pub fn run(mut self) {
        while let Some(job) = self.jobs.next_job() {
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_job(&job)));
            if outcome.is_err() {
                // A bug, not the client's: the job fails and the server goes on.
                self.metrics.outcome(Status::Failed);
                job.finish(
                    Status::Failed,
                    serde_json::json!({ "error": "internal error while running the job (a bug: please report it)" }),
                );
            }
            self.model.set_watch(None);
            self.jobs.finished(&job);
        }
    }

    fn run_job(&mut self, job: &Arc<Job>) {
        let (mut work, watch) = {
            let mut s = job.state();
            let Some(work) = s.work.take() else { return };
            if s.status.is_final() {
                return;
            }
            s.status = Status::Running;
            s.started = Some(Instant::now());
            let weak = Arc::downgrade(job);
            let watch = Arc::new(Watch::new(self.preview_every, move |p: Preview| {
                if let Some(job) = weak.upgrade() {
                    job.push("preview", preview_event(&p));
                }
            }));
            s.watch = Some(watch.clone());
            (work, watch)
        };
        self.model.set_watch(Some(watch));
        let mut last = Instant::now();
        let metrics = self.metrics.clone();
        let mut report = |kind: &'static str, data: serde_json::Value| {
            if kind == "step" {
                let now = Instant::now();
                metrics.step(now.duration_since(last).as_secs_f64());
                last = now;
                let mut s = job.state();
                s.step = data["step"].as_u64().unwrap_or(0) as usize;
                s.total = data["total"].as_u64().unwrap_or(0) as usize;
            }
            job.push(kind, data);
        };
        let outcome = execute(
            &mut self.model,
            &self.planning,
            &mut work,
            &job.id,
            &mut report,
        );
        self.model.set_watch(None);
        match outcome {
            Outcome::Done(made) => match save_png(&self.output_dir, &job.id, &made.png) {
                Ok(name) => {
                    let seconds = job.state().started.map(|t| t.elapsed().as_secs_f64());
                    if let Some(s) = seconds {
                        self.jobs.set_retry_after(s.ceil() as u64);
                    }
                    finish_done(job, &self.metrics, made.image_ref(name), made.peak, seconds);
                }
                Err(e) => finish_failed(job, &self.metrics, e.to_string()),
            },
            Outcome::Cancelled { step, total } => {
                self.metrics.outcome(Status::Cancelled);
                job.finish(
                    Status::Cancelled,
                    serde_json::json!({ "reason": "cancelled", "step": step, "total": total }),
                );
            }
            Outcome::Failed(message) => finish_failed(job, &self.metrics, message),
        }
    }
}

/// Ends `job` with its image: counted first, so a client that sees the result then finds it
/// in `/metrics`.
pub fn finish_done(
    job: &Job,
    metrics: &Metrics,
    image: ImageRef,
    peak: usize,
    seconds: Option<f64>,
) {
    metrics.peak(peak as u64);
    {
        let mut s = job.state();
        s.image = Some(image.clone());
        s.peak_bytes = Some(peak as u64);
    }
    metrics.outcome(Status::Done);
    job.finish(
        Status::Done,
        serde_json::json!({ "image": image, "seconds": seconds, "peak_bytes": peak }),
    );
}

/// Ends `job` with an error.
pub fn finish_failed(job: &Job, metrics: &Metrics, message: String) {
    job.state().error = Some(message.clone());
    metrics.outcome(Status::Failed);
    job.finish(Status::Failed, serde_json::json!({ "error": message }));
}

/// How one run of a job ended.
pub enum Outcome {
    Done(Encoded),
    Cancelled { step: usize, total: usize },
    Failed(String),
}

/// A finished job's image, encoded as the PNG the CLI writes (its metadata and the job id).
pub struct Encoded {
    pub png: Vec<u8>,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    /// Peak device memory of the run.
    pub peak: usize,
}

impl Encoded {
    /// The image as the API shows it, once written as `name`.
    pub fn image_ref(&self, name: String) -> ImageRef {
        ImageRef {
            url: format!("/v1/images/{name}"),
            name,
            width: self.width,
            height: self.height,
            seed: self.seed,
        }
    }
}

/// Runs one checked job on `model`, wherever it was submitted: the plan the planner picks for
/// it under `planning`'s budget, then its mode, telling `report` each event (`started`,
/// `phase`, `step`), then the PNG with the CLI's metadata and the job id. The caller sets the
/// model's [`Watch`] (cancellation, previews) around it. The server's runner and
/// `fluxfit worker` both run jobs through here, so they give the same image.
pub fn execute(
    model: &mut Model,
    planning: &Planning,
    work: &mut Work,
    job_id: &str,
    report: &mut dyn FnMut(&'static str, serde_json::Value),
) -> Outcome {
    match planning.choose(work) {
        Ok(Some(plan)) if plan.spec() != model.plan().spec() => model.set_plan(plan),
        Ok(_) => {}
        Err(e) => return Outcome::Failed(format!("{e:#}")),
    }
    report(
        "started",
        serde_json::json!({ "plan": model.plan().spec(), "width": work.req.width,
                            "height": work.req.height, "steps": work.req.steps,
                            "seed": work.req.seed }),
    );
    let started = Instant::now();
    let mut on_event = |e: Event| match e {
        Event::Phase(p) => report("phase", serde_json::json!({ "phase": p.name() })),
        Event::Step { step, total } => {
            let per_step = started.elapsed().as_secs_f64() / step as f64;
            report(
                "step",
                serde_json::json!({
                    "step": step, "total": total,
                    "rate": 1.0 / per_step.max(1e-9),
                    "eta_s": per_step * (total - step) as f64,
                }),
            );
        }
    };
    let made = match run_mode(model, work, &mut on_event) {
        Ok(m) => m,
        Err(fluxfit::Error::Cancelled { step, total }) => {
            return Outcome::Cancelled { step, total }
        }
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let encoded = (|| {
        let rgb = to_rgb8(&made.image)?;
        let mut meta = fluxfit::pipeline::metadata::metadata(model, &work.req);
        meta.extend(work.meta.iter().cloned());
        meta.push(("job".into(), job_id.to_string()));
        let png = encode(&rgb, Format::Png, &meta)?;
        Ok::<_, fluxfit::Error>(Encoded {
            png,
            width: rgb.width,
            height: rgb.height,
            seed: work.req.seed,
            peak: made.peak,
        })
    })();
    match encoded {
        Ok(e) => Outcome::Done(e),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// Writes a job's PNG into `dir` as `{job id}.png`, never replacing a file; returns the name.
/// The id is unique to a server's run; another process writing into the same folder could
/// still take the name, so the next free one is used then.
pub fn save_png(dir: &Path, job_id: &str, bytes: &[u8]) -> fluxfit::Result<String> {
    let mut name = format!("{job_id}.png");
    let mut n = 0;
    loop {
        match write_new(&dir.join(&name), bytes) {
            Err(_) if n < 100 && dir.join(&name).exists() => {
                n += 1;
                name = format!("{job_id}-{n}.png");
            }
            other => break other.map(|()| name),
        }
    }
}

/// What a finished run hands back: the image `[1, 3, H, W]` and its peak device memory.
pub struct Made {
    pub image: Tensor,
    pub peak: usize,
}

/// Runs the work's mode with the model's methods, as the CLI's commands do.
fn run_mode(
    model: &Model,
    work: &mut Work,
    on_event: &mut dyn FnMut(Event),
) -> fluxfit::Result<Made> {
    let req = &work.req;
    let made = |g: Generated| Made {
        peak: g.memory.peak,
        image: g.image,
    };
    match &mut work.input {
        Input::None => model.text_to_image(req, on_event).map(made),
        Input::Init(init) => model.image_to_image(req, init, None, on_event).map(made),
        Input::Control(image) => model.control(req, image, None, on_event).map(made),
        Input::Fill(image, mask) => model.fill(req, image, mask, None, on_event).map(made),
        Input::Edit(image) => model.kontext(req, image, None, on_event).map(made),
        Input::Regions {
            source,
            grid,
            refine,
            band,
        } => {
            let mode = model.region_mode(*refine)?;
            let (w, h) = (req.width, req.height);
            let mut canvas = match source {
                Some(s) => Canvas::from_rgb8(&resize_lanczos(s, w, h))?,
                None => Canvas::blank(w, h),
            };
            let canvas = &mut canvas;
            // Steps are counted over all regions, so the stream has one event per step.
            let mut done = 0;
            let count = grid.len();
            let runs = model.regions(req, canvas, grid, mode, *band, &mut |e| match e {
                RegionEvent::Region { index, .. } => done = index * req.steps,
                RegionEvent::Run(Event::Step { step, .. }) => on_event(Event::Step {
                    step: done + step,
                    total: count * req.steps,
                }),
                RegionEvent::Run(e) => on_event(e),
            })?;
            Ok(Made {
                image: canvas.image()?,
                peak: runs.iter().map(|r| r.memory.peak).max().unwrap_or(0),
            })
        }
    }
}

pub fn preview_event(p: &Preview) -> serde_json::Value {
    let png = encode(&p.image, Format::Png, &[]).unwrap_or_default();
    serde_json::json!({
        "step": p.step,
        "total": p.total,
        "width": p.image.width,
        "height": p.image.height,
        "png": format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(png)
        ),
    })
}
