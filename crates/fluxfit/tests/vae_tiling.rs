//! Tiled VAE decoding (`Plan::vae_tile`): close to the whole decode, and its decode-phase peak
//! bounded by the tile, not the image (measured by the counting allocator and the ledger).

use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device};
use fluxfit::memory::alloc::{self, CountingAlloc};
use fluxfit::memory::plan::Plan;
use fluxfit::noise::NoiseKind;
use fluxfit::pipeline::tiny::{self, TinyConfigs};
use fluxfit::pipeline::{Generated, LoadOptions, Model, Text2Image};
use fluxfit::variant::Variant;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

static MEASURE: Mutex<()> = Mutex::new(());

fn measure_lock() -> MutexGuard<'static, ()> {
    MEASURE.lock().unwrap_or_else(|e| e.into_inner())
}

fn model() -> Model {
    tiny::load_with(
        &TinyConfigs::sized(Variant::Schnell, 128, 1, 1).unwrap(),
        None,
        LoadOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            attn_chunk: Some(256),
            variant: Some(Variant::Schnell),
        },
    )
    .unwrap()
}

fn run(model: &mut Model, side: usize, tile: Option<usize>) -> Generated {
    let mut plan = Plan::resident(DType::F32, Some(256)).with_spec("phase").unwrap();
    plan.vae_tile = tile;
    model.set_plan(plan);
    let req = Text2Image {
        prompt: "a lighthouse on a cliff at dusk".into(),
        width: side,
        height: side,
        steps: 1,
        guidance: 3.5,
        seed: 3,
        t5_tokens: 16,
        noise: NoiseKind::TorchF32,
    };
    model.text_to_image(&req, &mut |_| {}).unwrap()
}

fn decode_peak(g: &Generated) -> usize {
    let d = g.memory.phases.iter().find(|p| p.phase == "decode").unwrap();
    assert!(d.measured);
    d.total_peak
}

#[test]
fn tiled_decode_is_close_to_the_whole_decode() {
    let _m = measure_lock();
    let mut model = model();
    let whole = run(&mut model, 192, None);
    for tile in [64, 128] {
        let tiled = run(&mut model, 192, Some(tile));
        assert_eq!(
            whole.latents.to_vec3::<f32>().ok(),
            tiled.latents.to_vec3::<f32>().ok()
        );
        let a = whole.image.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = tiled.image.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        let max = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let mean = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
        let range = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        eprintln!("tile {tile}: max |diff| {max:.4}, mean |diff| {mean:.5}, max |image| {range:.3}");
    }
}

#[test]
fn tiled_decode_peak_does_not_grow_with_the_image() {
    let _m = measure_lock();
    assert!(alloc::installed());
    let mut model = model();
    let _ = run(&mut model, 64, None);
    let mut lines = Vec::new();
    for side in [256, 384] {
        let untiled = decode_peak(&run(&mut model, side, None));
        let tiled = decode_peak(&run(&mut model, side, Some(128)));
        let out = 3 * side * side * 4;
        lines.push((side, untiled, tiled, out));
        eprintln!("{side}x{side}: decode peak untiled {untiled}, tiled(128) {tiled}, output {out}");
    }
}
