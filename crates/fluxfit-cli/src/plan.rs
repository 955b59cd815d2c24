//! `fluxfit plan`: what each residency plan needs on a device for a request, and the one that
//! fits a budget; and the `--vram` choice of `fluxfit generate`. Works without any weights for
//! the published variants (built-in manifests); a local folder or `tiny` uses its headers.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use fluxfit::candle_core::quantized::GgmlDType;
use fluxfit::checkpoint::quantize::QuantSpec;
use fluxfit::memory::plan::{ComponentKind, Plan};
use fluxfit::pipeline::{LoadOptions, Model};
use fluxfit::planner::choice::{
    auto_storage, choose, default_size, gpu_index, plan_candidates, storage_choices, Choosing,
    Quant,
};
use fluxfit::planner::report::{chart, render_storage, render_table};
use fluxfit::planner::{
    alternatives, candidates, Budget, DeviceProfile, ModelSpec, PlanTable, Request,
};
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
    pub dtype: Option<crate::generate::DtypeArg>,
    /// Attention query-chunk length; 0 = unchunked.
    #[arg(long, default_value_t = fluxfit::model::attention::DEFAULT_CHUNK)]
    pub attn_chunk: usize,
    /// The request has a conditioning image (fill, canny, depth, kontext): the VAE encoder runs
    /// in the encode phase, and kontext doubles the image tokens.
    #[arg(long)]
    pub image_input: bool,
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
    /// Also draw peak memory against resolution for each plan, and the picked plan's bars, as
    /// an SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub chart: Option<PathBuf>,
}

/// The published variant `--model` names (a variant name or its official repo id), when no
/// local folder or part overrides it: planned from built-in manifests, nothing downloaded.
/// A LoRA's tensors are only known from its file, so `--lora` plans from headers.
fn published_variant(m: &ModelArgs) -> Option<Variant> {
    let parts = m.flow.is_some()
        || m.ae.is_some()
        || m.t5.is_some()
        || m.clip.is_some()
        || m.lora.is_some();
    if parts || m.model == "tiny" || Path::new(&m.model).exists() {
        return None;
    }
    Variant::from_name(&m.model).ok().or_else(|| {
        Variant::ALL
            .into_iter()
            .find(|v| v.repo_id().eq_ignore_ascii_case(&m.model))
    })
}

/// A model to plan for: built-in manifests for a published variant, headers otherwise (a local
/// folder or `tiny`; nothing is downloaded).
fn model_spec(m: &ModelArgs, options: LoadOptions) -> Result<ModelSpec> {
    if let Some(v) = published_variant(m) {
        let mut spec = ModelSpec::published(v);
        if let Some(forced) = m.variant()? {
            spec = ModelSpec::published(forced);
        }
        return Ok(spec);
    }
    let local =
        m.model == "tiny" || Path::new(&m.model).exists() || m.flow.is_some() || m.ae.is_some();
    if !local {
        bail!(
            "--model {}: `fluxfit plan` reads a local folder, `tiny` or a published variant ({}) and downloads nothing{}",
            m.model,
            Variant::ALL.map(|v| v.name()).join(", "),
            if m.lora.is_some() {
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
    let device = DeviceProfile::named(&args.device)?;
    let dtype = crate::generate::DtypeArg::resolve(args.dtype, device.is_cpu());
    let chunk = (args.attn_chunk > 0).then_some(args.attn_chunk);
    let options = LoadOptions {
        device: fluxfit::candle_core::Device::Cpu,
        dtype,
        attn_chunk: chunk,
        variant: args.model.variant()?,
        lora: None,
        quantize: None,
    };
    let spec = model_spec(&args.model, options)?;
    let spec = match args.quant {
        Quant::Type(t) => spec.quantized(&QuantSpec::new(t)),
        _ => spec,
    };
    let (dw, dh) = default_size(&spec);
    let req = Request {
        width: args.width.unwrap_or(dw) / 16 * 16,
        height: args.height.unwrap_or(dh) / 16 * 16,
        t5_tokens: args.t5_tokens.unwrap_or(spec.variant.t5_tokens()),
        steps: args.steps.unwrap_or(spec.variant.default_steps()),
        image_input: args.image_input,
        cond_size: None,
    };
    if req.width < 64 || req.height < 64 {
        bail!("--width and --height must be at least 64 pixels");
    }
    let budget = Budget::resolve(args.vram.as_deref(), &device, 0)?;
    let cands = plan_candidates(&spec, &candidates(&device, dtype, chunk), args.quant);
    let table = PlanTable::new(&spec, &req, &device, &cands);
    let pick = budget.and_then(|b| table.fastest_fitting(b, &device));
    let storage = match (args.quant, budget) {
        (Quant::Stored | Quant::Auto, Some(b)) => {
            storage_choices(&spec, &req, &device, dtype, chunk, b)
        }
        _ => Vec::new(),
    };
    let alts = match (budget, pick) {
        (Some(b), None) => alternatives(&spec, &req, &device, &cands, b),
        _ => Vec::new(),
    };
    if let Some(path) = &args.chart {
        let svg = chart(&spec, &req, &device, &cands, &table, budget, pick);
        write_chart(path, &svg)?;
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
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print!(
        "{}",
        render_table(&spec, &req, &device, dtype, chunk, &table, budget, pick, &alts)
    );
    if !storage.is_empty() {
        print!("{}", render_storage(&storage));
    }
    if let (Quant::Auto, Some(b)) = (args.quant, budget) {
        if !spec.packable(ComponentKind::Flow) {
            let base = candidates(&device, dtype, chunk);
            match auto_storage(&spec, &req, &device, &base, b) {
                Some((_, _, line)) => println!("--quant auto takes {line}"),
                None => println!("--quant auto: no storage fits"),
            }
        }
    }
    if let Some(path) = &args.chart {
        println!("chart: {}", path.display());
    }
    Ok(())
}

// ---- generate --vram ----

/// What `generate --vram` knows of the request before the model is loaded.
pub struct VramRequest<'a> {
    pub vram: &'a str,
    pub device: &'a fluxfit::candle_core::Device,
    pub dtype: fluxfit::candle_core::DType,
    pub attn_chunk: Option<usize>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: Option<usize>,
    pub t5_tokens: Option<usize>,
    /// An image is encoded too: the VAE encoder's phase joins the plan.
    pub image_input: bool,
    /// The conditioning image's size where it is not the output's (Kontext).
    pub cond_size: Option<(usize, usize)>,
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
    match published_variant(m) {
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
    let (dw, dh) = default_size(spec);
    let request = Request {
        width: r.width.unwrap_or(dw) / 16 * 16,
        height: r.height.unwrap_or(dh) / 16 * 16,
        t5_tokens: r.t5_tokens.unwrap_or(spec.variant.t5_tokens()),
        steps: r.steps.unwrap_or(spec.variant.default_steps()),
        image_input: r.image_input,
        cond_size: r.cond_size,
    };
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
        eprintln!("{}", choice.why);
    }
    Ok((choice.plan, choice.quantize_on_load))
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
    std::fs::write(path, svg).with_context(|| format!("--chart {}", path.display()))
}
