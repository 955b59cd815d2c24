//! The `fluxfit` command: parses flags, calls the library, shows progress, writes files.

// First, so that its macros (`outln!`, `errln!`, …) are in scope in every module below.
#[macro_use]
mod out;

mod edit;
mod fill;
mod generate;
mod plan;
mod quantize;
mod regions;
mod run_args;
mod serve;
mod source;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Counts heap bytes: on the CPU, the compute device's memory, measured per phase by the ledger
/// (`generate --report-memory`, `bench`).
#[global_allocator]
static ALLOC: fluxfit::memory::alloc::CountingAlloc = fluxfit::memory::alloc::CountingAlloc;

#[derive(Parser)]
#[command(
    name = "fluxfit",
    version,
    about = "FLUX.1 image generation that fits the memory you have"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// CPU threads for computing (matmuls, kernels, the planner's CPU rates); default: every
    /// core this process may use.
    #[arg(long, global = true, env = "FLUXFIT_THREADS", value_parser = clap::value_parser!(u16).range(1..=4096))]
    threads: Option<u16>,
}

/// Sizes the compute thread pool before any thread starts: rayon's global pool, and
/// `RAYON_NUM_THREADS`, which candle reads for its matmuls.
fn set_threads(n: u16) -> anyhow::Result<()> {
    // SAFETY: called first thing in `main`, before this process starts any other thread.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    rayon::ThreadPoolBuilder::new()
        .num_threads(n.into())
        .build_global()
        .map_err(|e| anyhow::anyhow!("--threads {n}: {e}"))
}

#[derive(Subcommand)]
enum Command {
    /// Text to image.
    Generate(generate::GenerateArgs),
    /// Inpaint (a mask or the image's alpha) or outpaint (--outpaint, --zoom-out) with a FLUX.1
    /// Fill model.
    Fill(fill::FillArgs),
    /// Edit an image by instruction with a FLUX.1 Kontext model.
    Edit(edit::EditArgs),
    /// A canvas larger than one pass, made as overlapping regions stitched with feathering
    /// (device memory of one region), or an enlarged image refined region by region (--from).
    Regions(regions::RegionsArgs),
    /// Time and measured peak memory of each residency plan at several resolutions, on a
    /// mid-size built-in model (CPU).
    Bench(fluxfit::bench::plans::BenchArgs),
    /// Serve the HTTP API (native jobs with live progress, OpenAI's images API) and the web UI,
    /// with the model loaded once.
    Serve(serve::ServeArgs),
    /// Run the jobs of a `fluxfit serve --broker` from the broker, with the model loaded once
    /// (any number of workers, on any machines).
    Worker(worker::WorkerArgs),
    /// Which residency plans fit a memory budget for a request, predicted without weights:
    /// peak per phase, time relative to all-resident, the fastest that fits.
    Plan(plan::PlanArgs),
    /// Write a flow model or T5 encoder as GGUF in a quantized storage type (q8_0 … q2_k),
    /// tensor by tensor.
    Quantize(quantize::QuantizeArgs),
    /// Storage types on a mid-size built-in flow model (CPU): bits per weight, error against
    /// f32, forward time resident and streamed, quantized matmul against dequantize + matmul.
    BenchQuant(fluxfit::bench::quant::BenchQuantArgs),
    /// The flow model's forward and denoising step in f32 on the CPU on a mid-size model,
    /// with time by class of operation (--profile), beside PyTorch's figures for the same
    /// model (--torch, from tools/reference/bench_cpu_vs_torch.py).
    BenchCpu(fluxfit::bench::cpu::BenchCpuArgs),
    /// On a GPU (a CUDA build): device, upload GB/s pageable vs pinned, the tiny model's image
    /// against the CPU's, and a FLUX.1-dev-shaped model's seconds per step and measured vs
    /// predicted peak under resident, streamed and partly resident plans (tools/device-check.sh).
    DeviceCheck(fluxfit::bench::device_check::DeviceCheckArgs),
}

/// A library report printed as it is.
fn print_report(report: fluxfit::Result<String>) -> anyhow::Result<()> {
    crate::out!("{}", report?)?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Large freed activations are kept for reuse up to this many MiB (default 1024; 0: off):
    // see `fluxfit::memory::alloc::keep_freed`.
    let keep_mib = std::env::var("FLUXFIT_KEEP_FREED_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1024);
    fluxfit::memory::alloc::keep_freed(keep_mib.min(1 << 30) << 20);
    if let Some(n) = cli.threads {
        if let Err(e) = set_threads(n) {
            errln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Fill(args) => fill::run(args),
        Command::Edit(args) => edit::run(args),
        Command::Regions(args) => regions::run(args),
        Command::Bench(args) => print_report(fluxfit::bench::plans::run(&args)),
        Command::Plan(args) => plan::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::BenchQuant(args) => print_report(fluxfit::bench::quant::run(&args)),
        Command::BenchCpu(args) => print_report(fluxfit::bench::cpu::run(&args)),
        Command::DeviceCheck(args) => print_report(fluxfit::bench::device_check::run(&args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
