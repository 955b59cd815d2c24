//! Flags and chores shared by the commands that take image inputs (`fill`, `edit`, `regions`):
//! the model and how to run it, the sampling settings, progress and output.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use fluxfit::candle_core::Tensor;
use fluxfit::image::{next_free_path, save, to_rgb8};
use fluxfit::memory::plan::Plan;
use fluxfit::noise::NoiseKind;
use fluxfit::pipeline::{Event, LoadOptions, Model, Text2Image};
use indicatif::{ProgressBar, ProgressStyle};

use crate::generate::{parse_device, parse_vae_tile, random_seed, DtypeArg};
use crate::plan::{vram_plan_before_load, vram_plan_for_model, VramRequest};
use crate::source::ModelArgs;

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Denoising steps [default: the variant's: 50 fill, 30 kontext].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Distilled guidance [default: the variant's: 30 fill, 2.5 kontext].
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Noise seed [default: random, printed and recorded].
    #[arg(long)]
    pub seed: Option<u64>,
    /// T5 sequence length [default: the variant's: 128 fill, 512 kontext].
    #[arg(long)]
    pub t5_tokens: Option<usize>,
    /// Compute precision [default: f32 on the CPU, bf16 on a GPU].
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Where each component's weights live (as `generate --plan`).
    #[arg(long, value_name = "SPEC")]
    pub plan: Option<String>,
    /// Device memory budget (as `generate --vram`): runs the fastest plan predicted to fit one
    /// run of this command, image encoding included.
    #[arg(long, value_name = "BUDGET", conflicts_with = "plan")]
    pub vram: Option<String>,
    /// Decode (and encode) in overlapping tiles of PX pixels a side.
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
        let device = parse_device(&self.device)?;
        let dtype = DtypeArg::resolve(self.dtype, device.is_cpu());
        let options = LoadOptions {
            device,
            dtype,
            ..LoadOptions::default()
        };
        let vram = self.vram.as_deref().map(|budget| VramRequest {
            vram: budget,
            device: &options.device,
            dtype,
            attn_chunk: options.attn_chunk,
            width: Some(width),
            height: Some(height),
            steps: self.steps,
            t5_tokens: self.t5_tokens,
            image_input: true,
            quant: crate::plan::Quant::Auto,
            quiet: self.quiet,
        });
        let early = match &vram {
            Some(r) => vram_plan_before_load(&self.model, r)?,
            None => None,
        };
        let mut model = self.model.load(options.clone())?;
        let mut plan = match (&vram, early) {
            (_, Some(p)) => p,
            (Some(r), None) => vram_plan_for_model(&model, r)?,
            (None, None) => {
                let base = Plan::resident(dtype, options.attn_chunk);
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
    pub fn request(&self, model: &Model, prompt: &str, width: usize, height: usize) -> Text2Image {
        let v = model.variant;
        Text2Image {
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
        Event::Phase(p) => bar.set_message(p),
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
/// `meta`; returns the path written.
pub fn write_image(image: &Tensor, out: &Path, meta: &[(String, String)]) -> Result<PathBuf> {
    let rgb = to_rgb8(image)?;
    let path = next_free_path(out);
    save(&rgb, &path, meta)?;
    Ok(path)
}
