//! Choosing for a front end: the storage of the flow and T5 weights (`--quant`), the budget
//! (`--vram`, `auto` from the device), the fastest plan that fits it, and a smaller plan after
//! the device ran out of memory. The policy lives here so that every front end (the CLI, the
//! server) decides alike; they only print what it returns.

use std::fmt::Write as _;
use std::str::FromStr;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, DeviceLocation};

use super::{
    alternatives, available_ram, candidates, format_bytes, format_secs, parse_bytes, predict,
    with_packed, Budget, Candidate, DeviceProfile, ModelSpec, PlanTable, Prediction, Workload,
};
use crate::checkpoint::gguf;
use crate::checkpoint::quantize::{measured_error, QuantSpec};
use crate::error::{Error, Result};
use crate::memory::plan::{Component, Plan};
use crate::pipeline::{Model, Request};

/// Which storage (`--quant`) of the flow and T5 weights the planner may use.
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
pub const AUTO_CHOICES: [GgmlDType; 4] = [
    GgmlDType::Q8_0,
    GgmlDType::Q6K,
    GgmlDType::Q5K,
    GgmlDType::Q4K,
];

impl FromStr for Quant {
    type Err = String;

    /// `none`, `stored`, `auto` or a GGUF type name (`q8_0`, `q4_k`, ...).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Quant::None),
            "stored" => Ok(Quant::Stored),
            "auto" => Ok(Quant::Auto),
            t => gguf::parse_type(t)
                .map(Quant::Type)
                .map_err(|e| format!("{e}; or stored, auto, none")),
        }
    }
}

/// The storage types `plan --quant auto` compares, best quality first.
pub const STORAGE_CHOICES: [GgmlDType; 5] = [
    GgmlDType::Q8_0,
    GgmlDType::Q6K,
    GgmlDType::Q5K,
    GgmlDType::Q4K,
    GgmlDType::Q3K,
];

/// The plans to consider for `spec` under `quant`: packed variants where its files (or the
/// asked type) are block-quantized and packing is allowed.
pub fn plan_candidates(spec: &ModelSpec, cands: &[Candidate], quant: Quant) -> Vec<Candidate> {
    match quant {
        Quant::None => cands.to_vec(),
        _ => with_packed(cands, spec),
    }
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
    /// The flow output's measured relative error for this type (docs/quantization.md "Error and speed").
    pub error: Option<f64>,
}

/// The files' storage and each of [`STORAGE_CHOICES`]: what fits `budget` and how fast.
pub fn storage_choices(
    spec: &ModelSpec,
    req: &Workload,
    device: &DeviceProfile,
    dtype: DType,
    chunk: Option<usize>,
    budget: Budget,
) -> Vec<StorageChoice> {
    let base = candidates(device, dtype, chunk);
    let stored = spec.manifest(Component::Flow);
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
            let mut table = PlanTable::new(&s, req, device, &with_packed(&base, &s));
            table.add_partial_residency(&s, req, device, budget);
            StorageChoice {
                storage,
                flow_bytes: s.manifest(Component::Flow).storage_bytes() as u64,
                t5_bytes: s.manifest(Component::T5).storage_bytes() as u64,
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

impl DeviceProfile {
    /// The profile planned for when running on `device`: this CPU, or a generic CUDA card.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            Self::cpu()
        } else {
            Self::generic_cuda(None)
        }
    }

    /// `cpu`, `cuda` (a generic card) or a card's name (`rtx3090`, `h100`, ...).
    pub fn named(name: &str) -> Result<Self> {
        match name {
            "cpu" => Ok(Self::cpu()),
            "cuda" | "gpu" => Ok(Self::generic_cuda(None)),
            n => Self::gpu(n).ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "--device {n}: expected cpu, cuda or one of {}",
                    Self::gpu_names().join(", ")
                ))
            }),
        }
    }
}

impl Budget {
    /// `--vram`: a size (`12GB`), `auto` (GPU `gpu`'s free memory now, or the CPU's available
    /// RAM), or, when absent, the profile's own memory (a named card's).
    pub fn resolve(vram: Option<&str>, device: &DeviceProfile, gpu: usize) -> Result<Option<Self>> {
        let bytes = match vram {
            None => device.memory,
            Some("auto") => Some(free_memory(device, gpu)?),
            Some(s) => Some(
                parse_bytes(s).map_err(|e| Error::InvalidRequest(format!("--vram {s}: {e}")))?,
            ),
        };
        Ok(bytes.map(|bytes| Budget { bytes }))
    }
}

/// Free memory now: the GPU's free memory (nvidia-smi; the profile's reserve is taken when
/// fitting), or the CPU's available RAM.
fn free_memory(device: &DeviceProfile, gpu: usize) -> Result<u64> {
    let refuse = |why: String| Error::InvalidRequest(format!("--vram auto: {why}"));
    if device.is_cpu() {
        return available_ram().ok_or_else(|| {
            refuse("cannot read MemAvailable from /proc/meminfo; give a size".into())
        });
    }
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.free",
            "--format=csv,noheader,nounits",
            "-i",
            &gpu.to_string(),
        ])
        .output()
        .map_err(|_| {
            refuse("nvidia-smi is not available to read the free GPU memory; give a size such as --vram 12GB".into())
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mib: u64 = text
        .trim()
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .parse()
        .map_err(|_| {
            refuse(format!(
                "cannot read nvidia-smi's free memory from `{}`",
                text.trim()
            ))
        })?;
    Ok(mib << 20)
}

/// The size planned for when the request gives none: the reference's 1360×768, or 256×256 for
/// the built-in tiny model.
pub fn default_size(spec: &ModelSpec) -> (usize, usize) {
    if spec.name.starts_with("tiny") {
        (256, 256)
    } else {
        (1360, 768)
    }
}

/// What a front end knows of a request before planning it; the model's defaults fill the rest.
#[derive(Debug, Clone, Copy, Default)]
pub struct Asked {
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub t5_tokens: Option<usize>,
    pub steps: Option<usize>,
    /// An image is VAE-encoded in the encode phase.
    pub image_input: bool,
    /// Its size where it is not the output's (Kontext).
    pub cond_size: Option<(usize, usize)>,
    /// Redux images (see [`Workload::redux_images`]).
    pub redux_images: usize,
}

impl Workload {
    /// `asked` for `spec`: sizes floored to multiples of 16, the variant's defaults elsewhere,
    /// an image input where the variant needs one.
    pub fn asked(spec: &ModelSpec, asked: Asked) -> Self {
        let (dw, dh) = default_size(spec);
        Self {
            width: asked.width.unwrap_or(dw) / 16 * 16,
            height: asked.height.unwrap_or(dh) / 16 * 16,
            t5_tokens: asked.t5_tokens.unwrap_or(spec.variant.t5_tokens()),
            steps: asked.steps.unwrap_or(spec.variant.default_steps()),
            // Fill, Canny and Depth always encode an image: planned without one they would
            // be asked for a run they cannot do.
            image_input: asked.image_input || spec.variant.in_channels() > 64,
            cond_size: asked.cond_size,
            redux_images: asked.redux_images,
        }
    }
}

/// What a front end asks the planner to choose for: the request and what may vary.
#[derive(Debug, Clone)]
pub struct Choosing {
    pub request: Workload,
    pub device: DeviceProfile,
    pub budget: Budget,
    pub dtype: DType,
    pub attn_chunk: Option<usize>,
    /// Which storage the plan may use (`--quant`).
    pub quant: Quant,
}

/// What was chosen: the plan, the type the flow and T5 weights are quantized to on load when
/// the files are dense (`--quant TYPE`, or `auto`), and a line saying why.
#[derive(Debug, Clone)]
pub struct Choice {
    pub plan: Plan,
    pub quantize_on_load: Option<GgmlDType>,
    pub why: String,
}

/// The GPU index of a candle device (0 for the others).
pub fn gpu_index(device: &Device) -> usize {
    match device.location() {
        DeviceLocation::Cuda { gpu_id } => gpu_id,
        _ => 0,
    }
}

/// The fastest plan for `c` that fits its budget, or [`Error::NoPlanFits`] naming the
/// smallest plan and the nearest alternatives.
pub fn choose(spec: &ModelSpec, c: &Choosing) -> Result<Choice> {
    let (req, device, budget) = (&c.request, &c.device, c.budget);
    // `--quant TYPE` on dense files: planned as they will be once quantized on load.
    let quantized;
    let (spec, on_load) = match c.quant {
        Quant::Type(t) if !spec.packable(Component::Flow) => {
            quantized = spec.quantized(&QuantSpec::new(t));
            (&quantized, Some(t))
        }
        _ => (spec, None),
    };
    let cands = plan_candidates(spec, &candidates(device, c.dtype, c.attn_chunk), c.quant);
    let mut table = PlanTable::new(spec, req, device, &cands);
    table.add_partial_residency(spec, req, device, budget);
    if c.quant == Quant::Auto && !spec.packable(Component::Flow) {
        if let Some((plan, t, line)) = auto_storage(spec, req, device, &cands, budget) {
            return Ok(Choice {
                plan,
                quantize_on_load: t,
                why: format!("--vram {}: {line}", format_bytes(budget.bytes)),
            });
        }
    }
    if let Some(row) = table.fastest_fitting(budget, device) {
        return Ok(Choice {
            plan: row.prediction.plan.clone(),
            quantize_on_load: on_load,
            why: format!(
                "--vram {}: plan `{}` (predicted peak {}, {:.2}× the all-resident time) — --plan {}",
                format_bytes(budget.bytes),
                row.prediction.label,
                format_bytes(row.prediction.peak),
                row.relative,
                row.prediction.spec
            ),
        });
    }
    let alts = alternatives(spec, req, device, &cands, budget);
    let mut msg = format!(
        "no plan fits {}x{} of {} in {}",
        req.width,
        req.height,
        spec.name,
        format_bytes(budget.bytes)
    );
    if let Some(p) = table.smallest().map(|r| &r.prediction) {
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
    Err(Error::NoPlanFits(msg))
}

/// `--quant auto` on dense files: for the files as stored and each of [`AUTO_CHOICES`]
/// quantized on load, the fastest plan that fits; the least lossy whose time is within
/// [`AUTO_SLACK`] of the fastest wins. Returns its plan, the type (`None`: as stored) and a
/// line saying why.
pub fn auto_storage(
    spec: &ModelSpec,
    req: &Workload,
    device: &DeviceProfile,
    cands: &[Candidate],
    budget: Budget,
) -> Option<(Plan, Option<GgmlDType>, String)> {
    let mut options: Vec<(Option<GgmlDType>, Prediction)> = Vec::new();
    let mut stored = PlanTable::new(spec, req, device, cands);
    stored.add_partial_residency(spec, req, device, budget);
    if let Some(row) = stored.fastest_fitting(budget, device) {
        options.push((None, row.prediction.clone()));
    }
    for t in AUTO_CHOICES {
        let q = spec.quantized(&QuantSpec::new(t));
        let mut table = PlanTable::new(&q, req, device, &with_packed(cands, &q));
        table.add_partial_residency(&q, req, device, budget);
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
        format_secs(p.time_s),
        100.0 * (AUTO_SLACK - 1.0),
        p.spec
    );
    Some((p.plan, t, line))
}

/// The plan to retry with once after the device ran out of memory under `current`: the
/// runnable candidate with the largest predicted peak below `current`'s (the least slowdown
/// that still lowers the peak). `None` when nothing smaller exists.
pub fn smaller_plan(model: &Model, req: &Request, current: &Plan) -> Option<Plan> {
    let device = DeviceProfile::for_device(model.device());
    let spec = ModelSpec::from_model(model);
    let request = Workload::of(req);
    let cands = candidates(&device, model.dtype(), current.attn_chunk);
    let peak_of = |p: &Plan| predict(&spec, &request, p, &device).peak;
    let now = peak_of(current);
    cands
        .iter()
        .filter(|c| c.needs.is_none())
        .map(|c| (peak_of(&c.plan), &c.plan))
        .filter(|(peak, _)| *peak < now)
        .max_by_key(|(peak, _)| *peak)
        .map(|(_, p)| p.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::plan::Placement;
    use crate::noise::NoiseKind;
    use crate::pipeline::{tiny, LoadOptions};
    use crate::variant::Variant;

    #[test]
    fn out_of_memory_retry_picks_a_plan_with_a_lower_peak() {
        let model = tiny::load(LoadOptions::default()).unwrap();
        let req = Request {
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
        let device = DeviceProfile::for_device(model.device());
        let spec = ModelSpec::from_model(&model);
        let request = Workload::of(&req);
        let peak = |p: &Plan| predict(&spec, &request, p, &device).peak;
        assert!(peak(&smaller) < peak(&current));
    }

    #[test]
    fn out_of_memory_is_told_apart_from_other_errors() {
        let oom = candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        );
        assert!(Error::from(oom).is_out_of_memory());
        let other = candle_core::Error::Msg("tensor `img_in.weight` has shape [3]".into());
        assert!(!Error::from(other).is_out_of_memory());
    }

    /// FLUX.1-dev at 1 MP: `--quant auto` takes the least lossy storage within 10% of the
    /// fastest; `stored` and `none` keep the files as they are; a type plans that type,
    /// quantized on load.
    #[test]
    fn auto_picks_the_least_lossy_storage_near_the_fastest() {
        let spec = ModelSpec::published(Variant::Dev);
        let device = DeviceProfile::cpu();
        let request = |vram: &str, quant: Quant| Choosing {
            request: Workload {
                width: 1024,
                height: 1024,
                steps: 4,
                t5_tokens: 512,
                image_input: false,
                cond_size: None,
                redux_images: 0,
            },
            device: device.clone(),
            budget: Budget::resolve(Some(vram), &device, 0).unwrap().unwrap(),
            dtype: DType::F32,
            attn_chunk: Some(1024),
            quant,
        };
        let pick_plan =
            |spec: &ModelSpec, c: &Choosing| choose(spec, c).map(|c| (c.plan, c.quantize_on_load));
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

    /// On a GPU (3090 rates): at 1 MP the copy stream hides streaming behind compute, so
    /// `--quant auto` keeps bf16 on every card; at 512², where there is little compute to hide
    /// the copies behind, it takes q8_0 packed on a 16 GiB card, a smaller type on smaller
    /// cards, never one below q4_k, and keeps bf16 where it runs resident.
    #[test]
    fn auto_storage_on_a_gpu() {
        let spec = ModelSpec::published(Variant::Dev);
        let device = DeviceProfile::generic_cuda(None);
        let cands = candidates(&device, DType::BF16, Some(1024));
        let pick = |side: usize, gib: u64| {
            let req = Workload::new(Variant::Dev, side, side);
            let c = auto_storage(&spec, &req, &device, &cands, Budget { bytes: gib << 30 });
            let c = c.expect("something fits");
            println!("{side}² {gib} GiB: {}", c.2);
            (c.1, c.0)
        };
        for gib in [8, 12, 16, 48] {
            assert_eq!(pick(1024, gib).0, None, "{gib} GiB at 1 MP");
        }
        assert_eq!(pick(512, 48).0, None);
        let (t, plan) = pick(512, 16);
        assert_eq!(t, Some(GgmlDType::Q8_0));
        assert!(plan.flow.packed);
        for gib in [8, 12] {
            let (t, plan) = pick(512, gib);
            assert!(AUTO_CHOICES.contains(&t.expect("quantized")), "{t:?}");
            assert!(plan.flow.packed);
        }
    }

    /// A 16 GiB card and dense bf16 FLUX.1-dev at 512² (23.8 GB of flow weights, little compute
    /// per block to hide the copies behind): the chosen plan streams the flow model but keeps as
    /// many leading blocks as fit, and is predicted faster than streaming every block.
    #[test]
    fn a_card_that_holds_part_of_the_model_keeps_that_part() {
        let spec = ModelSpec::published(Variant::Dev);
        let device = DeviceProfile::generic_cuda(None);
        let request = Workload::new(Variant::Dev, 512, 512);
        let choosing = Choosing {
            request: request.clone(),
            device: device.clone(),
            budget: Budget { bytes: 16 << 30 },
            dtype: DType::BF16,
            attn_chunk: Some(1024),
            quant: Quant::None,
        };
        let chosen = choose(&spec, &choosing).expect("a plan fits 16 GiB").plan;
        let Placement::Stream { keep, .. } = chosen.flow.placement else {
            panic!("expected a streamed flow, got {}", chosen.spec());
        };
        let stages = spec.stages(Component::Flow).len();
        assert!(keep > 0 && keep < stages, "kept {keep} of {stages}");
        let mut none_kept = chosen.clone();
        if let Placement::Stream { keep, .. } = &mut none_kept.flow.placement {
            *keep = 0;
        }
        let kept = predict(&spec, &request, &chosen, &device);
        let streamed = predict(&spec, &request, &none_kept, &device);
        println!(
            "16 GiB: {} peak {} {:.1}s vs {:.1}s streaming all",
            chosen.spec(),
            format_bytes(kept.peak),
            kept.time_s,
            streamed.time_s
        );
        let budget = Budget { bytes: 16 << 30 };
        assert!(budget.fits(&kept, &device));
        assert!(kept.time_s < streamed.time_s);
        // One more block would not fit.
        let mut more = chosen.clone();
        if let Placement::Stream { keep, .. } = &mut more.flow.placement {
            *keep += 1;
        }
        assert!(!budget.fits(&predict(&spec, &request, &more, &device), &device));
    }
}
