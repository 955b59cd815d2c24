//! `fluxfit plan`: what each residency plan needs on a device for a request, and the one that
//! fits a budget; and the `--vram` choice of `fluxfit generate`. Works without any weights for
//! the published variants (built-in manifests); a local folder or `tiny` uses its headers.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use fluxfit::candle_core::quantized::GgmlDType;
use fluxfit::candle_core::DType;
use fluxfit::checkpoint::gguf;
use fluxfit::checkpoint::quantize::{measured_error, QuantSpec};
use fluxfit::memory::plan::{ComponentKind, Plan};
use fluxfit::pipeline::{LoadOptions, Model};
use fluxfit::planner::{
    self, alternatives, candidates, format_bytes, Budget, Candidate, DeviceProfile, ModelSpec,
    PlanTable, Prediction, Request, Row,
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
    #[arg(long, default_value = "stored", value_parser = parse_quant)]
    pub quant: Quant,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also draw peak memory against resolution for each plan, and the picked plan's bars, as
    /// an SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub chart: Option<PathBuf>,
}

/// `--quant`: which storage of the flow and T5 weights the planner may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Quant {
    /// As the files are, never packed on the device.
    None,
    /// As the files are; GGUF block types may stay packed on the device.
    Stored,
    /// The user allows quantizing dense files on load: the least lossy storage whose fastest
    /// fitting plan is within [`AUTO_SLACK`] of the fastest of all.
    Auto,
    /// Stored in this type (dense files quantized to it on load).
    Type(GgmlDType),
}

/// How much slower than the fastest storage `--quant auto` accepts for better quality.
pub const AUTO_SLACK: f64 = 1.10;

/// The types `--quant auto` may quantize to: q3_k and below lose too much (flow output error
/// 0.19 and more) to be taken without being asked for.
const AUTO_CHOICES: [GgmlDType; 4] = [
    GgmlDType::Q8_0,
    GgmlDType::Q6K,
    GgmlDType::Q5K,
    GgmlDType::Q4K,
];

pub fn parse_quant(s: &str) -> std::result::Result<Quant, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "none" => Ok(Quant::None),
        "stored" => Ok(Quant::Stored),
        "auto" => Ok(Quant::Auto),
        t => gguf::parse_type(t)
            .map(Quant::Type)
            .map_err(|e| format!("{e}; or stored, auto, none")),
    }
}

/// The storage types `plan --quant auto` compares, best quality first.
const STORAGE_CHOICES: [GgmlDType; 5] = [
    GgmlDType::Q8_0,
    GgmlDType::Q6K,
    GgmlDType::Q5K,
    GgmlDType::Q4K,
    GgmlDType::Q3K,
];

/// The plans to consider for `spec` under `quant`: packed variants where its files (or the
/// asked type) are block-quantized and packing is allowed.
fn plan_candidates(spec: &ModelSpec, cands: &[Candidate], quant: Quant) -> Vec<Candidate> {
    match quant {
        Quant::None => cands.to_vec(),
        _ => planner::with_packed(cands, spec),
    }
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

fn profile(name: &str) -> Result<DeviceProfile> {
    match name {
        "cpu" => Ok(DeviceProfile::cpu()),
        "cuda" | "gpu" => Ok(DeviceProfile::generic_cuda(None)),
        n => DeviceProfile::gpu(n).with_context(|| {
            format!(
                "--device {n}: expected cpu, cuda or one of {}",
                DeviceProfile::gpu_names().join(", ")
            )
        }),
    }
}

/// `--vram`: a size, or `auto` (of GPU `gpu`).
pub fn budget(vram: Option<&str>, device: &DeviceProfile, gpu: usize) -> Result<Option<Budget>> {
    let bytes = match vram {
        None => device.memory,
        Some("auto") => Some(auto_budget(device, gpu)?),
        Some(s) => Some(planner::parse_bytes(s).with_context(|| format!("--vram {s}"))?),
    };
    Ok(bytes.map(|bytes| Budget { bytes }))
}

/// Free memory now: the GPU's free memory (nvidia-smi) less nothing more than the profile's
/// reserve (taken when fitting), or the CPU's available RAM.
fn auto_budget(device: &DeviceProfile, gpu: usize) -> Result<u64> {
    if device.is_cpu() {
        return planner::available_ram()
            .context("--vram auto: cannot read MemAvailable from /proc/meminfo; give a size");
    }
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.free",
            "--format=csv,noheader,nounits",
            "-i",
            &gpu.to_string(),
        ])
        .output()
        .context("--vram auto: nvidia-smi is not available to read the free GPU memory; give a size such as --vram 12GB")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mib: u64 = text
        .trim()
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .parse()
        .with_context(|| {
            format!(
                "--vram auto: cannot read nvidia-smi's free memory from `{}`",
                text.trim()
            )
        })?;
    Ok(mib << 20)
}

pub fn run(args: PlanArgs) -> Result<()> {
    let device = profile(&args.device)?;
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
    let tiny = spec.name.starts_with("tiny");
    let (dw, dh) = if tiny { (256, 256) } else { (1360, 768) };
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
    let budget = budget(args.vram.as_deref(), &device, 0)?;
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
        render(&spec, &req, &device, dtype, chunk, &table, budget, pick, &alts)
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

fn dtype_name(d: DType) -> &'static str {
    d.as_str()
}

fn secs(t: f64) -> String {
    if t >= 7200.0 {
        format!("{:.1} h", t / 3600.0)
    } else if t >= 100.0 {
        format!("{t:.0} s")
    } else if t >= 1.0 {
        format!("{t:.1} s")
    } else {
        format!("{:.0} ms", t * 1e3)
    }
}

#[allow(clippy::too_many_arguments)]
fn render(
    spec: &ModelSpec,
    req: &Request,
    device: &DeviceProfile,
    dtype: DType,
    chunk: Option<usize>,
    table: &PlanTable,
    budget: Option<Budget>,
    pick: Option<&Row>,
    alts: &[planner::Alternative],
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} ({}), {}x{}, {} T5 tokens, {} steps, {}, attention chunk {}{}",
        spec.name,
        spec.variant,
        req.width,
        req.height,
        req.t5_tokens,
        req.steps,
        dtype_name(dtype),
        chunk.map_or("none".to_string(), |c| c.to_string()),
        if req.image_input {
            ", with a conditioning image"
        } else {
            ""
        },
    );
    let weights: Vec<String> = ComponentKind::ALL
        .iter()
        .map(|k| {
            format!(
                "{} {}",
                k.name(),
                format_bytes(spec.manifest(*k).storage_bytes() as u64)
            )
        })
        .collect();
    let _ = writeln!(s, "weights in storage: {}", weights.join(", "));
    let _ = writeln!(
        s,
        "device: {}{}",
        device.description,
        match budget {
            Some(b) if device.reserve > 0 => format!(
                "; budget {} ({} of it kept in reserve)",
                format_bytes(b.bytes),
                format_bytes(device.reserve)
            ),
            Some(b) => format!("; budget {}", format_bytes(b.bytes)),
            None => "; no budget given (--vram)".into(),
        }
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<44} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>6}  fits",
        "plan", "encode", "denoise", "decode", "peak", "host", "time", "next", "×res."
    );
    for r in &table.rows {
        let p = &r.prediction;
        let ph = |n: &str| p.phase(n).map_or("-".into(), |x| format_bytes(x.total));
        let fits = match (budget, r.needs) {
            (_, Some(need)) => format!("needs {need}"),
            (Some(b), None) if b.fits(p, device) => "yes".into(),
            (Some(_), None) => "no".into(),
            (None, None) => "".into(),
        };
        let _ = writeln!(
            s,
            "{:<44} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>6.2}  {}",
            p.label,
            ph("encode"),
            ph("denoise"),
            ph("decode"),
            format_bytes(p.peak),
            if p.host_peak > 0 {
                format_bytes(p.host_peak)
            } else {
                "-".into()
            },
            secs(p.time_s),
            secs(p.warm_time_s),
            r.relative,
            fits
        );
    }
    let _ = writeln!(s);
    match (budget, pick) {
        (Some(_), Some(r)) => {
            let _ = writeln!(
                s,
                "picked: {} — peak {}, about {} per image ({:.2}× all-resident)\n  fluxfit generate --plan {}",
                r.prediction.label,
                format_bytes(r.prediction.peak),
                secs(r.prediction.time_s),
                r.relative,
                r.prediction.spec
            );
        }
        (Some(b), None) => {
            let smallest = table.smallest().map(|r| &r.prediction);
            let _ = writeln!(
                s,
                "no plan fits {}{}",
                format_bytes(b.bytes),
                smallest.map_or(String::new(), |p| format!(
                    ": the smallest, `{}`, needs {} plus {} reserved",
                    p.label,
                    format_bytes(p.peak),
                    format_bytes(device.reserve)
                ))
            );
            if !alts.is_empty() {
                let _ = writeln!(s, "nearest alternatives:");
                for a in alts {
                    let _ = writeln!(
                        s,
                        "  - {} (peak {}){}",
                        a.description,
                        format_bytes(a.peak),
                        a.needs
                            .map_or(String::new(), |n| format!(" — once fluxfit has {n}"))
                    );
                }
            }
        }
        (None, _) => {
            let _ = writeln!(s, "give --vram BUDGET (or --device CARD) to pick a plan");
        }
    }
    s
}

/// One storage type of the flow and T5 weights, and the fastest plan it allows in a budget.
#[derive(Debug, Clone)]
pub struct StorageChoice {
    pub storage: String,
    pub flow_bytes: u64,
    pub t5_bytes: u64,
    /// The fastest fitting plan's label, spec, peak and time relative to the files' storage
    /// all-resident; `None` when nothing fits.
    pub plan: Option<(String, String, u64, f64)>,
    /// The flow output's measured relative error for this type (README "Error and speed").
    pub error: Option<f64>,
}

/// The files' storage and each of [`STORAGE_CHOICES`]: what fits `budget` and how fast.
fn storage_choices(
    spec: &ModelSpec,
    req: &Request,
    device: &DeviceProfile,
    dtype: DType,
    chunk: Option<usize>,
    budget: Budget,
) -> Vec<StorageChoice> {
    let base = candidates(device, dtype, chunk);
    let stored = spec.manifest(ComponentKind::Flow);
    let stored_name = match stored.entries.iter().find_map(|e| e.ggml) {
        Some(_) => format!("as stored ({})", stored.origin),
        None => format!("as stored ({})", stored.storage_dtype().as_str()),
    };
    let stored_error = measured_error(stored.storage_dtype().as_str());
    let reference = PlanTable::new(spec, req, device, &base).resident_time_s;
    let mut specs = vec![(stored_name, spec.clone(), stored_error)];
    for t in STORAGE_CHOICES {
        let name = gguf::type_name(t);
        specs.push((
            name.to_string(),
            spec.quantized(&QuantSpec::new(t)),
            measured_error(name),
        ));
    }
    specs
        .into_iter()
        .map(|(storage, s, error)| {
            let table = PlanTable::new(&s, req, device, &planner::with_packed(&base, &s));
            StorageChoice {
                storage,
                flow_bytes: s.manifest(ComponentKind::Flow).storage_bytes() as u64,
                t5_bytes: s.manifest(ComponentKind::T5).storage_bytes() as u64,
                plan: table.fastest_fitting(budget, device).map(|r| {
                    (
                        r.prediction.label.clone(),
                        r.prediction.spec.clone(),
                        r.prediction.peak,
                        r.prediction.time_s / reference,
                    )
                }),
                error,
            }
        })
        .collect()
}

fn render_storage(choices: &[StorageChoice]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nstorage of the flow and T5 weights in this budget (--quant TYPE plans one; `fluxfit quantize` writes it):"
    );
    let _ = writeln!(
        s,
        "{:<28} {:>9} {:>9}  {:<52} {:>9} {:>6} {:>9}",
        "storage", "flow", "t5", "fastest plan that fits", "peak", "×res.", "error"
    );
    for c in choices {
        let (label, peak, rel) = match &c.plan {
            Some((label, _, peak, rel)) => {
                (label.clone(), format_bytes(*peak), format!("{rel:.2}"))
            }
            None => ("none fits".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            s,
            "{:<28} {:>9} {:>9}  {:<52} {:>9} {:>6} {:>9}",
            c.storage,
            format_bytes(c.flow_bytes),
            format_bytes(c.t5_bytes),
            label,
            peak,
            rel,
            c.error.map_or("-".into(), |e| format!("{e:.1e}"))
        );
    }
    let _ = writeln!(
        s,
        "(the error column: the flow output's relative L2 error against f32 weights, measured on a mid-size model; README \"Error and speed\")"
    );
    s
}

// ---- generate --vram ----

/// What `generate --vram` needs to know of the request before the model is loaded.
pub struct VramRequest<'a> {
    pub vram: &'a str,
    pub device: &'a fluxfit::candle_core::Device,
    pub dtype: DType,
    pub attn_chunk: Option<usize>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: Option<usize>,
    pub t5_tokens: Option<usize>,
    /// An image is encoded too (img2img): the VAE encoder's phase joins the plan.
    pub image_input: bool,
    /// The conditioning image's size where it is not the output's (Kontext).
    pub cond_size: Option<(usize, usize)>,
    /// Which storage the plan may use (`--quant`).
    pub quant: Quant,
    pub quiet: bool,
}

fn generate_profile(device: &fluxfit::candle_core::Device) -> DeviceProfile {
    if device.is_cpu() {
        DeviceProfile::cpu()
    } else {
        DeviceProfile::generic_cuda(None)
    }
}

/// What `--vram` decided: the plan, and the type the flow and T5 weights are quantized to on
/// load when the files are dense (`--quant TYPE`, or `auto` when nothing fits as stored).
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
    let device = generate_profile(r.device);
    let tiny = spec.name.starts_with("tiny");
    let (dw, dh) = if tiny { (256, 256) } else { (1360, 768) };
    let req = Request {
        width: r.width.unwrap_or(dw) / 16 * 16,
        height: r.height.unwrap_or(dh) / 16 * 16,
        t5_tokens: r.t5_tokens.unwrap_or(spec.variant.t5_tokens()),
        steps: r.steps.unwrap_or(spec.variant.default_steps()),
        image_input: r.image_input,
        cond_size: r.cond_size,
    };
    let gpu = match r.device.location() {
        fluxfit::candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
        _ => 0,
    };
    let budget = budget(Some(r.vram), &device, gpu)?.expect("a budget was given");
    // `--quant TYPE` on dense files: planned as they will be once quantized on load.
    let quantized;
    let (spec, on_load) = match r.quant {
        Quant::Type(t) if !spec.packable(ComponentKind::Flow) => {
            quantized = spec.quantized(&QuantSpec::new(t));
            (&quantized, Some(t))
        }
        _ => (spec, None),
    };
    let cands = plan_candidates(spec, &candidates(&device, r.dtype, r.attn_chunk), r.quant);
    let table = PlanTable::new(spec, &req, &device, &cands);
    if r.quant == Quant::Auto && !spec.packable(ComponentKind::Flow) {
        if let Some((plan, t, line)) = auto_storage(spec, &req, &device, &cands, budget) {
            if !r.quiet {
                eprintln!("--vram {}: {line}", format_bytes(budget.bytes));
            }
            return Ok((plan, t));
        }
    }
    match table.fastest_fitting(budget, &device) {
        Some(row) => {
            if !r.quiet {
                eprintln!(
                    "--vram {}: plan `{}` (predicted peak {}, {:.2}× the all-resident time) — --plan {}",
                    format_bytes(budget.bytes),
                    row.prediction.label,
                    format_bytes(row.prediction.peak),
                    row.relative,
                    row.prediction.spec
                );
            }
            Ok((row.prediction.plan.clone(), on_load))
        }
        None => {
            let alts = alternatives(spec, &req, &device, &cands, budget);
            let smallest = table.smallest().map(|r| &r.prediction);
            let mut msg = format!(
                "no plan fits {}x{} of {} in {}",
                req.width,
                req.height,
                spec.name,
                format_bytes(budget.bytes)
            );
            if let Some(p) = smallest {
                let _ = write!(
                    msg,
                    ": the smallest plan, `{}`, needs {}{}",
                    p.label,
                    format_bytes(p.peak),
                    if device.reserve > 0 {
                        format!(" plus {} kept in reserve", format_bytes(device.reserve))
                    } else {
                        String::new()
                    }
                );
            }
            if !alts.is_empty() {
                msg += "; nearest alternatives:";
                for a in &alts {
                    let _ = write!(
                        msg,
                        "\n  - {} (peak {}){}",
                        a.description,
                        format_bytes(a.peak),
                        a.needs
                            .map_or(String::new(), |n| format!(" — once fluxfit has {n}"))
                    );
                }
            }
            bail!(msg)
        }
    }
}

/// `--quant auto` on dense files: for the files as stored and each of [`AUTO_CHOICES`]
/// quantized on load, the fastest plan that fits; the least lossy whose time is within
/// [`AUTO_SLACK`] of the fastest wins. Returns its plan, the type (`None`: as stored) and a
/// line saying why.
fn auto_storage(
    spec: &ModelSpec,
    req: &Request,
    device: &DeviceProfile,
    cands: &[Candidate],
    budget: Budget,
) -> Option<(Plan, Option<GgmlDType>, String)> {
    let mut options: Vec<(Option<GgmlDType>, Prediction)> = Vec::new();
    let stored = PlanTable::new(spec, req, device, cands);
    if let Some(row) = stored.fastest_fitting(budget, device) {
        options.push((None, row.prediction.clone()));
    }
    for t in AUTO_CHOICES {
        let q = spec.quantized(&QuantSpec::new(t));
        let table = PlanTable::new(&q, req, device, &planner::with_packed(cands, &q));
        if let Some(row) = table.fastest_fitting(budget, device) {
            options.push((Some(t), row.prediction.clone()));
        }
    }
    let fastest = options
        .iter()
        .map(|(_, p)| p.time_s)
        .min_by(f64::total_cmp)?;
    let (t, p) = options
        .into_iter()
        .find(|(_, p)| p.time_s <= AUTO_SLACK * fastest)?;
    let storage = match t {
        None => "the files as stored".to_string(),
        Some(t) => {
            let name = gguf::type_name(t);
            format!(
                "the flow and T5 weights quantized to {name} on load (measured error {})",
                measured_error(name).map_or("-".into(), |e| format!("{e:.1e}"))
            )
        }
    };
    let line = format!(
        "{storage}, plan `{}` (predicted peak {}, about {}; the least lossy storage within {:.0}% of the fastest) — --plan {}",
        p.label,
        format_bytes(p.peak),
        secs(p.time_s),
        100.0 * (AUTO_SLACK - 1.0),
        p.spec
    );
    Some((p.plan, t, line))
}

// ---- the chart ----

const COLORS: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

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

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Peak memory against resolution (same aspect ratio, 0.25 to 4 megapixels) for each runnable
/// plan, the budget as a dashed line; on the right, the picked (or smallest) plan's phases at
/// the requested size as stacked bars of weights, activations and workspace, beside the
/// components' weights.
fn chart(
    spec: &ModelSpec,
    req: &Request,
    device: &DeviceProfile,
    cands: &[Candidate],
    table: &PlanTable,
    budget: Option<Budget>,
    pick: Option<&Row>,
) -> String {
    let gib = (1u64 << 30) as f64;
    let aspect = req.width as f64 / req.height as f64;
    let mps = [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0];
    let sized = |mp: f64| -> Request {
        let h = (mp * 1e6 / aspect).sqrt();
        let w = h * aspect;
        Request {
            width: ((w as usize) / 16 * 16).max(64),
            height: ((h as usize) / 16 * 16).max(64),
            ..req.clone()
        }
    };
    let runnable: Vec<&Candidate> = cands.iter().filter(|c| c.needs.is_none()).collect();
    let series: Vec<(String, Vec<(f64, f64)>)> = runnable
        .iter()
        .map(|c| {
            let pts = mps
                .iter()
                .map(|&mp| {
                    let r = sized(mp);
                    let p = planner::predict(spec, &r, &c.plan, device);
                    ((r.width * r.height) as f64 / 1e6, p.peak as f64 / gib)
                })
                .collect();
            (planner::label(&c.plan), pts)
        })
        .collect();
    let ymax_data = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .chain(budget.map(|b| b.bytes as f64 / gib))
        .fold(1.0f64, f64::max);
    let ymax = nice_ceiling(ymax_data);
    let (w, h) = (1420.0, 560.0);
    let (x0, y0, pw, ph) = (70.0, 50.0, 560.0, 420.0);
    let xmax = 4.2;
    let px = |x: f64| x0 + x / xmax * pw;
    let py = |y: f64| y0 + ph - y / ymax * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{x0}" y="24" font-size="15">{} — peak device memory by plan ({}, {} T5 tokens, {})</text>"#,
        esc(&spec.name),
        esc(&device.description),
        req.t5_tokens,
        if aspect == 1.0 {
            "square".to_string()
        } else {
            format!("aspect {}:{}", req.width, req.height)
        }
    );
    // Axes and grid.
    let ystep = nice_step(ymax);
    let mut y = 0.0;
    while y <= ymax + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{py:.1}" x2="{x1}" y2="{py:.1}" stroke="#ddd"/><text x="{tx}" y="{ty:.1}" text-anchor="end">{y}</text>"##,
            py = py(y),
            x1 = x0 + pw,
            tx = x0 - 6.0,
            ty = py(y) + 4.0
        );
        y += ystep;
    }
    for mp in [0.0, 1.0, 2.0, 3.0, 4.0] {
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{yb}" stroke="#eee"/><text x="{x:.1}" y="{ty}" text-anchor="middle">{mp}</text>"##,
            x = px(mp),
            yb = y0 + ph,
            ty = y0 + ph + 16.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">megapixels</text><text transform="translate(22 {}) rotate(-90)" text-anchor="middle">peak GiB</text>"#,
        x0 + pw / 2.0,
        y0 + ph + 34.0,
        y0 + ph / 2.0
    );
    if let Some(b) = budget {
        let by = py(b.bytes as f64 / gib);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{by:.1}" x2="{x1}" y2="{by:.1}" stroke="#000" stroke-dasharray="6 4"/><text x="{x1}" y="{ty:.1}" text-anchor="end">budget {}</text>"##,
            format_bytes(b.bytes),
            x1 = x0 + pw,
            ty = by - 5.0
        );
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(y.min(ymax))))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            path.join(" ")
        );
        let ly = y0 + 6.0 + 18.0 * i as f64;
        let lx = x0 + pw + 24.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{b}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{t}" y="{ty}">{}</text>"#,
            esc(name),
            b = lx + 20.0,
            t = lx + 26.0,
            ty = ly + 4.0
        );
    }
    // Bars: the picked (or smallest) plan at the requested size.
    let row = pick.or_else(|| table.smallest());
    if let Some(row) = row {
        let p: &Prediction = &row.prediction;
        let bx0 = 960.0;
        let bmax = nice_ceiling(
            p.peak
                .max(
                    ComponentKind::ALL
                        .iter()
                        .map(|k| spec.manifest(*k).storage_bytes() as u64)
                        .sum(),
                )
                .max(1) as f64
                / gib,
        );
        let by = |v: f64| y0 + ph - v / bmax * ph;
        let _ = writeln!(
            s,
            r#"<text x="{bx0}" y="{}" font-size="13">{} at {}x{}: {}</text>"#,
            y0 - 8.0,
            if pick.is_some() { "picked" } else { "smallest" },
            req.width,
            req.height,
            esc(&p.label)
        );
        let mut yv = 0.0;
        while yv <= bmax + 1e-9 {
            let _ = writeln!(
                s,
                r##"<line x1="{bx0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#eee"/><text x="{tx}" y="{ty:.1}" text-anchor="end">{yv}</text>"##,
                y = by(yv),
                x1 = bx0 + 420.0,
                tx = bx0 - 6.0,
                ty = by(yv) + 4.0
            );
            yv += nice_step(bmax);
        }
        let parts = [
            ("weights", "#4c72b0"),
            ("activations", "#dd8452"),
            ("workspace", "#937860"),
        ];
        for (i, ph_) in p.phases.iter().enumerate() {
            let x = bx0 + 20.0 + 80.0 * i as f64;
            let mut base = 0.0;
            for (j, v) in [ph_.weights, ph_.activations, ph_.workspace]
                .into_iter()
                .enumerate()
            {
                let v = v as f64 / gib;
                let _ = writeln!(
                    s,
                    r#"<rect x="{x}" y="{y:.1}" width="50" height="{hh:.1}" fill="{}"><title>{} {:.2} GiB</title></rect>"#,
                    parts[j].1,
                    parts[j].0,
                    v,
                    y = by(base + v),
                    hh = (v / bmax * ph).max(0.0)
                );
                base += v;
            }
            let _ = writeln!(
                s,
                r#"<text x="{tx}" y="{ty}" text-anchor="middle">{}</text>"#,
                ph_.phase,
                tx = x + 25.0,
                ty = y0 + ph + 16.0
            );
        }
        // The components' weights in storage, stacked.
        let x = bx0 + 20.0 + 80.0 * 3.0 + 30.0;
        let mut base = 0.0;
        for (i, k) in ComponentKind::ALL.iter().enumerate() {
            let v = spec.manifest(*k).storage_bytes() as f64 / gib;
            let c = ["#8172b3", "#937860", "#55a868", "#c44e52"][i];
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="{y:.1}" width="50" height="{hh:.1}" fill="{c}"><title>{} {:.2} GiB</title></rect><text x="{tx}" y="{ty:.1}">{} {}</text>"#,
                k.name(),
                v,
                k.name(),
                format_bytes(spec.manifest(*k).storage_bytes() as u64),
                y = by(base + v),
                hh = v / bmax * ph,
                tx = x + 56.0,
                ty = by(base + v / 2.0) + 4.0
            );
            base += v;
        }
        let _ = writeln!(
            s,
            r#"<text x="{tx}" y="{ty}" text-anchor="middle">weights</text>"#,
            tx = x + 25.0,
            ty = y0 + ph + 16.0
        );
        for (j, (name, c)) in parts.iter().enumerate() {
            let lx = bx0 + 20.0 + 110.0 * j as f64;
            let _ = writeln!(
                s,
                r#"<rect x="{lx}" y="{ly}" width="12" height="12" fill="{c}"/><text x="{tx}" y="{ty}">{name}</text>"#,
                ly = y0 + ph + 30.0,
                tx = lx + 16.0,
                ty = y0 + ph + 40.0
            );
        }
    }
    let _ = writeln!(s, "</svg>");
    s
}

fn nice_step(max: f64) -> f64 {
    let raw = max / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let n = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    n * mag
}

fn nice_ceiling(v: f64) -> f64 {
    let step = nice_step(v);
    (v / step).ceil() * step
}

/// The plan to retry with once after the device ran out of memory under `current`: the
/// runnable candidate with the largest predicted peak below `current`'s (the least slowdown
/// that still lowers the peak). `None` when nothing smaller exists.
pub fn smaller_plan(
    model: &Model,
    req: &fluxfit::pipeline::Text2Image,
    current: &Plan,
) -> Option<Plan> {
    let device = generate_profile(model.device());
    let spec = ModelSpec::from_model(model);
    let request = Request::for_text2image(req);
    let cands = candidates(&device, model.dtype(), current.attn_chunk);
    let peak_of = |p: &Plan| planner::predict(&spec, &request, p, &device).peak;
    let now = peak_of(current);
    cands
        .iter()
        .filter(|c| c.needs.is_none())
        .map(|c| (peak_of(&c.plan), &c.plan))
        .filter(|(peak, _)| *peak < now)
        .max_by_key(|(peak, _)| *peak)
        .map(|(_, p)| p.clone())
}

/// Whether an error is the device running out of memory (CUDA or Metal), as opposed to a bug
/// or bad input that a smaller plan would not cure.
pub fn is_out_of_memory(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}").to_ascii_lowercase();
    text.contains("out of memory") || text.contains("out_of_memory") || text.contains("outofmemory")
}

#[cfg(test)]
mod fallback_tests {
    use super::*;
    use fluxfit::memory::plan::Placement;
    use fluxfit::noise::NoiseKind;
    use fluxfit::pipeline::{tiny, Text2Image};

    #[test]
    fn out_of_memory_retry_picks_a_plan_with_a_lower_peak() {
        let model = tiny::load(LoadOptions::default()).unwrap();
        let req = Text2Image {
            prompt: "x".into(),
            width: 256,
            height: 256,
            steps: 2,
            guidance: 0.0,
            seed: 0,
            t5_tokens: 32,
            noise: NoiseKind::TorchBf16,
        };
        let current = model.plan().clone();
        let smaller = smaller_plan(&model, &req, &current).expect("a smaller plan exists");
        let device = generate_profile(model.device());
        let spec = ModelSpec::from_model(&model);
        let request = Request::for_text2image(&req);
        let peak = |p: &Plan| planner::predict(&spec, &request, p, &device).peak;
        assert!(peak(&smaller) < peak(&current));
    }

    #[test]
    fn out_of_memory_is_told_apart_from_other_errors() {
        let oom =
            anyhow::anyhow!("compute: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        assert!(is_out_of_memory(&oom));
        assert!(!is_out_of_memory(&anyhow::anyhow!(
            "tensor `img_in.weight` has shape [3]"
        )));
    }

    /// FLUX.1-dev at 1 MP: `--quant auto` takes the least lossy storage within 10% of the
    /// fastest; `stored` and `none` keep the files as they are; a type plans that type,
    /// quantized on load.
    #[test]
    fn auto_picks_the_least_lossy_storage_near_the_fastest() {
        let spec = ModelSpec::published(Variant::Dev);
        let device = fluxfit::candle_core::Device::Cpu;
        let request = |vram: &'static str, quant: Quant| VramRequest {
            vram,
            device: &device,
            dtype: DType::F32,
            attn_chunk: Some(1024),
            width: Some(1024),
            height: Some(1024),
            steps: Some(4),
            t5_tokens: Some(512),
            image_input: false,
            cond_size: None,
            quant,
            quiet: true,
        };
        // Plenty: as stored, nothing quantized.
        let (plan, q) = pick_plan(&spec, &request("400GB", Quant::Auto)).unwrap();
        assert_eq!(q, None);
        assert!(!plan.flow.packed);
        for budget in ["16GB", "24GB", "48GB"] {
            let (plan, q) = pick_plan(&spec, &request(budget, Quant::Auto)).unwrap();
            let stored = pick_plan(&spec, &request(budget, Quant::Stored)).unwrap();
            let none = pick_plan(&spec, &request(budget, Quant::None)).unwrap();
            assert_eq!((stored.1, none.1), (None, None));
            println!("{budget}: auto {:?} {}", q, plan.spec());
            if let Some(t) = q {
                assert!(plan.flow.packed, "{}", plan.spec());
                assert!(STORAGE_CHOICES.contains(&t));
            }
        }
        let (_, q) = pick_plan(&spec, &request("12GB", Quant::Type(GgmlDType::Q4K))).unwrap();
        assert_eq!(q, Some(GgmlDType::Q4K));
    }

    /// On a GPU (3090 rates) at 1 MP: `--quant auto` keeps bf16 where it runs resident, takes
    /// q8_0 where that runs per phase at about resident speed, a smaller type on smaller
    /// cards, and never one below q4_k.
    #[test]
    fn auto_storage_on_a_gpu() {
        let spec = ModelSpec::published(Variant::Dev);
        let device = DeviceProfile::generic_cuda(None);
        let req = Request::new(Variant::Dev, 1024, 1024);
        let cands = candidates(&device, DType::BF16, Some(1024));
        let pick = |gib: u64| {
            let c = auto_storage(&spec, &req, &device, &cands, Budget { bytes: gib << 30 });
            let c = c.expect("something fits");
            println!("{gib} GiB: {}", c.2);
            (c.1, c.0)
        };
        assert_eq!(pick(48).0, None);
        let (t, plan) = pick(16);
        assert_eq!(t, Some(GgmlDType::Q8_0));
        assert!(
            plan.flow.packed
                && plan.flow.placement
                    != Placement::Stream {
                        group: 1,
                        window: 2
                    }
        );
        for gib in [8, 12] {
            let (t, plan) = pick(gib);
            assert!(AUTO_CHOICES.contains(&t.expect("quantized")), "{t:?}");
            assert!(plan.flow.packed);
        }
    }
}
