//! `fluxfit bench-quant`: storage types on a mid-size built-in flow model (CPU): bytes per
//! weight, the flow output's error against f32, forward time resident and streamed relative to
//! f32, and, per type, candle's quantized matmul against dequantize + f32 matmul.

use std::sync::Arc;
use std::time::Instant;

use crate::candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use crate::candle_core::{DType, Device, Module, Tensor};
use crate::checkpoint::gguf;
use crate::checkpoint::layout::open_flow;
use crate::checkpoint::quantize::{self, QuantSpec};
use crate::checkpoint::store::TensorStore;
use crate::error::{Error, Result};
use crate::memory::residency::{Placement, Residency};
use crate::model::flow::{FlowConfig, FlowSample, Flux};
use crate::model::ops::linear;
use crate::noise::{torch_randn, NoiseKind};
use crate::pipeline::tiny::{self, TinyConfigs};
use crate::pipeline::LoadOptions;
use crate::variant::Variant;

#[derive(Debug, Clone)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct BenchQuantArgs {
    /// Flow model width (MLP 4×, heads of 64); a multiple of 256 so that every K-quant applies.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 512))]
    pub hidden: usize,
    /// Double-stream blocks.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 2))]
    pub depth: usize,
    /// Single-stream blocks.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 4))]
    pub depth_single: usize,
    /// Image tokens per forward (a square number); 64 text tokens are added.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 256))]
    pub tokens: usize,
    /// Timed runs per measurement, alternating with f32; the fastest is reported.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 5))]
    pub repeat: usize,
    /// Storage types, comma-separated (`fp8` is e4m3 with a per-tensor scale, ComfyUI's layout).
    #[cfg_attr(
        feature = "clap",
        arg(
            long,
            value_delimiter = ',',
            default_value = "bf16,f16,fp8,q8_0,q6_k,q5_k,q5_0,q4_k,q4_0,q3_k,q2_k"
        )
    )]
    pub types: Vec<String>,
    /// Keep the model and its quantized copies in this folder (default: a temporary one).
    #[cfg_attr(feature = "clap", arg(long))]
    pub dir: Option<std::path::PathBuf>,
}

/// Runs `a` and `b` alternately `repeat` times and returns the fastest time of each: on a
/// machine shared with other work, alternation exposes both to the same load, and the minimum
/// is the least disturbed run.
fn ab<T, U>(
    repeat: usize,
    mut a: impl FnMut() -> Result<T>,
    mut b: impl FnMut() -> Result<U>,
) -> Result<(f64, f64)> {
    let (mut ta, mut tb) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..repeat.max(1) {
        let s = Instant::now();
        a()?;
        ta = ta.min(s.elapsed().as_secs_f64());
        let s = Instant::now();
        b()?;
        tb = tb.min(s.elapsed().as_secs_f64());
    }
    Ok((ta, tb))
}

/// Seeded inputs of `tokens` image tokens (a square number) and 64 text tokens.
fn inputs(cfg: &FlowConfig, tokens: usize) -> Result<FlowSample> {
    let side = (tokens as f64).sqrt() as usize;
    if side * side != tokens {
        return Err(Error::InvalidRequest(format!(
            "--tokens {tokens}: must be a square number"
        )));
    }
    FlowSample::seeded(cfg, side, 64, 0)
}

/// One configuration's numbers: times relative to f32, measured alternately with it.
struct Row {
    name: String,
    bits: f64,
    err: f32,
    load: f64,
    resident: f64,
    stream: f64,
    /// Resident with block-quantized weights packed, dequantized per stage (`+packed`).
    packed: Option<f64>,
    /// Bytes held resident, packed, against f32.
    packed_bytes: Option<f64>,
    /// Resident with fast types multiplied quantized (`+qmatmul`): time and error.
    qmatmul: Option<(f64, f32)>,
}

/// A flow checkpoint ready to run resident and streamed.
struct Setup {
    store: Arc<TensorStore>,
    resident: Residency,
    streamed: Residency,
    packed: Residency,
    qmatmul: Residency,
}

impl Setup {
    fn new(store: TensorStore, flux: &Flux) -> Self {
        let store = Arc::new(store);
        let make = |placement| {
            Residency::new(
                store.clone(),
                flux.stages(),
                Device::Cpu,
                DType::F32,
                placement,
            )
        };
        Self {
            resident: make(Placement::Resident),
            packed: make(Placement::Resident).with_packed(true),
            qmatmul: make(Placement::Resident).with_qmatmul(true),
            streamed: make(Placement::Stream {
                group: 1,
                window: 2,
                keep: 0,
            }),
            store,
        }
    }

    /// Bits per weight in storage.
    fn bits(&self) -> f64 {
        let s = &self.store;
        let (mut params, mut bytes) = (0, 0);
        for k in s.keys() {
            if let Ok(i) = s.info(k) {
                params += i.numel();
                bytes += i.stored_bytes();
            }
        }
        8.0 * bytes as f64 / params as f64
    }

    /// Every tensor once out of the map into f32: the per-stage conversion cost.
    fn load_all(&self) -> Result<()> {
        for k in self.store.keys() {
            self.store.load(k, &Device::Cpu, DType::F32)?;
        }
        Ok(())
    }
}

fn forward(flux: &Flux, w: &Residency, inp: &FlowSample) -> Result<Tensor> {
    flux.forward(w, &inp.inputs(&flux.config))
}

fn rel_err(y: &Tensor, want: &Tensor) -> Result<f32> {
    let num = (y - want)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
    let den = want.sqr()?.sum_all()?.to_scalar::<f32>()?;
    Ok((num / den).sqrt())
}

fn measure(
    name: &str,
    base: &Setup,
    it: &Setup,
    flux: &Flux,
    inp: &FlowSample,
    want: &Tensor,
    repeat: usize,
) -> Result<Row> {
    let (l0, l1) = ab(repeat, || base.load_all(), || it.load_all())?;
    let out = forward(flux, &it.resident, inp)?;
    let (r0, r1) = ab(
        repeat,
        || forward(flux, &base.resident, inp),
        || forward(flux, &it.resident, inp),
    )?;
    forward(flux, &it.streamed, inp)?;
    let (s0, s1) = ab(
        repeat,
        || forward(flux, &base.streamed, inp),
        || forward(flux, &it.streamed, inp),
    )?;
    let packable = it.store.keys().any(|k| it.store.is_packable(k));
    let (packed, packed_bytes) = if packable {
        let y = forward(flux, &it.packed, inp)?;
        assert_eq!(
            rel_err(&y, &out)?,
            0.0,
            "packed and dequantized weights agree"
        );
        let (p0, p1) = ab(
            repeat,
            || forward(flux, &base.resident, inp),
            || forward(flux, &it.packed, inp),
        )?;
        (
            Some(p1 / p0),
            Some(it.packed.held_bytes() as f64 / base.resident.held_bytes() as f64),
        )
    } else {
        (None, None)
    };
    let fast = it.store.keys().any(|k| {
        it.store
            .gguf_raw(k)
            .is_some_and(|(t, _)| crate::memory::residency::fast_qmatmul(&Device::Cpu, t))
    });
    let qmatmul = if fast {
        let y = forward(flux, &it.qmatmul, inp)?;
        let (q0, q1) = ab(
            repeat,
            || forward(flux, &base.resident, inp),
            || forward(flux, &it.qmatmul, inp),
        )?;
        Some((q1 / q0, rel_err(&y, want)?))
    } else {
        None
    };
    Ok(Row {
        name: name.to_string(),
        bits: it.bits(),
        err: rel_err(&out, want)?,
        load: l1 / l0,
        resident: r1 / r0,
        stream: s1 / s0,
        packed,
        packed_bytes,
        qmatmul,
    })
}

/// The flow model in ComfyUI's scaled-fp8 layout (e4m3 matrices with `scale_weight`).
fn write_fp8(store: &TensorStore, path: &std::path::Path) -> Result<()> {
    let mut tensors = std::collections::HashMap::new();
    for key in store.keys() {
        let w = store.load(key, &Device::Cpu, DType::F32)?;
        if w.rank() == 2 {
            let s = w.abs()?.max_all()?.to_scalar::<f32>()? / 448.0;
            tensors.insert(key.clone(), (w / s as f64)?.to_dtype(DType::F8E4M3)?);
            let stem = key.strip_suffix(".weight").unwrap_or(key);
            tensors.insert(
                format!("{stem}.scale_weight"),
                Tensor::new(s, &Device::Cpu)?,
            );
        } else {
            tensors.insert(key.clone(), w);
        }
    }
    crate::candle_core::safetensors::save(&tensors, path)?;
    Ok(())
}

/// Runs the benchmark; returns its tables (Markdown).
pub fn run(args: &BenchQuantArgs) -> Result<String> {
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            d.clone()
        }
        None => {
            tmp = std::env::temp_dir().join(format!("fluxfit-bench-quant-{}", std::process::id()));
            std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
            tmp.clone()
        }
    };
    let mut out = String::new();
    let result = bench(args, &dir, &mut out);
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result.map(|()| out)
}

/// File sizes of the published FLUX.1-dev flow model and T5-XXL encoder in each type, under
/// `fluxfit quantize`'s default rules (from their manifests, no weights needed).
fn published_sizes(types: &[String], out: &mut String) -> Result<()> {
    use crate::checkpoint::quantize::Component;
    use crate::planner::manifest::Manifest;
    let size = |m: &Manifest, c: Component, t: GgmlDType| -> Result<(f64, f64)> {
        let shapes = m.entries.iter().map(|e| (e.name.clone(), e.shape.clone()));
        let plan = quantize::plan_shapes(shapes, c, &QuantSpec::new(t))
            .map_err(|k| Error::Config(format!("no GGUF name for `{k}`")))?;
        let bytes: usize = plan.iter().map(|c| c.nbytes()).sum();
        Ok((bytes as f64 / 1e9, 8.0 * bytes as f64 / m.params() as f64))
    };
    let (flow, t5) = (Manifest::flow(Variant::Dev), Manifest::t5_xxl());
    outln!(
        out,
        "
| type | FLUX.1-dev flow | bits/weight | T5-XXL encoder |"
    );
    outln!(out, "|---|---|---|---|");
    for t in std::iter::once("f32").chain(types.iter().map(String::as_str)) {
        let Ok(ggml) = gguf::parse_type(t) else {
            continue;
        };
        let (f, bits) = size(&flow, Component::Flow, ggml)?;
        let (e, _) = size(&t5, Component::T5, ggml)?;
        outln!(out, "| {t} | {f:.2} GB | {bits:.2} | {e:.2} GB |");
    }
    Ok(())
}

fn bench(args: &BenchQuantArgs, dir: &std::path::Path, out: &mut String) -> Result<()> {
    let src = dir.join("flow.safetensors");
    if !src.exists() {
        let configs = TinyConfigs::sized(Variant::Dev, args.hidden, args.depth, args.depth_single)?;
        drop(tiny::load_with(
            &configs,
            Some(dir),
            LoadOptions::default(),
        )?);
    }
    let store = open_flow(&src)?;
    let flux = Flux::new(FlowConfig::from_store(&store)?, None);
    let inp = inputs(&flux.config, args.tokens)?;
    let params: usize = store
        .keys()
        .map(|k| store.info(k).map_or(0, |i| i.numel()))
        .sum();
    eprintln!(
        "flow model: hidden {}, {}+{} blocks, {:.1} M parameters; {} image + 64 text tokens; \
         CPU, {} threads, fastest of {}",
        flux.config.hidden_size,
        flux.config.depth,
        flux.config.depth_single,
        params as f64 / 1e6,
        args.tokens,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        args.repeat
    );

    let base = Setup::new(open_flow(&src)?, &flux);
    let want = forward(&flux, &base.resident, &inp)?;
    forward(&flux, &base.streamed, &inp)?;
    let (l0, r0, s0) = {
        let (l, _) = ab(args.repeat, || base.load_all(), || Ok(()))?;
        let (r, _) = ab(
            args.repeat,
            || forward(&flux, &base.resident, &inp),
            || Ok(()),
        )?;
        let (s, _) = ab(
            args.repeat,
            || forward(&flux, &base.streamed, &inp),
            || Ok(()),
        )?;
        (l, r, s)
    };
    let mut rows = vec![Row {
        name: "f32".into(),
        bits: base.bits(),
        err: 0.0,
        load: 1.0,
        resident: 1.0,
        stream: 1.0,
        packed: None,
        packed_bytes: None,
        qmatmul: None,
    }];
    for t in &args.types {
        let (path, secs) = if t == "fp8" {
            let p = dir.join("flow-fp8.safetensors");
            let s = Instant::now();
            if !p.exists() {
                write_fp8(&store, &p)?;
            }
            (p, s.elapsed().as_secs_f64())
        } else {
            let ggml = gguf::parse_type(t)?;
            let p = dir.join(format!("flow-{t}.gguf"));
            let s = Instant::now();
            if !p.exists() {
                quantize::quantize_store(&store, &QuantSpec::new(ggml), &p)?;
            }
            (p, s.elapsed().as_secs_f64())
        };
        eprintln!("{t}: written in {secs:.1} s");
        let it = Setup::new(open_flow(&path)?, &flux);
        rows.push(measure(t, &base, &it, &flux, &inp, &want, args.repeat)?);
    }

    outln!(out,
        "| storage | bits/weight | flow rel. error | materialise in f32 | resident forward | streamed forward | packed resident forward | packed bytes held | qmatmul resident forward | qmatmul error |"
    );
    outln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    let opt = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.2}×"));
    for r in &rows {
        outln!(
            out,
            "| {} | {:.2} | {:.1e} | {:.2}× | {:.2}× | {:.2}× | {} | {} | {} | {} |",
            r.name,
            r.bits,
            r.err,
            r.load,
            r.resident,
            r.stream,
            opt(r.packed),
            opt(r.packed_bytes),
            opt(r.qmatmul.map(|q| q.0)),
            r.qmatmul
                .map_or("—".to_string(), |q| format!("{:.1e}", q.1))
        );
    }
    outln!(
        out,
        "\nf32: materialise {:.0} ms, resident forward {:.0} ms, streamed (stream:1:2) {:.0} ms \
         (fastest of {}; each type's times are relative to f32 runs alternated with its own)",
        l0 * 1e3,
        r0 * 1e3,
        s0 * 1e3,
        args.repeat
    );

    // One matrix of the MLP (4h × h) applied to the forward's tokens.
    let (h, m) = (flux.config.hidden_size, flux.config.mlp_hidden);
    let rows_x = args.tokens + 64;
    let w = Tensor::from_vec(
        torch_randn(11, m * h, NoiseKind::TorchF32),
        (m, h),
        &Device::Cpu,
    )?;
    let x = Tensor::from_vec(
        torch_randn(12, rows_x * h, NoiseKind::TorchF32),
        (rows_x, h),
        &Device::Cpu,
    )?;
    let reps = args.repeat.max(3);
    let (dense, _) = ab(reps, || linear(&x, &w, None), || Ok(()))?;
    let exact = linear(&x, &w, None)?;
    let rel = |y: &Tensor| -> Result<f32> {
        let num = (y - &exact)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
        let den = exact.sqr()?.sum_all()?.to_scalar::<f32>()?;
        Ok((num / den).sqrt())
    };
    outln!(
        out,
        "\nmatmul [{rows_x}×{h}]·[{m}×{h}]ᵀ: f32 {:.2} ms",
        dense * 1e3
    );
    outln!(out,
        "| type | QMatMul time | dequantize | dequantize + f32 matmul | error, dequantize + f32 | error, QMatMul |"
    );
    outln!(out, "|---|---|---|---|---|---|");
    for t in &args.types {
        let Ok(ggml) = gguf::parse_type(t) else {
            continue;
        };
        if matches!(ggml, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            continue;
        }
        let q = Arc::new(QTensor::quantize(&w, ggml)?);
        let mm = QMatMul::from_arc(q.clone())?;
        let (dense, qmm) = ab(reps, || linear(&x, &w, None), || Ok(mm.forward(&x)?))?;
        let (_, deq) = ab(reps, || Ok(()), || Ok(q.dequantize(&Device::Cpu)?))?;
        // QMatMul quantizes the activations too (to 8 bits): its own error on top.
        let e_deq = rel(&linear(&x, &q.dequantize(&Device::Cpu)?, None)?)?;
        let e_qmm = rel(&mm.forward(&x)?)?;
        outln!(
            out,
            "| {t} | {:.2}× | {:.2}× | {:.2}× | {e_deq:.1e} | {e_qmm:.1e} |",
            qmm / dense,
            deq / dense,
            (deq + dense) / dense
        );
    }
    published_sizes(&args.types, out)
}
