//! `fluxfit bench-cpu`: the flow model's forward pass and a whole denoising step (forward and
//! Euler update) in f32 on the CPU, on a mid-size model, with where the time goes by class of
//! operation, beside PyTorch's figures for the same model when
//! `tools/reference/bench_cpu_vs_torch.py` has measured them on this machine.
//!
//! The model is FLUX.1's architecture at a smaller width and depth (default: hidden 1024,
//! 8 heads of 128, 2 double + 4 single blocks, T5 width 4096, about 145 M parameters), with
//! weights generated in process or read from `--flow` (the Python script saves the model it
//! built with diffusers' classes, so both run the same weights).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::candle_core::{DType, Device, Tensor};
use crate::checkpoint::layout::open_flow;
use crate::checkpoint::store::TensorStore;
use crate::error::{Error, Result};
use crate::memory::plan::Placement;
use crate::memory::residency::Residency;
use crate::model::flow::{FlowConfig, FlowSample, Flux};
use crate::pipeline::tiny;
use crate::tensor::profile;

#[derive(Debug, Clone)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct BenchCpuArgs {
    /// Flow model width.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1024))]
    pub hidden: usize,
    /// Attention heads (the width over the head size; FLUX.1's heads are 128 wide).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 8))]
    pub heads: usize,
    /// Double-stream blocks.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 2))]
    pub depth: usize,
    /// Single-stream blocks.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 4))]
    pub depth_single: usize,
    /// Image sides in pixels, comma-separated (a side of S is (S/16)² image tokens).
    #[cfg_attr(
        feature = "clap",
        arg(long, value_delimiter = ',', default_value = "256,512")
    )]
    pub sizes: Vec<usize>,
    /// Text tokens.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 128))]
    pub txt_tokens: usize,
    /// Timed runs of each measurement per size; the fastest is reported.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 3))]
    pub rounds: usize,
    /// Attention query-chunk length; 0 = unchunked.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = crate::model::attention::DEFAULT_CHUNK))]
    pub attn_chunk: usize,
    /// A flow checkpoint (file or folder, BFL or diffusers keys) instead of generated weights.
    #[cfg_attr(feature = "clap", arg(long))]
    pub flow: Option<PathBuf>,
    /// PyTorch's figures for the same model on this machine (JSON written by
    /// tools/reference/bench_cpu_vs_torch.py), printed beside fluxfit's.
    #[cfg_attr(feature = "clap", arg(long))]
    pub torch: Option<PathBuf>,
    /// One more step per size with the per-class profile on, printed as a second table.
    #[cfg_attr(feature = "clap", arg(long))]
    pub profile: bool,
    /// One JSON object per size instead of the tables.
    #[cfg_attr(feature = "clap", arg(long))]
    pub json: bool,
}

/// The mid-size model's configuration: FLUX.1-dev's in/out widths, the chosen width and depth.
pub fn config(args: &BenchCpuArgs) -> Result<FlowConfig> {
    // A benchmark's model is built in memory: bounded so that a typo cannot exhaust it.
    for (flag, v, max) in [
        ("--hidden", args.hidden, 8192),
        ("--depth", args.depth, 64),
        ("--depth-single", args.depth_single, 64),
        ("--txt-tokens", args.txt_tokens, 4096),
        ("--rounds", args.rounds, 1000),
    ] {
        if v > max {
            return Err(Error::InvalidRequest(format!(
                "{flag} {v} is over this benchmark's bound of {max}"
            )));
        }
    }
    if args.heads == 0 || !args.hidden.is_multiple_of(args.heads) {
        return Err(Error::InvalidRequest(format!(
            "--hidden {} is not a multiple of --heads {}",
            args.hidden, args.heads
        )));
    }
    Ok(FlowConfig {
        hidden_size: args.hidden,
        mlp_hidden: 4 * args.hidden,
        num_heads: args.heads,
        depth: args.depth,
        depth_single: args.depth_single,
        axes_dim: FlowConfig::default_axes(args.hidden / args.heads)?,
        ..FlowConfig::dev()
    })
}

/// One size's figures, seconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub side: usize,
    pub tokens: usize,
    pub forward: f64,
    pub step: f64,
    /// PyTorch's forward and step, when a comparison file has them for this size.
    pub torch_forward: Option<f64>,
    pub torch_step: Option<f64>,
    /// (class, seconds, calls) of one profiled step.
    #[serde(skip)]
    pub profile: Vec<(profile::Class, f64, u64)>,
}

/// PyTorch's figures as the Python script writes them.
#[derive(Debug, serde::Deserialize)]
struct TorchFile {
    rows: Vec<TorchRow>,
}

#[derive(Debug, serde::Deserialize)]
struct TorchRow {
    side: usize,
    forward: f64,
    step: f64,
}

/// Times `f`'s fastest run of `rounds`.
fn fastest(rounds: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..rounds.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Measures every size; returns the rows ([`run`] prints them).
pub fn measure(args: &BenchCpuArgs) -> Result<Vec<Row>> {
    config(args)?;
    for &side in &args.sizes {
        if side < 16 || !side.is_multiple_of(16) || side > 4096 {
            return Err(Error::InvalidRequest(format!(
                "--sizes: {side} is not a multiple of 16 from 16 to 4096"
            )));
        }
    }
    let store: TensorStore = match &args.flow {
        Some(p) => open_flow(p)?,
        None => tiny::memory_store("flow", config(args)?.expected_shapes())?,
    };
    let cfg = match &args.flow {
        Some(_) => FlowConfig::from_store(&store)?,
        None => config(args)?,
    };
    cfg.validate(&store)?;
    let flux = Flux::new(
        cfg.clone(),
        (args.attn_chunk > 0).then_some(args.attn_chunk),
    );
    let weights = Residency::new(
        Arc::new(store),
        flux.stages(),
        Device::Cpu,
        DType::F32,
        Placement::Resident,
    );
    let torch = match &args.torch {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            let f: TorchFile = serde_json::from_str(&text).map_err(|e| {
                Error::InvalidRequest(format!(
                    "--torch {}: not the script's JSON: {e}",
                    p.display()
                ))
            })?;
            f.rows
        }
        None => Vec::new(),
    };
    let mut rows = Vec::new();
    for &side in &args.sizes {
        let sample = FlowSample::seeded(&cfg, side / 16, args.txt_tokens, 0)?;
        let inputs = sample.inputs(&cfg);
        let forward = || flux.forward(&weights, &inputs);
        // The Euler update the sampler applies after each forward.
        let step = || -> Result<Tensor> {
            let v = forward()?;
            Ok(sample.img.add(&v.affine(-0.05, 0.0)?)?)
        };
        forward()?; // warm-up: weights materialised, pages touched
        let t_forward = fastest(args.rounds, || forward().map(drop))?;
        let t_step = fastest(args.rounds, || step().map(drop))?;
        let profile = if args.profile {
            profile::start();
            step()?;
            profile::stop()
        } else {
            Vec::new()
        };
        let t = torch.iter().find(|r| r.side == side);
        rows.push(Row {
            side,
            tokens: (side / 16).pow(2) + args.txt_tokens,
            forward: t_forward,
            step: t_step,
            torch_forward: t.map(|r| r.forward),
            torch_step: t.map(|r| r.step),
            profile,
        });
    }
    Ok(rows)
}

/// Runs the benchmark; returns its tables (or one JSON object per size).
pub fn run(args: &BenchCpuArgs) -> Result<String> {
    let cfg = config(args)?;
    let threads = crate::candle_core::utils::get_num_threads();
    eprintln!(
        "flow model: hidden {}, {} heads, {}+{} blocks; {} text tokens; f32, CPU ({}), {} threads; \
         fastest of {}",
        cfg.hidden_size,
        cfg.num_heads,
        cfg.depth,
        cfg.depth_single,
        args.txt_tokens,
        crate::tensor::cpu_kernels::describe(),
        threads,
        args.rounds
    );
    let rows = measure(args)?;
    let mut out = String::new();
    if args.json {
        for r in &rows {
            outln!(out, "{}", serde_json::to_string(r).unwrap_or_default());
        }
        return Ok(out);
    }
    outln!(
        out,
        "| size | tokens | forward s | step s | PyTorch forward s | PyTorch step s | step vs PyTorch |"
    );
    outln!(out, "|---|---|---|---|---|---|---|");
    let opt = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.3}"));
    for r in &rows {
        outln!(
            out,
            "| {}² | {} | {:.3} | {:.3} | {} | {} | {} |",
            r.side,
            r.tokens,
            r.forward,
            r.step,
            opt(r.torch_forward),
            opt(r.torch_step),
            r.torch_step
                .map_or("–".to_string(), |t| format!("{:.2}×", r.step / t))
        );
    }
    if args.profile {
        outln!(out);
        outln!(out, "One profiled step, seconds by class of operation:");
        outln!(out);
        let mut head = "| class |".to_string();
        let mut rule = "|---|".to_string();
        for r in &rows {
            head += &format!(" {}² s | share | calls |", r.side);
            rule += "---|---|---|";
        }
        outln!(out, "{head}");
        outln!(out, "{rule}");
        for class in profile::Class::ALL {
            let mut line = format!("| {} |", class.name());
            for r in &rows {
                let total: f64 = r.profile.iter().map(|p| p.1).sum();
                let (_, s, n) = r.profile[class as usize];
                line += &format!(" {s:.3} | {:.0} % | {n} |", 100.0 * s / total.max(1e-12));
            }
            outln!(out, "{line}");
        }
    }
    Ok(out)
}
