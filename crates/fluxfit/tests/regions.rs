//! Region generation: the measured device peak is that of one region, whatever the canvas
//! size; regions see their finished neighbours (held latents, Fill masks); runs are
//! reproducible.

use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};
use fluxfit::memory::alloc::CountingAlloc;
use fluxfit::memory::plan::Plan;
use fluxfit::noise::NoiseKind;
use fluxfit::pipeline::regions::{region_grid, Canvas, RegionMode, RegionRun};
use fluxfit::pipeline::tiny::{self, TinyConfigs};
use fluxfit::pipeline::{LoadOptions, Model, Request};
use fluxfit::sampling;
use fluxfit::variant::Variant;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

static MEASURE: Mutex<()> = Mutex::new(());

fn measure_lock() -> MutexGuard<'static, ()> {
    MEASURE.lock().unwrap_or_else(|e| e.into_inner())
}

fn model(variant: Variant) -> Model {
    let mut m = tiny::load_with(
        &TinyConfigs::sized(variant, 128, 1, 1).unwrap(),
        None,
        LoadOptions {
            attn_chunk: Some(256),
            variant: Some(variant),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    m.set_plan(
        Plan::resident(DType::F32, Some(256))
            .with_spec("phase")
            .unwrap(),
    );
    m
}

fn request(width: usize, height: usize) -> Request {
    Request {
        prompt: "a harbour town along a long coast".into(),
        width,
        height,
        steps: 2,
        guidance: 3.5,
        seed: 11,
        t5_tokens: 16,
        noise: NoiseKind::TorchF32,
    }
}

fn make(model: &Model, width: usize, height: usize, tile: usize) -> (Canvas, Vec<RegionRun>) {
    let grid = region_grid(width, height, tile, 32).unwrap();
    let mode = model.region_mode(None).unwrap();
    let mut canvas = Canvas::blank(width, height);
    let runs = model
        .regions(
            &request(width, height),
            &mut canvas,
            &grid,
            mode,
            32,
            &mut |_| {},
        )
        .unwrap();
    (canvas, runs)
}

#[test]
fn the_peak_is_one_regions_whatever_the_canvas() {
    let _g = measure_lock();
    let m = model(Variant::Schnell);
    let mut peaks = Vec::new();
    for (w, h) in [(256, 128), (512, 384)] {
        let (_, runs) = make(&m, w, h, 128);
        let peak = runs.iter().map(|r| r.memory.peak).max().unwrap();
        println!(
            "canvas {w}x{h}: {} regions of 128x128, largest region peak {:.2} MiB",
            runs.len(),
            peak as f64 / (1 << 20) as f64
        );
        assert!(runs.iter().all(|r| r.memory.measured));
        peaks.push((runs.len(), peak));
    }
    assert!(peaks[1].0 > 2 * peaks[0].0, "{peaks:?}");
    // 6 times the pixels, the same peak (within 5% for allocator noise).
    let (a, b) = (peaks[0].1 as f64, peaks[1].1 as f64);
    assert!((b - a).abs() <= 0.05 * a, "peaks {a} vs {b}");
    // A single pass over the larger canvas needs more.
    let whole = {
        let mut m = model(Variant::Schnell);
        m.set_plan(
            Plan::resident(DType::F32, Some(256))
                .with_spec("phase")
                .unwrap(),
        );
        m.text_to_image(&request(512, 384), &mut |_| {})
            .unwrap()
            .memory
            .peak
    };
    println!(
        "one pass over 512x384: {:.2} MiB",
        whole as f64 / (1 << 20) as f64
    );
    assert!(whole as f64 > 1.5 * b, "whole {whole} vs region {b}");
}

#[test]
fn regions_are_reproducible_and_the_first_is_a_plain_generation() {
    let _g = measure_lock();
    let m = model(Variant::Schnell);
    let (a, runs) = make(&m, 256, 128, 128);
    let (b, _) = make(&m, 256, 128, 128);
    assert_eq!(runs.len(), 3);
    let diff = (a.image().unwrap() - b.image().unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0, "same seed, same canvas");
    // Region 0 had nothing to hold: it is text to image at its size with seed 11; the part
    // of it no later region reached (x < 64 − band) is exactly that image.
    let plain = m.text_to_image(&request(128, 128), &mut |_| {}).unwrap();
    let left = a
        .image()
        .unwrap()
        .narrow(3, 0, 32)
        .unwrap()
        .narrow(2, 0, 128)
        .unwrap();
    let want = plain.image.narrow(3, 0, 32).unwrap();
    let d = (left - want).unwrap().abs().unwrap().max_all().unwrap();
    assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
}

#[test]
fn held_tokens_end_at_the_known_latent() {
    let dev = Device::Cpu;
    let x = Tensor::ones((1, 4, 64), DType::F32, &dev).unwrap();
    let noise = Tensor::full(2f32, (1, 4, 64), &dev).unwrap();
    let known = Tensor::full(-3f32, (1, 4, 64), &dev).unwrap();
    let mask = Tensor::new(&[[[1f32], [0.0], [1.0], [0.0]]], &dev).unwrap();
    let at = |t: f32| -> Vec<f32> {
        sampling::hold_known(&x, &noise, &known, &mask, t)
            .unwrap()
            .get(0)
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(at(0.0), vec![-3.0, 1.0, -3.0, 1.0]);
    // t·noise + (1 − t)·known at t = 0.25: 0.5 − 2.25.
    assert_eq!(at(0.25), vec![-1.75, 1.0, -1.75, 1.0]);
}

#[test]
fn fill_models_mask_finished_pixels_and_control_models_are_refused() {
    let _g = measure_lock();
    let fill = model(Variant::DevFill);
    assert_eq!(fill.region_mode(None).unwrap(), RegionMode::Fill);
    assert!(fill.region_mode(Some(0.3)).is_err());
    let (canvas, runs) = make(&fill, 256, 128, 128);
    assert_eq!(runs.len(), 3);
    assert_eq!(canvas.image().unwrap().dims(), &[1, 3, 128, 256]);
    let canny = model(Variant::DevCanny);
    let err = canny.region_mode(None).unwrap_err().to_string();
    assert!(err.contains("flux-dev-canny"), "{err}");
    assert!(model(Variant::Schnell).region_mode(Some(1.5)).is_err());
}
