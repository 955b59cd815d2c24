//! `fluxfit bench`: each residency plan at several resolutions on a mid-size built-in model
//! (weights generated in process), measuring the peak with the counting allocator and the time.

use std::time::Instant;

use crate::candle_core::DType;
use crate::component::Phase;
use crate::error::{Error, Result};
use crate::memory::alloc;
use crate::memory::plan::Plan;
use crate::noise::NoiseKind;
use crate::pipeline::tiny::{self, TinyConfigs};
use crate::pipeline::{LoadOptions, Model, Request};
use crate::variant::Variant;

#[derive(Debug, Clone)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct BenchArgs {
    /// Flow model width (MLP 4×, heads of 64).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 256))]
    pub hidden: usize,
    /// Double-stream blocks.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 4))]
    pub depth: usize,
    /// Single-stream blocks.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 4))]
    pub depth_single: usize,
    /// Square image sides, comma-separated.
    #[cfg_attr(
        feature = "clap",
        arg(long, value_delimiter = ',', default_value = "256,384,512")
    )]
    pub sizes: Vec<usize>,
    /// Plans (as `generate --plan`), separated by `;`; the first is the baseline of the
    /// relative time.
    #[cfg_attr(
        feature = "clap",
        arg(
            long,
            value_delimiter = ';',
            default_value = "resident;phase;stream:1:2;stream:2:3;stream:1:1;t5-cpu"
        )
    )]
    pub plans: Vec<String>,
    /// Denoising steps per run.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 4))]
    pub steps: usize,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 64))]
    pub t5_tokens: usize,
    /// Rounds over the plans; each plan's fastest run is reported (peaks are the same run to
    /// run).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1))]
    pub repeat: usize,
    /// Attention query-chunk length; 0 = unchunked.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = crate::model::attention::DEFAULT_CHUNK))]
    pub attn_chunk: usize,
    /// One JSON object per row instead of the table.
    #[cfg_attr(feature = "clap", arg(long))]
    pub json: bool,
}

/// The planner's prediction of a run's peak device bytes under `plan`, to set beside the
/// measurement.
fn predicted_peak(model: &Model, req: &Request, plan: &Plan) -> Option<usize> {
    use crate::planner::{predict, DeviceProfile, ModelSpec, Workload};
    let spec = ModelSpec::from_model(model);
    let r = Workload::of(req);
    let device = if model.device().is_cpu() {
        DeviceProfile::cpu_fixed()
    } else {
        DeviceProfile::generic_cuda(None)
    };
    Some(predict(&spec, &r, plan, &device).peak as usize)
}

struct Row {
    plan: String,
    side: usize,
    phases: Vec<(Phase, usize)>,
    peak: usize,
    predicted: Option<usize>,
    seconds: f64,
    /// CPU time of the run, all threads (prefetching included).
    cpu: Option<f64>,
    /// Time the flow model waited for its weights (loads not hidden by a prefetch).
    flow_wait: f64,
}

/// CPU time of the whole process (all threads) so far, from `/proc/self/stat` (Linux reports
/// it in ticks of 1/100 s); `None` elsewhere. Less disturbed than wall time when other programs
/// compete for the cores.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let mut f = stat.rsplit_once(')')?.1.split_whitespace();
    // After the command name: state is field 3, utime and stime are fields 14 and 15.
    let utime: f64 = f.nth(11)?.parse().ok()?;
    let stime: f64 = f.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn mib(b: usize) -> String {
    format!("{:.1}", b as f64 / (1024.0 * 1024.0))
}

/// Runs the benchmark; returns its table (or one JSON object per row).
pub fn run(args: &BenchArgs) -> Result<String> {
    let mut out = String::new();
    if !alloc::installed() {
        return Err(Error::Config(
            "the counting allocator is not installed: peaks cannot be measured".into(),
        ));
    }
    let chunk = (args.attn_chunk > 0).then_some(args.attn_chunk);
    let configs = TinyConfigs::sized(Variant::Schnell, args.hidden, args.depth, args.depth_single)?;
    let mut model = tiny::load_with(
        &configs,
        None,
        LoadOptions {
            attn_chunk: chunk,
            variant: Some(Variant::Schnell),
            ..LoadOptions::default()
        },
    )?;
    let base = Plan::resident(DType::F32, chunk);
    let plans = args
        .plans
        .iter()
        .map(|s| {
            base.with_spec(s)
                .map_err(|e| Error::InvalidRequest(format!("--plans: `{s}`: {e}")))
                .map(|p| (s.clone(), p))
        })
        .collect::<Result<Vec<_>>>()?;
    let flow_bytes: usize = model.flow.weights.stage_bytes().iter().sum();
    eprintln!(
        "{} on the CPU, f32: flow {} MiB in {} stages; {} steps, {} T5 tokens; {} threads",
        model.name,
        mib(flow_bytes),
        model.flow.weights.stages().len(),
        args.steps,
        args.t5_tokens,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    if !args.json {
        outln!(
            out,
            "{:<26} {:>9} {:>11} {:>11} {:>11} {:>11} {:>11} {:>9} {:>8} {:>9} {:>8} {:>11}",
            "plan",
            "size",
            "encode MiB",
            "denoise MiB",
            "decode MiB",
            "peak MiB",
            "predicted",
            "time s",
            "vs first",
            "cpu s",
            "vs first",
            "flow wait s"
        );
    }
    for &side in &args.sizes {
        let req = Request {
            prompt: "a lighthouse on a cliff at dusk".into(),
            width: side / 16 * 16,
            height: side / 16 * 16,
            steps: args.steps,
            guidance: 0.0,
            seed: 7,
            t5_tokens: args.t5_tokens,
            noise: NoiseKind::TorchF32,
        };
        req.validate(true)?;
        // Rounds over all plans, the fastest run of each kept: a machine that slows down for a
        // while then slows every plan alike.
        let mut best: Vec<Option<Row>> = plans.iter().map(|_| None).collect();
        for _ in 0..args.repeat.max(1) {
            for ((spec, plan), best) in plans.iter().zip(best.iter_mut()) {
                model.set_plan(plan.clone());
                let cpu0 = cpu_seconds();
                let start = Instant::now();
                let out = model.text_to_image(&req, &mut |_| {})?;
                let seconds = start.elapsed().as_secs_f64();
                let cpu = cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
                if best.as_ref().is_none_or(|b| seconds < b.seconds) {
                    *best = Some(Row {
                        plan: spec.clone(),
                        side,
                        phases: out
                            .memory
                            .phases
                            .iter()
                            .map(|p| (p.phase, p.total_peak))
                            .collect(),
                        peak: out.memory.peak,
                        predicted: predicted_peak(&model, &req, plan),
                        seconds,
                        cpu,
                        flow_wait: model.flow.weights.load_stats().waited.as_secs_f64(),
                    });
                }
                if let (Some(b), Some(c)) = (best.as_mut(), cpu) {
                    b.cpu = Some(b.cpu.map_or(c, |b| b.min(c)));
                }
            }
        }
        let mut baseline = None;
        let mut cpu_baseline = None;
        for ((_, plan), row) in plans.iter().zip(best) {
            let row = row.expect("at least one run");
            let base_s = *baseline.get_or_insert(row.seconds);
            let base_cpu = *cpu_baseline.get_or_insert(row.cpu);
            let cpu_rel = row.cpu.zip(base_cpu).map(|(c, b)| c / b);
            let phase = |name: Phase| {
                row.phases
                    .iter()
                    .find(|(p, _)| *p == name)
                    .map_or(0, |(_, b)| *b)
            };
            if args.json {
                outln!(
                    out,
                    "{}",
                    serde_json::json!({
                        "plan": row.plan,
                        "spec": plan.spec(),
                        "width": side, "height": side,
                        "encode_peak": phase(Phase::Encode),
                        "denoise_peak": phase(Phase::Denoise),
                        "decode_peak": phase(Phase::Decode),
                        "peak": row.peak,
                        "predicted_peak": row.predicted,
                        "seconds": row.seconds,
                        "relative_time": row.seconds / base_s,
                        "cpu_seconds": row.cpu,
                        "relative_cpu": cpu_rel,
                        "flow_wait_seconds": row.flow_wait,
                    })
                );
            } else {
                outln!(out,
                    "{:<26} {:>9} {:>11} {:>11} {:>11} {:>11} {:>11} {:>9.2} {:>7.2}x {:>9} {:>8} {:>11.3}",
                    row.plan,
                    format!("{}x{}", row.side, row.side),
                    mib(phase(Phase::Encode)),
                    mib(phase(Phase::Denoise)),
                    mib(phase(Phase::Decode)),
                    mib(row.peak),
                    row.predicted.map_or_else(|| "n/a".into(), mib),
                    row.seconds,
                    row.seconds / base_s,
                    row.cpu.map_or_else(|| "n/a".into(), |c| format!("{c:.2}")),
                    cpu_rel.map_or_else(|| "n/a".into(), |r| format!("{r:.2}x")),
                    row.flow_wait
                );
            }
        }
    }
    Ok(out)
}
