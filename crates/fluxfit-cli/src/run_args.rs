//! Flags and chores the generating commands share (`generate`, `fill`, `edit`, `regions`): the
//! model and how to run it (device, precision, plan or `--vram`), the sampling settings,
//! progress and output.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use fluxfit::candle_core::quantized::GgmlDType;
use fluxfit::candle_core::{DType, Device, Tensor};
use fluxfit::checkpoint::layout::ReduxPaths;
use fluxfit::image::{next_free_path, save, to_rgb8};
use fluxfit::memory::plan::Plan;
use fluxfit::noise::{random_seed, NoiseKind};
use fluxfit::pipeline::{Event, LoadOptions, Model, Request};
use fluxfit::planner::choice::{choose, gpu_index, Asked, Choosing, Quant};
use fluxfit::planner::{Budget, DeviceProfile, ModelSpec, Workload};
use indicatif::{ProgressBar, ProgressStyle};

use crate::source::ModelArgs;

/// What the planner needs to know of a run before the model is loaded.
pub struct Planning {
    /// The output size, where known (else the variant's default).
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// An image is VAE-encoded in the encode phase.
    pub image_input: bool,
    /// Its size where it is not the output's (Kontext).
    pub cond_size: Option<(usize, usize)>,
    /// Redux's encoder, attached before planning, and how many images it encodes.
    pub redux: Option<ReduxPaths>,
    pub redux_images: usize,
    pub quant: Quant,
    pub attn_chunk: Option<usize>,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Denoising steps [default: the variant's: 4 schnell, 50 dev and fill, 30 kontext].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Distilled guidance strength [default: the variant's: 2.5 dev and kontext, 30 fill and
    /// canny, 10 depth]; schnell ignores it.
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Noise seed [default: random, printed and recorded].
    #[arg(long)]
    pub seed: Option<u64>,
    /// T5 sequence length [default: the variant's: 256 schnell, 512 dev, 128 fill].
    #[arg(long)]
    pub t5_tokens: Option<usize>,
    /// Compute precision [default: f32 on the CPU, bf16 on a GPU].
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Where each component's weights live [default: resident]. Presets: `resident`, `phase`
    /// (each component on the device only during its phase), `stream[:GROUP[:WINDOW]]` (flow
    /// and T5 stream GROUP blocks at a time, WINDOW groups held, next group prefetched; default
    /// 1:2), `t5-cpu`, `packed` (GGUF weights kept packed on the device); or per component,
    /// e.g. `phase,flow=stream:2:3+packed,t5=cpu`.
    #[arg(long, value_name = "SPEC")]
    pub plan: Option<String>,
    /// Device memory budget, e.g. 12GB, 11.5GiB, 8000MB (binary units: a "12 GB" card has 12
    /// GiB), or `auto` (free GPU memory from nvidia-smi; available RAM on the CPU): runs the
    /// fastest plan predicted to fit one run (see `fluxfit plan`). A request no plan fits is
    /// refused before anything is downloaded or loaded, with the nearest alternatives.
    #[arg(long, value_name = "BUDGET", conflicts_with = "plan")]
    pub vram: Option<String>,
    /// Decode (and encode) the image in overlapping tiles of PX pixels a side (a multiple of 8,
    /// at least 64), blended linearly over the overlaps: memory is bounded by the tile.
    /// Overrides the tile of --plan or --vram; recorded in the metadata's plan.
    #[arg(long, value_name = "PX", value_parser = parse_vae_tile)]
    pub vae_tile: Option<usize>,
    /// Print only the output line.
    #[arg(short, long)]
    pub quiet: bool,
}

impl RunArgs {
    /// Opens the model under `--vram` (planned for one run of `width` × `height` with an
    /// image input), else `--plan` over all-resident; `--vae-tile` overrides either's tile.
    pub fn load(&self, (width, height): (usize, usize)) -> Result<Model> {
        self.load_planned(Planning {
            width: Some(width),
            height: Some(height),
            image_input: true,
            cond_size: None,
            redux: None,
            redux_images: 0,
            quant: Quant::Stored,
            attn_chunk: Some(fluxfit::model::attention::DEFAULT_CHUNK),
        })
    }

    /// Opens the model for a server or worker, which plan each job for itself: planned for
    /// the variant's default run, and `--vram`'s budget resolved for the jobs.
    pub fn load_for_jobs(&self) -> Result<(Model, Option<Budget>)> {
        let model = self.load_planned(Planning {
            width: None,
            height: None,
            image_input: false,
            cond_size: None,
            redux: None,
            redux_images: 0,
            quant: Quant::Stored,
            attn_chunk: Some(fluxfit::model::attention::DEFAULT_CHUNK),
        })?;
        let budget = match &self.vram {
            Some(v) => Budget::resolve(
                Some(v),
                &DeviceProfile::for_device(model.device()),
                gpu_index(model.device()),
            )?,
            None => None,
        };
        Ok((model, budget))
    }

    /// Opens the model under the plan `--vram` picks for the run `p` describes (a published
    /// variant is planned from its built-in manifests before anything is downloaded or loaded,
    /// another model once its headers are open), else `--plan` over all-resident;
    /// `--vae-tile` overrides either's tile.
    pub fn load_planned(&self, p: Planning) -> Result<Model> {
        // Bounds no option lifts, checked before planning or loading; the request's own
        // validation holds the rest.
        use fluxfit::pipeline::request::{MAX_STEPS, MAX_T5_TOKENS_LARGE};
        if let Some(n) = self.steps.filter(|&n| n == 0 || n > MAX_STEPS) {
            bail!("--steps {n}: denoising takes 1 to {MAX_STEPS} steps");
        }
        if let Some(n) = self
            .t5_tokens
            .filter(|&n| n == 0 || n > MAX_T5_TOKENS_LARGE)
        {
            bail!("--t5-tokens {n}: T5 takes 1 to 512 tokens (up to {MAX_T5_TOKENS_LARGE} with --allow-large)");
        }
        let device = parse_device(&self.device)?;
        let dtype = DtypeArg::resolve(self.dtype, device.is_cpu());
        let options = LoadOptions {
            device,
            dtype,
            attn_chunk: p.attn_chunk,
            ..LoadOptions::default()
        };
        let vram = self.vram.as_deref().map(|budget| VramRequest {
            vram: budget,
            device: &options.device,
            dtype,
            attn_chunk: p.attn_chunk,
            asked: Asked {
                width: p.width,
                height: p.height,
                steps: self.steps,
                t5_tokens: self.t5_tokens,
                image_input: p.image_input,
                cond_size: p.cond_size,
                redux_images: p.redux_images,
            },
            quant: p.quant,
            quiet: self.quiet,
        });
        let early = match &vram {
            Some(r) => vram_plan_before_load(&self.model, r)?,
            None => None,
        };
        let quantize = match (p.quant, &early) {
            (Quant::Type(t), _) => Some(t),
            (_, Some((_, on_load))) => *on_load,
            _ => None,
        };
        let mut model = self.model.load(LoadOptions {
            quantize,
            ..options.clone()
        })?;
        if let Some(paths) = &p.redux {
            model.attach_redux(paths)?;
        }
        let mut plan = match (&vram, early) {
            (_, Some((plan, _))) => plan,
            (Some(r), None) => {
                let (plan, on_load) = vram_plan_for_model(&model, r)?;
                if let (Some(t), None) = (on_load, quantize) {
                    model.quantize_on_load(t)?;
                }
                plan
            }
            (None, None) => {
                let mut base = Plan::resident(dtype, p.attn_chunk);
                // `--quant TYPE` alone: the weights kept packed in that type.
                if let Quant::Type(_) = p.quant {
                    base.flow.packed = true;
                    base.t5.packed = true;
                }
                match &self.plan {
                    Some(spec) => base
                        .with_spec(spec)
                        .with_context(|| format!("--plan {spec}"))?,
                    None => base,
                }
            }
        };
        if self.vae_tile.is_some() {
            plan.vae_tile = self.vae_tile;
        }
        model.set_plan(plan);
        Ok(model)
    }

    /// The request at `width` × `height` with the variant's defaults where no flag is given.
    pub fn request(&self, model: &Model, prompt: &str, width: usize, height: usize) -> Request {
        let v = model.variant;
        Request {
            prompt: prompt.to_string(),
            width,
            height,
            steps: self.steps.unwrap_or(v.default_steps()),
            guidance: self.guidance.unwrap_or(v.default_guidance()),
            seed: self.seed.unwrap_or_else(random_seed),
            t5_tokens: self.t5_tokens.unwrap_or(v.t5_tokens()),
            noise: NoiseKind::TorchBf16,
        }
    }
}

/// A step bar (hidden when quiet) and the event handler that drives it.
pub fn progress(quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(1);
    b.set_style(
        ProgressStyle::with_template("{msg:>8} [{bar:30}] {pos}/{len} steps  {per_sec}  eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    b
}

/// Moves `bar` along with a generation's events.
pub fn on_event(bar: &ProgressBar) -> impl FnMut(Event) + '_ {
    move |e| match e {
        Event::Phase(p) => bar.set_message(p.name()),
        Event::Step { step, total } => {
            bar.set_length(total as u64);
            bar.set_position(step as u64)
        }
    }
}

/// The file name of a path, for metadata (the full path may hold private folder names).
pub fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Writes `image` (`[1, 3, H, W]` in [−1, 1]) to `out`, or the next free name beside it, with
/// `meta`, and says so with `req`'s size and seed; returns the path written.
pub fn write_image(
    image: &Tensor,
    out: &Path,
    meta: &[(String, String)],
    req: &Request,
) -> Result<PathBuf> {
    let rgb = to_rgb8(image)?;
    let path = next_free_path(out);
    save(&rgb, &path, meta)?;
    crate::outln!(
        "wrote {} ({}x{}, seed {})",
        path.display(),
        rgb.width,
        rgb.height,
        req.seed
    )?;
    Ok(path)
}

/// What an interactive loop asks of its command.
pub enum LoopEvent<'a> {
    /// `/name value` other than the ones every loop has (`/s`, `/g`, `/n`, `/q`, `/help`),
    /// with the request to change; answer whether it was understood.
    Command {
        name: &'a str,
        value: &'a str,
        req: &'a mut Request,
    },
    /// Generate this request (its prompt and seed set).
    Run(&'a Request),
}

/// The reference's `--loop` over `req`: prompts from stdin (an empty line repeats the last
/// one), `/s <seed>` for the next image (otherwise random: the seed is reset after each),
/// `/g <x>` guidance, `/n <steps>`, `/q` to quit, `/help` (or an unknown command) for `help`;
/// everything else goes to `step`, whose errors are printed without ending the loop.
pub fn interactive_loop(
    help: &str,
    mut req: Request,
    seed: Option<u64>,
    mut step: impl FnMut(LoopEvent) -> Result<bool>,
) -> Result<()> {
    use std::io::{BufRead, Write};
    let stdin = std::io::stdin();
    let mut next_seed = seed;
    errln!("{help}");
    loop {
        err!("> ");
        std::io::stderr().flush().ok();
        let mut bytes = Vec::new();
        if stdin.lock().read_until(b'\n', &mut bytes)? == 0 {
            return Ok(());
        }
        // A line that is not UTF-8 is refused, not the end of the session.
        let Ok(line) = String::from_utf8(bytes) else {
            errln!("that line is not valid UTF-8 text; ignored");
            continue;
        };
        let line = line.trim();
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, value) = cmd.split_once(' ').unwrap_or((cmd, ""));
            let value = value.trim();
            match name {
                "q" => return Ok(()),
                "s" => {
                    if let Some(n) = loop_integer(name, value, "the seed") {
                        next_seed = Some(n);
                    }
                }
                "g" => {
                    if let Some(n) = loop_number(name, value, "the guidance") {
                        req.guidance = n as f32;
                    }
                }
                "n" => {
                    if let Some(n) = loop_integer(name, value, "the steps") {
                        req.steps = usize::try_from(n).unwrap_or(usize::MAX);
                    }
                }
                "help" => errln!("{help}"),
                _ => match step(LoopEvent::Command {
                    name,
                    value,
                    req: &mut req,
                }) {
                    Ok(true) => {}
                    Ok(false) => errln!("{help}"),
                    Err(e) => errln!("error: {e:#}"),
                },
            }
            continue;
        }
        if !line.is_empty() {
            req.prompt = line.to_string();
        }
        req.seed = next_seed.take().unwrap_or_else(random_seed);
        if let Err(e) = step(LoopEvent::Run(&req)) {
            errln!("error: {e:#}");
        }
    }
}

/// The finite number a loop command takes, or `None` after saying what was wrong.
pub fn loop_number(name: &str, value: &str, what: &str) -> Option<f64> {
    let n = value.parse::<f64>().ok().filter(|n| n.is_finite());
    if n.is_none() {
        errln!("/{name} needs a number for {what}; got `{value}`");
    }
    n
}

/// The whole number (0 to 2⁶⁴ − 1, read exactly, not through a float) a loop command takes, or
/// `None` after saying what was wrong.
pub fn loop_integer(name: &str, value: &str, what: &str) -> Option<u64> {
    let n = value.parse::<u64>().ok();
    if n.is_none() {
        errln!(
            "/{name} needs a whole number from 0 to {} for {what}; got `{value}`",
            u64::MAX
        );
    }
    n
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
    F16,
}

impl DtypeArg {
    /// The compute dtype: the one asked for, else f32 on the CPU (candle's fast path there)
    /// and bf16 on a GPU (the reference's precision).
    pub fn resolve(arg: Option<Self>, on_cpu: bool) -> DType {
        match arg {
            Some(Self::F32) => DType::F32,
            Some(Self::Bf16) => DType::BF16,
            Some(Self::F16) => DType::F16,
            None if on_cpu => DType::F32,
            None => DType::BF16,
        }
    }
}

pub fn parse_device(s: &str) -> Result<Device> {
    let dev = match s {
        "cpu" => Device::Cpu,
        "metal" => Device::new_metal(0).context("--device metal")?,
        _ => match s.strip_prefix("cuda") {
            Some("") => fluxfit::memory::open_cuda(0).context("--device cuda")?,
            Some(n) => {
                let idx: usize = n
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .with_context(|| format!("--device {s}: expected cuda or cuda:N"))?;
                fluxfit::memory::open_cuda(idx).with_context(|| format!("--device {s}"))?
            }
            None => bail!("--device {s}: expected cpu, cuda, cuda:N or metal"),
        },
    };
    Ok(dev)
}

pub(crate) fn parse_vae_tile(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 64 && n.is_multiple_of(8) => Ok(n),
        _ => Err(format!(
            "`{s}` is not a VAE tile side: a whole number of pixels, a multiple of 8, at least 64"
        )),
    }
}

// ---- --vram ----

/// What `generate --vram` knows of the request before the model is loaded.
pub struct VramRequest<'a> {
    pub vram: &'a str,
    pub device: &'a fluxfit::candle_core::Device,
    pub dtype: fluxfit::candle_core::DType,
    pub attn_chunk: Option<usize>,
    /// The request as far as it is known.
    pub asked: Asked,
    /// Which storage the plan may use (`--quant`).
    pub quant: Quant,
    pub quiet: bool,
}

/// The plan, and the type the weights are quantized to on load.
pub type VramChoice = (Plan, Option<GgmlDType>);

/// The plan `--vram` picks for a published variant named by `--model`, decided before anything
/// is downloaded or loaded; `None` when `--model` is not a variant name (the model's own headers
/// are then read after it is opened: see [`vram_plan_for_model`]). A request no plan fits is an
/// error naming the nearest alternatives.
pub fn vram_plan_before_load(m: &ModelArgs, r: &VramRequest) -> Result<Option<VramChoice>> {
    match m.published_variant() {
        Some(v) => pick_plan(&ModelSpec::published(m.variant()?.unwrap_or(v)), r).map(Some),
        None => Ok(None),
    }
}

/// The plan `--vram` picks for an opened model (its weights are not read yet).
pub fn vram_plan_for_model(model: &Model, r: &VramRequest) -> Result<VramChoice> {
    pick_plan(&ModelSpec::from_model(model), r)
}

fn pick_plan(spec: &ModelSpec, r: &VramRequest) -> Result<VramChoice> {
    let device = DeviceProfile::for_device(r.device);
    let request = Workload::asked(spec, r.asked);
    let budget =
        Budget::resolve(Some(r.vram), &device, gpu_index(r.device))?.expect("a budget was given");
    let choice = choose(
        spec,
        &Choosing {
            request,
            device,
            budget,
            dtype: r.dtype,
            attn_chunk: r.attn_chunk,
            quant: r.quant,
        },
    )?;
    if !r.quiet {
        errln!("{}", choice.why);
    }
    Ok((choice.plan, choice.quantize_on_load))
}
