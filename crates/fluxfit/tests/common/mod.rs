//! Shared helpers of the parity tests: fixture paths, golden tensors, error measures.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use fluxfit::checkpoint::layout::ModelPaths;
use fluxfit::checkpoint::safetensors::SafetensorsFile;
use fluxfit::noise::NoiseKind;
use fluxfit::pipeline::{LoadOptions, Model, ModelSources, Request};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A golden tensor as f32 on the CPU.
pub fn golden(file: &str, name: &str) -> Tensor {
    let f = SafetensorsFile::open(fixtures().join("golden").join(file)).expect("golden file");
    f.load(name, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .to_dtype(DType::F32)
        .expect("f32")
}

pub fn golden_json(file: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("golden").join(file)).expect("golden json");
    serde_json::from_str(&text).expect("valid json")
}

/// The request of a golden case's json: prompt, size, steps, guidance (none for schnell),
/// seed, T5 length (the conditioning goldens give embeddings of 16 tokens and no length).
pub fn golden_request(case: &serde_json::Value) -> Request {
    Request {
        prompt: case["prompt"].as_str().unwrap().to_string(),
        width: case["width"].as_u64().unwrap() as usize,
        height: case["height"].as_u64().unwrap() as usize,
        steps: case["num_steps"].as_u64().unwrap() as usize,
        guidance: case["guidance"].as_f64().unwrap_or(0.0) as f32,
        seed: case["seed"].as_u64().unwrap(),
        t5_tokens: case["t5_max_length"].as_u64().unwrap_or(16) as usize,
        noise: NoiseKind::TorchBf16,
    }
}

/// The schedule a golden case's json records.
pub fn golden_timesteps(case: &serde_json::Value) -> Vec<f32> {
    case["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts `ours` within `rel × max(1, |golden|max)` of `golden` (the parity tests' tolerance
/// rule) and prints the error.
#[track_caller]
pub fn assert_close(what: &str, ours: &Tensor, golden: &Tensor, rel: f32) {
    assert_eq!(ours.dims(), golden.dims(), "{what}: shape");
    let err = max_abs_diff(ours, golden);
    let tol = rel * max_abs(golden).max(1.0);
    println!("{what}: max abs error {err:.3e} (tolerance {tol:.1e})");
    assert!(err <= tol, "{what}: max abs error {err} > {tol}");
}

/// Largest absolute value (to state tolerances relative to the signal).
pub fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The tiny dev model from BFL single files (text encoders from the diffusers folders, as the
/// BFL repos ship them).
pub fn bfl_sources(flow: &str) -> ModelSources {
    let d = fixtures().join("tiny-diffusers");
    ModelSources::resolve(
        None,
        ModelPaths {
            flow: Some(fixtures().join("tiny-bfl").join(flow)),
            vae: Some(fixtures().join("tiny-bfl/ae.safetensors")),
            t5: Some(d.join("text_encoder_2")),
            clip: Some(d.join("text_encoder")),
            ..Default::default()
        },
    )
    .expect("BFL fixture sources")
}

pub fn diffusers_sources() -> ModelSources {
    ModelSources::resolve(
        Some(&fixtures().join("tiny-diffusers")),
        ModelPaths::default(),
    )
    .expect("diffusers fixture sources")
}

pub fn load(src: &ModelSources, chunk: Option<usize>) -> Model {
    Model::load(
        src,
        "fixture",
        LoadOptions {
            attn_chunk: chunk,
            ..Default::default()
        },
    )
    .expect("fixture model loads")
}

/// Holds `ours` to `golden`, both rounded through bf16, within one bf16 step at the golden
/// value plus 1e-6: an encoder difference of ~1e-7 (another CPU's matmul kernels) can land a
/// value on the neighbouring bf16 value. Returns the worst error in bf16 steps.
#[allow(dead_code)]
pub fn assert_within_bf16_step(what: &str, ours: &Tensor, golden: &Tensor) -> f32 {
    assert_eq!(ours.dims(), golden.dims(), "{what}: shape");
    let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // One bf16 step at y: 2^(⌊log2 |y|⌋ − 7).
    let step = |y: f32| 2f32.powi(y.abs().max(1e-30).log2().floor() as i32 - 7);
    let worst = v(ours)
        .iter()
        .zip(&v(golden))
        .map(|(x, y)| (x - y).abs() / (step(*y) + 1e-6))
        .fold(0f32, f32::max);
    println!("{what}: worst error {worst:.3} bf16 steps");
    assert!(worst <= 1.0, "{what}: {worst} bf16 steps");
    worst
}

/// Each phase of a measured run against the planner's prediction for it: the weights held agree
/// to the byte (asserted); returns the largest relative error of a phase's total peak and a
/// line per phase, led by `label`.
pub fn phases_against(
    label: &str,
    measured: &fluxfit::memory::ledger::MemoryReport,
    predicted: &fluxfit::planner::Prediction,
) -> (f64, Vec<String>) {
    const MIB: f64 = (1 << 20) as f64;
    let mut worst = 0.0f64;
    let mut lines = Vec::new();
    for m in &measured.phases {
        let p = predicted.phase(m.phase).expect("a predicted phase");
        assert_eq!(
            p.weights_peak as usize, m.weights_peak,
            "{label} {}: weights",
            m.phase
        );
        let err = p.total as f64 / m.total_peak as f64 - 1.0;
        worst = worst.max(err.abs());
        lines.push(format!(
            "{label} {:<8} measured {:>8.2} MiB (w {:>7.2} a {:>7.2}) predicted {:>8.2} MiB (w {:>7.2} a {:>7.2} ws {:>6.2}) {:+6.1}%",
            m.phase,
            m.total_peak as f64 / MIB,
            m.weights_peak as f64 / MIB,
            m.activations_peak.unwrap_or(0) as f64 / MIB,
            p.total as f64 / MIB,
            p.weights as f64 / MIB,
            p.activations as f64 / MIB,
            p.workspace as f64 / MIB,
            100.0 * err
        ));
    }
    (worst, lines)
}
