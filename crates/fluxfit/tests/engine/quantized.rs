//! Quantized and low-precision weights: GGUF and fp8 checkpoints read exactly as their writers
//! mean them, and the flow model's error per storage type and compute dtype, bounded.
//!
//! Exactness (fixtures written by independent tools, `tools/reference/make_gguf_fixture.py`):
//! every GGUF type dequantizes to gguf-py's numpy values bit for bit, our quantizer produces
//! gguf-py's bytes for the types gguf-py can quantize, and fp8 (with per-tensor, per-channel and
//! block scales) reads as torch's `w.float() * scale`.
//!
//! Error bounds: relative L2 error of the flow model's output, ‖y_q − y‖ / ‖y‖, against the same
//! model with f32 weights and f32 compute, on fixed inputs. Each bound is the measured error
//! (noted beside it, this CPU, candle 0.11.1) times about 1.5, rounded up: tight enough that a
//! wrong block decode, a transposed tensor or a lost scale (errors of order 1) fails, loose
//! enough for summation-order noise. Never loosen one to make a test pass.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::*;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use fluxfit::checkpoint::gguf::{self, GgufFile};
use fluxfit::checkpoint::layout::{open_flow, open_t5};
use fluxfit::checkpoint::quantize::{self, QuantSpec, Reason};
use fluxfit::checkpoint::safetensors::SafetensorsFile;
use fluxfit::checkpoint::store::TensorStore;
use fluxfit::memory::residency::{Placement, Residency};
use fluxfit::model::flow::{FlowConfig, FlowSample, Flux};
use fluxfit::model::t5::{T5Config, T5Encoder};

use fluxfit::pipeline::tiny::{self, TinyConfigs};
use fluxfit::pipeline::LoadOptions;
use fluxfit::variant::Variant;

fn quant(name: &str) -> PathBuf {
    fixtures().join("quant").join(name)
}

fn tiny_dev() -> PathBuf {
    fixtures().join("tiny-bfl/flux1-tiny-dev.safetensors")
}

/// ‖a − b‖₂ / ‖b‖₂.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let num = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap();
    let den = b.sqr().unwrap().sum_all().unwrap();
    (num.to_scalar::<f32>().unwrap() / den.to_scalar::<f32>().unwrap()).sqrt()
}

/// Same values bit for bit (NaNs count as equal to NaNs).
fn assert_bits_equal(what: &str, ours: &Tensor, golden: &Tensor) {
    assert_eq!(ours.dims(), golden.dims(), "{what}: shapes differ");
    let a = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = golden.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
            "{what}[{i}]: {x} (ours) vs {y} (golden)"
        );
    }
}

fn golden_map(file: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(quant(file), &Device::Cpu).expect("golden file")
}

fn flux_of(store: &TensorStore) -> Flux {
    let cfg = FlowConfig::from_store(store).expect("config from shapes");
    cfg.validate(store).expect("shapes");
    Flux::new(cfg, None)
}

/// The golden inputs of one forward pass of the tiny dev model.
fn golden_inputs() -> FlowSample {
    let g = |n: &str| golden("flow_dev.safetensors", n);
    FlowSample {
        img: g("img"),
        img_ids: g("img_ids"),
        txt: g("txt"),
        txt_ids: g("txt_ids"),
        timesteps: g("timesteps"),
        y: g("y"),
        guidance: g("guidance"),
    }
}

fn forward(store: TensorStore, dtype: DType, placement: Placement, inp: &FlowSample) -> Tensor {
    let flux = flux_of(&store);
    let w = Residency::new(
        Arc::new(store),
        flux.stages(),
        Device::Cpu,
        dtype,
        placement,
    );
    let out = flux
        .forward(&w, &inp.inputs(&flux.config))
        .expect("forward");
    out.to_dtype(DType::F32).unwrap()
}

fn f32_forward(path: &Path, inp: &FlowSample) -> Tensor {
    forward(
        open_flow(path).unwrap(),
        DType::F32,
        Placement::Resident,
        inp,
    )
}

// ------------------------------------------------------------------------------------------
// Exactness against the independent writers

#[test]
fn gguf_written_by_gguf_py_dequantizes_bit_exact() {
    let file = GgufFile::open(quant("types.gguf")).unwrap();
    assert_eq!(file.architecture(), Some("fluxfit-test"));
    let golden = golden_map("types_golden.safetensors");
    let mut seen = 0;
    for (name, want) in &golden {
        if name.ends_with(".source") {
            continue;
        }
        let ours = file
            .load(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .to_dtype(DType::F32)
            .unwrap();
        assert_bits_equal(name, &ours, want);
        seen += 1;
    }
    // Q8_0 Q4_0 Q4_1 Q5_0 Q5_1, five K-quants, F16 BF16 F32, 3-D, orig_shape.
    assert_eq!(seen, 15);
    assert_eq!(file.tensors()["q8_0_3d"].shape, [2, 4, 32]);
    assert_eq!(file.tensors()["reshaped"].shape, [4, 2, 2, 4]);
    assert_eq!(file.tensors()["q4_k"].ggml, GgmlDType::Q4K);
}

#[test]
fn our_quantizer_writes_gguf_py_bytes() {
    let file = GgufFile::open(quant("types.gguf")).unwrap();
    let golden = golden_map("types_golden.safetensors");
    for (name, t) in [
        ("q8_0", GgmlDType::Q8_0),
        ("q4_0", GgmlDType::Q4_0),
        ("q4_1", GgmlDType::Q4_1),
        ("q5_0", GgmlDType::Q5_0),
        ("q5_1", GgmlDType::Q5_1),
    ] {
        let source = &golden[&format!("{name}.source")];
        let ours = quantize::quantize_tensor(source, t).unwrap();
        let (_, theirs) = file.raw(name).unwrap();
        let differ = ours
            .chunks(t.type_size())
            .zip(theirs.chunks(t.type_size()))
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(differ, 0, "{name}: {differ} blocks differ from gguf-py's");
    }
}

#[test]
fn fp8_reads_as_torch_with_every_scale_layout() {
    let file = SafetensorsFile::open(quant("fp8.safetensors")).unwrap();
    let mut store = TensorStore::from_files(quant("fp8.safetensors"), vec![file], &[]);
    store.attach_fp8_scales().unwrap();
    let keys: Vec<&str> = store.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["a.bias", "a.weight", "b.weight", "c.weight", "d.weight", "e.weight"],
        "scales and the scaled_fp8 marker are not weights"
    );
    assert_eq!(store.info("a.weight").unwrap().dtype, DType::F8E4M3);
    assert_eq!(store.info("e.weight").unwrap().stored_bytes(), 256);
    let golden = golden_map("fp8_golden.safetensors");
    for (name, want) in &golden {
        let ours = store.load(name, &Device::Cpu, DType::F32).unwrap();
        assert_bits_equal(name, &ours, want);
    }
}

// ------------------------------------------------------------------------------------------
// Published layouts

/// city96's FLUX layout (architecture `flux`, BFL names, Q8_0 matrices, F16 embedders, F32
/// vectors), written by gguf-py: loads under canonical names and runs.
#[test]
fn flux_gguf_from_gguf_py_loads_and_runs() {
    let path = quant("flux1-tiny-dev-Q8_0.gguf");
    let store = open_flow(&path).unwrap();
    let reference = open_flow(&tiny_dev()).unwrap();
    assert_eq!(
        store.keys().collect::<Vec<_>>(),
        reference.keys().collect::<Vec<_>>()
    );
    let info = store.info("double_blocks.0.img_attn.qkv.weight").unwrap();
    assert_eq!(info.ggml, Some(GgmlDType::Q8_0));
    assert_eq!(info.shape, [192, 64]);
    assert_eq!(info.stored_bytes(), 192 * 64 / 32 * 34);
    // F32 and F16 tensors come back exactly (the fixture's weights are bf16, exact in f16 here).
    for key in [
        "img_in.bias",
        "double_blocks.0.img_attn.norm.query_norm.scale",
    ] {
        let a = store.load(key, &Device::Cpu, DType::F32).unwrap();
        let b = reference.load(key, &Device::Cpu, DType::F32).unwrap();
        assert_bits_equal(key, &a, &b);
    }
    let inp = golden_inputs();
    let want = f32_forward(&tiny_dev(), &inp);
    let got = forward(store, DType::F32, Placement::Resident, &inp);
    let err = rel_err(&got, &want);
    println!("gguf-py Q8_0 flow: relative error {err:.3e}");
    // Measured 3.2e-3, the same as our own Q8_0 (whose bytes are gguf-py's).
    assert!(err < 5e-3, "relative error {err}");
}

/// city96's T5 layout (llama.cpp names, architecture `t5encoder`), written by gguf-py.
#[test]
fn t5_gguf_with_llama_names_loads_and_runs() {
    let dir = fixtures().join("tiny-diffusers/text_encoder_2");
    let store = open_t5(&quant("t5-tiny-encoder-Q8_0.gguf")).unwrap();
    let reference = open_t5(&dir).unwrap();
    assert_eq!(
        store.keys().collect::<Vec<_>>(),
        reference.keys().collect::<Vec<_>>(),
        "llama.cpp names map to transformers'"
    );
    let cfg = T5Config::from_store(&store, None).unwrap();
    assert_eq!(cfg, T5Config::from_store(&reference, None).unwrap());
    let ids = golden("t5.safetensors", "input_ids")
        .to_dtype(DType::U32)
        .unwrap();
    let run = |store: TensorStore| {
        let enc = T5Encoder::new(cfg.clone());
        let w = Residency::new(
            Arc::new(store),
            enc.stages(),
            Device::Cpu,
            DType::F32,
            Placement::Resident,
        );
        enc.forward_ids(&w, &ids).unwrap()
    };
    let err = rel_err(&run(store), &run(reference));
    println!("gguf-py Q8_0 T5: relative error {err:.3e}");
    // Measured 1.07e-2 (rows of 32: one Q8_0 block per row).
    assert!(err < 1.6e-2, "relative error {err}");
}

#[test]
fn gguf_of_another_architecture_or_truncated_is_refused() {
    let err = open_flow(&quant("t5-tiny-encoder-Q8_0.gguf"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("t5encoder") && err.contains("flux"), "{err}");
    let err = open_t5(&quant("flux1-tiny-dev-Q8_0.gguf"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`flux`"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(quant("flux1-tiny-dev-Q8_0.gguf")).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = open_flow(&cut).unwrap_err().to_string();
    assert!(
        err.contains("cut.gguf") && err.contains("truncated"),
        "{err}"
    );
    std::fs::write(&cut, &bytes[..100]).unwrap();
    let err = open_flow(&cut).unwrap_err().to_string();
    assert!(err.contains("not a valid GGUF"), "{err}");
}

// ------------------------------------------------------------------------------------------
// Our writer

/// Quantize → read back: names, types and fallbacks as planned; the python reader's view is
/// checked by `tools/reference` (see docs/quantization.md); re-quantizing a GGUF to its own type
/// copies bytes; an existing output is never replaced.
#[test]
fn quantize_writes_what_it_plans() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_flow(&tiny_dev()).unwrap();
    let out = dir.path().join("q4k.gguf");
    let (choices, summary) =
        quantize::quantize_store(&store, &QuantSpec::new(GgmlDType::Q4K), &out).unwrap();
    let by = |k: &str| choices.iter().find(|c| c.key == k).unwrap();
    // Rows of 64 cannot hold 256-blocks: llama.cpp's fallback.
    let qkv = by("double_blocks.0.img_attn.qkv.weight");
    assert_eq!(qkv.ggml, GgmlDType::Q5_0);
    assert_eq!(
        qkv.reason,
        Reason::Fallback {
            wanted: GgmlDType::Q4K,
            row: 64
        }
    );
    assert_eq!(by("double_blocks.0.img_mlp.2.weight").ggml, GgmlDType::Q4K);
    assert_eq!(by("img_in.weight").reason, Reason::HighPrecision);
    assert_eq!(by("img_in.bias").reason, Reason::OneDim);
    assert_eq!(by("img_in.bias").ggml, GgmlDType::F32);

    let read = GgufFile::open(&out).unwrap();
    assert_eq!(read.architecture(), Some("flux"));
    assert_eq!(read.tensors().len(), choices.len());
    for c in &choices {
        let t = &read.tensors()[&c.name];
        assert_eq!((t.ggml, &t.shape), (c.ggml, &c.shape), "{}", c.name);
    }
    assert_eq!(
        summary.bytes_out as u64,
        std::fs::metadata(&out).unwrap().len()
    );

    // GGUF in, same type out: the bytes are copied.
    let q8 = dir.path().join("q8.gguf");
    quantize::quantize_store(&store, &QuantSpec::new(GgmlDType::Q8_0), &q8).unwrap();
    let again = dir.path().join("q8-again.gguf");
    let spec = QuantSpec::new(GgmlDType::Q8_0);
    quantize::quantize_store(&open_flow(&q8).unwrap(), &spec, &again).unwrap();
    assert_eq!(std::fs::read(&q8).unwrap(), std::fs::read(&again).unwrap());

    // --keep overrides, first match wins.
    let mut spec = QuantSpec::new(GgmlDType::Q4_0);
    spec.keep.push(("single_blocks.*".into(), GgmlDType::F16));
    spec.keep.push(("*".into(), GgmlDType::Q8_0));
    let keep = dir.path().join("keep.gguf");
    let (choices, _) = quantize::quantize_store(&store, &spec, &keep).unwrap();
    let by = |k: &str| choices.iter().find(|c| c.key == k).unwrap().ggml;
    assert_eq!(by("single_blocks.0.linear1.weight"), GgmlDType::F16);
    assert_eq!(by("double_blocks.0.img_mlp.0.weight"), GgmlDType::Q8_0);
    assert_eq!(by("img_in.bias"), GgmlDType::Q8_0);

    // Never replaces a file, and leaves no partial file behind.
    let before = std::fs::read(&out).unwrap();
    let err = quantize::quantize_store(&store, &QuantSpec::new(GgmlDType::Q8_0), &out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("exists"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), before);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("partial")), "{names:?}");
}

#[test]
fn quantized_t5_round_trips_in_llama_names() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-diffusers/text_encoder_2");
    let store = open_t5(&src).unwrap();
    let out = dir.path().join("t5.gguf");
    let (choices, _) =
        quantize::quantize_store(&store, &QuantSpec::new(GgmlDType::Q8_0), &out).unwrap();
    let read = GgufFile::open(&out).unwrap();
    assert_eq!(read.architecture(), Some("t5encoder"));
    assert!(read.tensors().contains_key("enc.blk.1.attn_q.weight"));
    assert!(read.tensors().contains_key("token_embd.weight"));
    let rel = choices
        .iter()
        .find(|c| c.name == "enc.blk.0.attn_rel_b.weight")
        .unwrap();
    assert_eq!(rel.ggml, GgmlDType::F32);
    let back = open_t5(&out).unwrap();
    assert_eq!(
        back.keys().collect::<Vec<_>>(),
        store.keys().collect::<Vec<_>>()
    );
}

// ------------------------------------------------------------------------------------------
// Error per storage type

fn type_errors(src: &Path, types: &[GgmlDType], inp: &FlowSample) -> Vec<(GgmlDType, f32, usize)> {
    let dir = tempfile::tempdir().unwrap();
    let want = f32_forward(src, inp);
    let store = open_flow(src).unwrap();
    types
        .iter()
        .map(|t| {
            let out = dir.path().join(format!("{}.gguf", gguf::type_name(*t)));
            let (choices, _) = quantize::quantize_store(&store, &QuantSpec::new(*t), &out).unwrap();
            let fallbacks = choices
                .iter()
                .filter(|c| matches!(c.reason, Reason::Fallback { .. }))
                .count();
            let got = forward(
                open_flow(&out).unwrap(),
                DType::F32,
                Placement::Resident,
                inp,
            );
            let err = rel_err(&got, &want);
            println!(
                "{:>5}: relative error {err:.3e} ({fallbacks} tensors fell back)",
                gguf::type_name(*t)
            );
            (*t, err, fallbacks)
        })
        .collect()
}

/// The tiny fixture model (rows of 64 and 256: the K-quants mostly fall back, see below).
#[test]
fn tiny_flow_error_per_type() {
    // (type, bound); measured on this CPU in the comments.
    let bounds = [
        (GgmlDType::F16, 1e-6), // 7.5e-8 (the weights are bf16: nearly all exact in f16)
        (GgmlDType::BF16, 0.0), // 0: bf16 weights stored as they are
        (GgmlDType::Q8_0, 5e-3), // 3.2e-3
        (GgmlDType::Q5_1, 4e-2), // 2.6e-2
        (GgmlDType::Q5_0, 4e-2), // 2.7e-2
        (GgmlDType::Q4_1, 7.5e-2), // 5.0e-2
        (GgmlDType::Q4_0, 8e-2), // 5.2e-2
    ];
    let types: Vec<GgmlDType> = bounds.iter().map(|(t, _)| *t).collect();
    let errs = type_errors(&tiny_dev(), &types, &golden_inputs());
    for ((t, err, _), (_, bound)) in errs.iter().zip(bounds) {
        assert!(
            *err <= bound,
            "{}: relative error {err} > {bound}",
            gguf::type_name(*t)
        );
    }
}

/// A mid-size model (hidden 256, rows of 256 and 1024) where every K-quant applies.
#[test]
fn mid_size_flow_error_per_type() {
    let dir = tempfile::tempdir().unwrap();
    let configs = TinyConfigs::sized(Variant::Dev, 256, 2, 2).unwrap();
    drop(tiny::load_with(&configs, Some(dir.path()), LoadOptions::default()).unwrap());
    let src = dir.path().join("flow.safetensors");
    let bounds = [
        (GgmlDType::Q8_0, 1e-2),   // 6.4e-3
        (GgmlDType::Q6K, 3.5e-2),  // 2.3e-2
        (GgmlDType::Q5K, 6.5e-2),  // 4.4e-2
        (GgmlDType::Q5_0, 7.5e-2), // 5.1e-2
        (GgmlDType::Q4K, 1.3e-1),  // 8.8e-2
        (GgmlDType::Q4_0, 1.5e-1), // 9.6e-2
        (GgmlDType::Q3K, 2.8e-1),  // 1.8e-1
        (GgmlDType::Q2K, 5e-1),    // 3.4e-1
    ];
    let types: Vec<GgmlDType> = bounds.iter().map(|(t, _)| *t).collect();
    let cfg = flux_of(&open_flow(&src).unwrap()).config;
    let errs = type_errors(&src, &types, &FlowSample::seeded(&cfg, 8, 16, 7).unwrap());
    for ((t, err, fallbacks), (_, bound)) in errs.iter().zip(bounds) {
        assert_eq!(
            *fallbacks,
            0,
            "{}: rows of 256 fit every block",
            gguf::type_name(*t)
        );
        assert!(
            *err <= bound,
            "{}: relative error {err} > {bound}",
            gguf::type_name(*t)
        );
    }
    // Fewer bits, more error: the ladder must be monotonic within each family.
    let e = |t: GgmlDType| errs.iter().find(|(x, _, _)| *x == t).unwrap().1;
    assert!(e(GgmlDType::Q8_0) < e(GgmlDType::Q6K));
    assert!(e(GgmlDType::Q6K) < e(GgmlDType::Q5K));
    assert!(e(GgmlDType::Q5K) < e(GgmlDType::Q4K));
    assert!(e(GgmlDType::Q4K) < e(GgmlDType::Q3K));
    assert!(e(GgmlDType::Q3K) < e(GgmlDType::Q2K));
}

/// Compute in bf16 / f16 (weights converted per stage) against f32 compute.
#[test]
fn compute_dtype_error() {
    let inp = golden_inputs();
    let want = f32_forward(&tiny_dev(), &inp);
    // Measured: bf16 6.9e-3, f16 8.5e-4.
    for (dtype, bound) in [(DType::BF16, 1.05e-2), (DType::F16, 1.3e-3)] {
        let got = forward(
            open_flow(&tiny_dev()).unwrap(),
            dtype,
            Placement::Resident,
            &inp,
        );
        let err = rel_err(&got, &want);
        println!("{dtype:?} compute: relative error {err:.3e}");
        assert!(err <= bound, "{dtype:?}: relative error {err} > {bound}");
    }
    // Q8_0 storage with bf16 compute: the two errors compound, no more.
    let dir = tempfile::tempdir().unwrap();
    let q8 = dir.path().join("q8.gguf");
    let store = open_flow(&tiny_dev()).unwrap();
    quantize::quantize_store(&store, &QuantSpec::new(GgmlDType::Q8_0), &q8).unwrap();
    let got = forward(
        open_flow(&q8).unwrap(),
        DType::BF16,
        Placement::Resident,
        &inp,
    );
    let err = rel_err(&got, &want);
    println!("Q8_0 storage, bf16 compute: relative error {err:.3e}");
    // Measured 7.5e-3 ≈ √(6.9² + 3.2²)·1e-3: independent errors adding in quadrature.
    assert!(err <= 1.15e-2, "relative error {err}");
}

/// `src` (a safetensors file) in ComfyUI's scaled-fp8 layout at `dst`: every matrix e4m3fn
/// with `scale_weight` = amax / 448 beside it, the rest bf16, and the `scaled_fp8` marker.
fn write_scaled_fp8(src: &Path, dst: &Path) {
    let file = SafetensorsFile::open(src).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for name in file.tensors().keys() {
        let w = file
            .load(name, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        if w.rank() == 2 {
            let amax = w.abs().unwrap().max_all().unwrap();
            let s = amax.to_scalar::<f32>().unwrap() / 448.0;
            let q = (w / s as f64).unwrap().to_dtype(DType::F8E4M3).unwrap();
            tensors.insert(name.clone(), q);
            let stem = name.strip_suffix(".weight").unwrap();
            let scale = Tensor::new(s, &Device::Cpu).unwrap();
            tensors.insert(format!("{stem}.scale_weight"), scale);
        } else {
            tensors.insert(name.clone(), w.to_dtype(DType::BF16).unwrap());
        }
    }
    let marker = Tensor::zeros(0, DType::F8E4M3, &Device::Cpu).unwrap();
    tensors.insert("scaled_fp8".into(), marker);
    candle_core::safetensors::save(&tensors, dst).unwrap();
}

/// ComfyUI's scaled-fp8 layout of a whole flow model, made here with candle from the tiny
/// fixtures in both layouts (diffusers' q, k, v carry a scale each, joined after scaling); the
/// fp8 decode itself is checked against torch above.
#[test]
fn scaled_fp8_flow_loads_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let reference = open_flow(&tiny_dev()).unwrap();
    let inp = golden_inputs();
    let want = f32_forward(&tiny_dev(), &inp);

    let bfl = dir.path().join("flux1-tiny-dev-fp8-scaled.safetensors");
    write_scaled_fp8(&tiny_dev(), &bfl);
    let diffusers = dir.path().join("transformer");
    std::fs::create_dir(&diffusers).unwrap();
    write_scaled_fp8(
        &fixtures().join("tiny-diffusers/transformer/diffusion_pytorch_model.safetensors"),
        &diffusers.join("diffusion_pytorch_model.safetensors"),
    );
    // Measured 4.4e-2 in both layouts: e4m3 keeps 3 mantissa bits, between Q4
    // and Q5 here.
    for path in [bfl, diffusers] {
        let store = open_flow(&path).unwrap();
        assert_eq!(
            store.keys().collect::<Vec<_>>(),
            reference.keys().collect::<Vec<_>>()
        );
        let info = store.info("double_blocks.0.img_attn.qkv.weight").unwrap();
        assert_eq!((info.dtype, info.read), (DType::F8E4M3, DType::F32));
        assert_eq!(info.stored_bytes(), 192 * 64);
        let got = forward(store, DType::F32, Placement::Resident, &inp);
        let err = rel_err(&got, &want);
        println!(
            "scaled fp8 e4m3 ({}): relative error {err:.3e}",
            path.display()
        );
        assert!(err <= 6.5e-2, "relative error {err}");
    }
}

/// Quantized blocks stream like any other: the streamed output is the resident one.
#[test]
fn gguf_streams_under_every_plan() {
    let path = quant("flux1-tiny-dev-Q8_0.gguf");
    let inp = golden_inputs();
    let resident = forward(
        open_flow(&path).unwrap(),
        DType::F32,
        Placement::Resident,
        &inp,
    );
    for placement in [
        Placement::Phase,
        Placement::Cpu,
        Placement::Stream {
            group: 1,
            window: 2,
            keep: 0,
        },
        Placement::Stream {
            group: 2,
            window: 1,
            keep: 0,
        },
        Placement::Stream {
            group: 1,
            window: 2,
            keep: 3,
        },
    ] {
        let got = forward(open_flow(&path).unwrap(), DType::F32, placement, &inp);
        assert_eq!(max_abs_diff(&got, &resident), 0.0, "{placement:?}");
    }
}
