//! `fluxfit plan`: what each residency plan needs on a device for a request, and the one that
//! fits a budget; and the `--vram` choice of `fluxfit generate`. Works without any weights for
//! the published variants (built-in manifests); a local folder or `tiny` uses its headers.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use fluxfit::checkpoint::quantize::QuantSpec;
use fluxfit::memory::plan::Component;
use fluxfit::pipeline::LoadOptions;
use fluxfit::planner::choice::{auto_storage, plan_candidates, storage_choices, Asked, Quant};
use fluxfit::planner::report::{render_storage, PlanView};
use fluxfit::planner::{candidates, Budget, DeviceProfile, ModelSpec, Workload};
use fluxfit::variant::Variant;

use crate::source::ModelArgs;

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image width in pixels [default: 1360, 256 for tiny].
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels [default: 768, 256 for tiny].
    #[arg(long)]
    pub height: Option<usize>,
    /// Device memory available, e.g. 12GB, 11.5GiB, 8000MB (binary units: a "12 GB" card has
    /// 12 GiB); `auto`: this machine's free GPU memory (nvidia-smi) or available RAM with
    /// `--device cpu` [default: the named card's memory].
    #[arg(long, value_name = "BUDGET")]
    pub vram: Option<String>,
    /// The device: `cuda` (a generic GPU with an RTX 3090's rates), a card (`rtx3060`,
    /// `rtx3070`, `rtx3090`, `rtx4060ti`, `rtx4090`, `a100`, `h100`) or `cpu` (this machine,
    /// measured).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// T5 sequence length [default: the variant's: 256 schnell, 512 dev, 128 fill].
    #[arg(long)]
    pub t5_tokens: Option<usize>,
    /// Denoising steps [default: the variant's].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Compute precision [default: bf16 on a GPU, f32 on the CPU].
    #[arg(long, value_enum)]
    pub dtype: Option<crate::run_args::DtypeArg>,
    /// Attention query-chunk length; 0 = unchunked.
    #[arg(long, default_value_t = fluxfit::model::attention::DEFAULT_CHUNK)]
    pub attn_chunk: usize,
    /// The request has a conditioning image (fill, canny, depth, kontext): the VAE encoder runs
    /// in the encode phase, and kontext doubles the image tokens.
    #[arg(long)]
    pub image_input: bool,
    /// Redux images the request mixes (FLUX.1-Redux-dev's SigLIP tower runs in the encode
    /// phase; each image adds 729 tokens to the text sequence of every step).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=8))]
    pub redux_images: u32,
    /// Storage of the flow and T5 weights: `stored` (as the files are; GGUF block-quantized
    /// weights may stay packed on the device; with a budget a table compares storage types),
    /// `auto` (also says which storage `generate --vram --quant auto` would take), `none`
    /// (never packed), or a type (`q8_0`, `q6_k`, `q5_k`, `q4_k`, ...) to plan as if the files
    /// were quantized to it (on load, or by `fluxfit quantize`).
    #[arg(long, default_value = "stored")]
    pub quant: Quant,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Allow sides above 4096 pixels (up to 16384) and T5 lengths above 512 (up to 4096), as
    /// `generate --allow-large` does.
    #[arg(long)]
    pub allow_large: bool,
    /// Also draw peak memory against resolution for each plan, and the picked plan's bars, as
    /// an SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub chart: Option<PathBuf>,
}

/// A model to plan for: built-in manifests for a published variant, headers otherwise (a local
/// folder or `tiny`; nothing is downloaded).
fn model_spec(m: &ModelArgs, options: LoadOptions) -> Result<ModelSpec> {
    if let Some(v) = m.published_variant() {
        let mut spec = ModelSpec::published(v);
        if let Some(forced) = m.variant()? {
            spec = ModelSpec::published(forced);
        }
        return Ok(spec);
    }
    let local =
        m.model == "tiny" || Path::new(&m.model).exists() || m.flow.is_some() || m.vae.is_some();
    if !local {
        bail!(
            "--model {}: `fluxfit plan` reads a local folder, `tiny` or a published variant ({}) and downloads nothing{}",
            m.model,
            Variant::ALL.map(|v| v.name()).join(", "),
            if !m.lora.is_empty() {
                "; with --lora it reads the weights' headers, so give a local folder or --flow"
            } else {
                ""
            }
        );
    }
    let model = m.load(options)?;
    Ok(ModelSpec::from_model(&model))
}

pub fn run(args: PlanArgs) -> Result<()> {
    // The bounds `generate` holds a run to, checked before anything is computed.
    use fluxfit::pipeline::request::{check_sides, check_t5_tokens, MAX_STEPS};
    let side = |v: Option<usize>| v.unwrap_or(fluxfit::pipeline::request::MIN_SIDE);
    check_sides(side(args.width), side(args.height), args.allow_large)
        .context("--width/--height")?;
    if let Some(t) = args.t5_tokens {
        check_t5_tokens(t, args.allow_large).context("--t5-tokens")?;
    }
    if let Some(n) = args.steps.filter(|&n| n == 0 || n > MAX_STEPS) {
        bail!("--steps {n}: denoising takes 1 to {MAX_STEPS} steps");
    }
    if let Some(path) = args.chart.as_deref().filter(|p| p.exists()) {
        bail!(
            "--chart {}: exists; fluxfit never replaces a file: remove it or choose another name",
            path.display()
        );
    }
    let device = DeviceProfile::named(&args.device)?;
    let dtype = crate::run_args::DtypeArg::resolve(args.dtype, device.is_cpu());
    let chunk = (args.attn_chunk > 0).then_some(args.attn_chunk);
    let options = LoadOptions {
        device: fluxfit::candle_core::Device::Cpu,
        dtype,
        attn_chunk: chunk,
        variant: args.model.variant()?,
        loras: Vec::new(),
        quantize: None,
    };
    let spec = model_spec(&args.model, options)?;
    let spec = match args.quant {
        Quant::Type(t) => spec.quantized(&QuantSpec::new(t)),
        _ => spec,
    };
    let req = Workload::asked(
        &spec,
        Asked {
            width: args.width,
            height: args.height,
            t5_tokens: args.t5_tokens,
            steps: args.steps,
            image_input: args.image_input,
            cond_size: None,
            redux_images: args.redux_images as usize,
        },
    );
    let budget = Budget::resolve(args.vram.as_deref(), &device, 0)?;
    let cands = plan_candidates(&spec, &candidates(&device, dtype, chunk), args.quant);
    let view = PlanView::new(spec, req, device, (dtype, chunk), cands, budget);
    let (spec, req, device, table, alts) = (
        &view.spec,
        &view.request,
        &view.device,
        &view.table,
        &view.alternatives,
    );
    let pick = view.pick();
    let storage = match (args.quant, budget) {
        (Quant::Stored | Quant::Auto, Some(b)) => {
            storage_choices(spec, req, device, dtype, chunk, b)
        }
        _ => Vec::new(),
    };
    if let Some(path) = &args.chart {
        write_chart(path, &view.chart())?;
    }
    if args.json {
        let v = serde_json::json!({
            "table": table,
            "budget": budget.map(|b| b.bytes),
            "reserve": device.reserve,
            "picked": pick.map(|r| &r.prediction),
            "alternatives": alts,
            "storage": storage.iter().map(|c| serde_json::json!({
                "storage": c.storage,
                "flow_bytes": c.flow_bytes,
                "t5_bytes": c.t5_bytes,
                "plan": c.plan.as_ref().map(|(label, spec, peak, relative)| serde_json::json!({
                    "label": label, "spec": spec, "peak": peak, "relative": relative,
                })),
                "error": c.error,
            })).collect::<Vec<_>>(),
        });
        crate::outln!("{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    crate::out!("{}", view.text())?;
    if !storage.is_empty() {
        crate::out!("{}", render_storage(&storage))?;
    }
    if let (Quant::Auto, Some(b)) = (args.quant, budget) {
        if !spec.packable(Component::Flow) {
            let base = candidates(device, dtype, chunk);
            match auto_storage(spec, req, device, &base, b) {
                Some((_, _, line)) => println!("--quant auto takes {line}"),
                None => println!("--quant auto: no storage fits"),
            }
        }
    }
    if let Some(path) = &args.chart {
        crate::outln!("chart: {}", path.display())?;
    }
    Ok(())
}

// ---- the chart ----

fn write_chart(path: &Path, svg: &str) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ext != "svg" {
        bail!(
            "--chart {}: only SVG is written (convert with e.g. `rsvg-convert -o chart.png {}`)",
            path.display(),
            path.with_extension("svg").display()
        );
    }
    // Never replaces a file, and appears whole or not at all.
    fluxfit::image::write_new(path, svg.as_bytes())
        .with_context(|| format!("--chart {}", path.display()))
}
