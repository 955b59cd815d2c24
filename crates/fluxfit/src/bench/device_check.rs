//! `fluxfit device-check`: what a CUDA build does on the GPU it runs on, as one Markdown table
//! (run by `tools/device-check.sh` on a lent GPU machine):
//!
//! - the device: name, compute capability, driver, memory;
//! - uploads: host → device GB/s from ordinary (pageable) memory, as candle copies, and through
//!   the pinned staging ring on the copy stream, as streamed weights travel;
//! - the built-in tiny model's image on the GPU (f32 and bf16) against the same binary's CPU
//!   image, in 8-bit levels;
//! - a FLUX.1-dev-shaped flow model (hidden 3072, 19 + 38 blocks, 23.8 GB of bf16 values
//!   written to `--dir` first; text encoders and VAE tiny): seconds per denoising step at each
//!   size under resident, streamed 1×2 and 1×1, and the partial residency the planner picks for
//!   `--budget`, with the measured peak (the memory pool's high-water mark) beside the
//!   planner's prediction, and how much of the copy time the overlap hid.

use std::path::PathBuf;

use crate::error::Result;

#[derive(Debug, Clone)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct DeviceCheckArgs {
    /// Folder for the full-size checkpoint (about 24 GB; written once, reused).
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value = "/tmp/fluxfit-device-check")
    )]
    pub dir: PathBuf,
    /// Square image sides of the full-size runs, comma-separated.
    #[cfg_attr(
        feature = "clap",
        arg(long, value_delimiter = ',', default_value = "512,1024")
    )]
    pub sizes: Vec<usize>,
    /// Denoising steps of a timed run (at least 2).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 4))]
    pub steps: usize,
    /// Device memory the partial-residency plan is chosen for (`16GB`).
    #[cfg_attr(feature = "clap", arg(long, default_value = "16GB"))]
    pub budget: String,
    /// Skip the full-size model (device, uploads and tiny images only).
    #[cfg_attr(feature = "clap", arg(long))]
    pub skip_full: bool,
    /// CUDA device index.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0))]
    pub gpu: usize,
}

/// Runs the check; a build without CUDA says how to get one.
pub fn run(args: &DeviceCheckArgs) -> Result<String> {
    #[cfg(feature = "cuda")]
    {
        cuda::run(args)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = args;
        Err(crate::error::Error::Config(
            "device-check needs a CUDA build: tools/cuda/setup.sh && tools/cuda/build.sh 90".into(),
        ))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::time::Instant;

    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::memory::cuda::{open, CudaUploader};
    use crate::memory::plan::{Placement, Plan};
    use crate::noise::NoiseKind;
    use crate::pipeline::tiny::{self, TinyConfigs};
    use crate::pipeline::{LoadOptions, Model, Request};
    use crate::planner::choice::{choose, Choosing, Quant};
    use crate::planner::{parse_bytes, predict, Budget, DeviceProfile, ModelSpec, Workload};
    use crate::variant::Variant;

    /// The table's last line, on standard error as soon as it is known (a run cut short by a
    /// time limit still shows its rows).
    fn progress(out: &str) {
        if let Some(line) = out.trim_end().lines().last() {
            eprintln!("{line}");
        }
    }

    fn gib(b: usize) -> f64 {
        b as f64 / (1u64 << 30) as f64
    }

    fn synchronize(device: &Device) -> Result<()> {
        device.synchronize()?;
        Ok(())
    }

    pub fn run(args: &DeviceCheckArgs) -> Result<String> {
        let device = open(args.gpu)?;
        let Device::Cuda(cuda) = &device else {
            unreachable!("open gives a CUDA device")
        };
        let ctx = cuda.cuda_stream().context().clone();
        let mut out = String::new();
        let attr = |a| ctx.attribute(a).unwrap_or(-1);
        let (major, minor) = (
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        );
        let mut driver = 0;
        // SAFETY: writes one int.
        unsafe {
            let _ = sys::cuDriverGetVersion(&mut driver);
        }
        let (free, total) = ctx.mem_get_info().unwrap_or((0, 0));
        outln!(out, "| check | result |");
        outln!(out, "| --- | --- |");
        outln!(
            out,
            "| device | {} · compute capability {major}.{minor} · CUDA driver {}.{} · {:.1} GiB ({:.1} free) |",
            ctx.name().unwrap_or_else(|_| "?".into()),
            driver / 1000,
            driver % 1000 / 10,
            gib(total),
            gib(free)
        );
        progress(&out);

        // Uploads: 1 GiB of bf16, best of three.
        let n = 1usize << 29;
        let host: Vec<half::bf16> = (0..n)
            .map(|i| half::bf16::from_f32((i % 251) as f32))
            .collect();
        let bytes = unsafe { std::slice::from_raw_parts(host.as_ptr() as *const u8, n * 2) };
        let mut pageable = f64::MAX;
        let mut pinned = f64::MAX;
        let up = CudaUploader::for_device(&device)?.expect("a CUDA device has an uploader");
        for _ in 0..3 {
            let t = Instant::now();
            let a = Tensor::from_slice(&host, n, &Device::Cpu)?.to_device(&device)?;
            synchronize(&device)?;
            pageable = pageable.min(t.elapsed().as_secs_f64());
            drop(a);
            let t = Instant::now();
            let b = up.upload(bytes, DType::BF16, &[n])?;
            let _ = b.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            pinned = pinned.min(t.elapsed().as_secs_f64());
        }
        let gbs = |s: f64| (n * 2) as f64 / s / 1e9;
        let pinned_gbs = gbs(pinned);
        outln!(
            out,
            "| upload 1 GiB | pageable {:.1} GB/s · pinned ring on the copy stream {:.1} GB/s |",
            gbs(pageable),
            pinned_gbs
        );
        progress(&out);
        drop(host);

        tiny_images(&device, &mut out)?;
        if !args.skip_full {
            full_size(args, &device, pinned_gbs * 1e9, &mut out)?;
        }
        Ok(out)
    }

    fn request(side: usize, steps: usize, t5_tokens: usize) -> Request {
        Request {
            prompt: "a lighthouse on a cliff at dusk".into(),
            width: side,
            height: side,
            steps,
            guidance: 3.5,
            seed: 7,
            t5_tokens,
            noise: NoiseKind::TorchF32,
        }
    }

    fn rgb(model: &mut Model, req: &Request) -> Result<Vec<u8>> {
        let out = model.text_to_image(req, &mut |_| {})?;
        Ok(crate::image::to_rgb8(&out.image.to_device(&Device::Cpu)?)?.data)
    }

    /// The tiny model on the GPU in f32 and bf16 against the CPU's f32 image.
    fn tiny_images(device: &Device, out: &mut String) -> Result<()> {
        let req = request(256, 4, 64);
        let load = |device: &Device, dtype| {
            tiny::load(LoadOptions {
                device: device.clone(),
                dtype,
                ..LoadOptions::default()
            })
        };
        let cpu = rgb(&mut load(&Device::Cpu, DType::F32)?, &req)?;
        for dtype in [DType::F32, DType::BF16] {
            let gpu = rgb(&mut load(device, dtype)?, &req)?;
            let diffs: Vec<u8> = cpu.iter().zip(&gpu).map(|(a, b)| a.abs_diff(*b)).collect();
            let max = diffs.iter().copied().max().unwrap_or(0);
            let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len().max(1) as f64;
            let within =
                diffs.iter().filter(|&&d| d <= 1).count() as f64 / diffs.len().max(1) as f64;
            outln!(
                out,
                "| tiny model 256², {dtype:?} on the GPU vs f32 on the CPU | max {max}/255 · mean {mean:.3}/255 · {:.2}% within 1/255 |",
                100.0 * within
            );
            progress(out);
        }
        Ok(())
    }

    /// Seconds per step: a warm-up run, then runs of 1 and `steps` steps (each ends with the
    /// image read back, so the GPU has finished); the difference over `steps - 1`.
    fn per_step(model: &mut Model, side: usize, steps: usize) -> Result<(f64, usize)> {
        let t5 = 64;
        model.text_to_image(&request(side, 1, t5), &mut |_| {})?;
        let time = |model: &mut Model, steps| -> Result<(f64, usize)> {
            let t = Instant::now();
            let out = model.text_to_image(&request(side, steps, t5), &mut |_| {})?;
            let _ = out.image.to_device(&Device::Cpu)?;
            Ok((t.elapsed().as_secs_f64(), out.memory.peak))
        };
        let (one, _) = time(model, 1)?;
        let (many, peak) = time(model, steps)?;
        Ok(((many - one).max(0.0) / (steps - 1) as f64, peak))
    }

    fn full_size(
        args: &DeviceCheckArgs,
        device: &Device,
        upload_bps: f64,
        out: &mut String,
    ) -> Result<()> {
        let steps = args.steps.max(2);
        let configs = TinyConfigs::sized(Variant::Dev, 3072, 19, 38)?;
        if !args.dir.join("flow.safetensors").exists() {
            let t = Instant::now();
            eprintln!(
                "writing a FLUX.1-dev-shaped checkpoint to {}",
                args.dir.display()
            );
            tiny::write_dir(&configs, &args.dir)?;
            eprintln!("written in {:.0} s", t.elapsed().as_secs_f64());
        }
        let mut model = tiny::open_dir(
            &configs,
            &args.dir,
            LoadOptions {
                device: device.clone(),
                dtype: DType::BF16,
                attn_chunk: Some(crate::model::attention::DEFAULT_CHUNK),
                ..LoadOptions::default()
            },
        )?;
        let spec = ModelSpec::from_model(&model);
        let (_, total) = match device {
            Device::Cuda(c) => c.cuda_stream().context().mem_get_info().unwrap_or((0, 0)),
            _ => (0, 0),
        };
        let profile = DeviceProfile::generic_cuda(Some(total as u64));
        let stage_bytes = model.flow.weights.stage_bytes();
        let flow_bytes: usize = stage_bytes.iter().sum();
        let budget = Budget {
            bytes: parse_bytes(&args.budget)?,
        };
        outln!(
            out,
            "\n{} · flow {:.2} GB bf16 in {} stages · {steps} steps timed · attention chunk {}\n",
            model.name,
            flow_bytes as f64 / 1e9,
            stage_bytes.len(),
            crate::model::attention::DEFAULT_CHUNK
        );
        outln!(out, "| size | plan | s/step | vs resident | measured peak | predicted | measured/predicted | copy hidden |");
        outln!(out, "| --- | --- | --- | --- | --- | --- | --- | --- |");
        let base = Plan::resident(DType::BF16, Some(crate::model::attention::DEFAULT_CHUNK));
        for &side in &args.sizes {
            let req = request(side, steps, 64);
            req.validate(true)?;
            let workload = Workload::of(&req);
            let partial = choose(
                &spec,
                &Choosing {
                    request: workload.clone(),
                    device: profile.clone(),
                    budget,
                    dtype: DType::BF16,
                    attn_chunk: base.attn_chunk,
                    quant: Quant::None,
                },
            )?
            .plan;
            let mut plans: Vec<(String, Plan)> = ["resident", "stream:1:2", "stream:1:1"]
                .iter()
                .map(|s| Ok((s.to_string(), base.with_spec(s)?)))
                .collect::<Result<_>>()?;
            plans.push((format!("planned for {}", args.budget), partial));
            let mut resident_s = None;
            for (label, plan) in plans {
                eprintln!("{side}²: {label} ({})", plan.spec());
                model.set_plan(plan.clone());
                let (s, peak) = per_step(&mut model, side, steps)?;
                let predicted = predict(&spec, &workload, &plan, &profile).peak as usize;
                let resident = *resident_s.get_or_insert(s);
                let streamed: usize = match plan.flow.placement {
                    Placement::Stream { keep, .. } => {
                        stage_bytes[keep.min(stage_bytes.len())..].iter().sum()
                    }
                    _ => 0,
                };
                let hidden = if streamed > 0 {
                    let copy = streamed as f64 / upload_bps;
                    format!(
                        "{:.0}%",
                        100.0 * ((copy - (s - resident)) / copy).clamp(0.0, 1.0)
                    )
                } else {
                    "—".into()
                };
                outln!(
                    out,
                    "| {side}² | {label} `{}` | {s:.3} | {:.2}× | {:.2} GiB | {:.2} GiB | {:.2} | {hidden} |",
                    plan.flow.placement.spec(),
                    s / resident,
                    gib(peak),
                    gib(predicted),
                    peak as f64 / predicted.max(1) as f64
                );
                progress(out);
            }
        }
        Ok(())
    }
}
