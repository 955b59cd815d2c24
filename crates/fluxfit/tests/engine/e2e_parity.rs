//! Text to image end to end against the reference pipeline (f32, tiny models): text
//! embeddings, noise, schedule, final latents and pixels, for BFL files and the diffusers layout.
//!
//! Tolerances: the text embeddings are rounded to bf16 on both sides, so an encoder difference
//! of ~1e-6 can land on the neighbouring bf16 value: they are held to one bf16 step (2⁻⁸
//! relative). Denoising from the golden embeddings is held to 1e-4 × max(1, |golden|max), as
//! the single-network goldens; the 8-bit pixels to ±1 (the conversion truncates).

use crate::common::*;
use candle_core::{DType, Tensor};
use fluxfit::image::to_rgb8;
use fluxfit::noise::NoiseKind;
use fluxfit::pipeline::Model;

/// Checks one model against one golden case; returns its 8-bit pixels.
fn check(model: &Model, case: &str) -> Vec<u8> {
    let json = golden_json(&format!("{case}.json"));
    let file = format!("{case}.safetensors");
    let req = golden_request(&json);

    // Text: our encoders, then the same bf16 rounding as the reference.
    let (txt, vec) = model.encode_text(&req.prompt, req.t5_tokens).unwrap();
    assert_close(
        &format!("{case} txt"),
        &txt,
        &golden(&file, "txt"),
        1.0 / 256.0,
    );
    assert_close(
        &format!("{case} vec"),
        &vec,
        &golden(&file, "vec"),
        1.0 / 256.0,
    );

    // Denoise + decode from the reference's own embeddings: isolates sampling and the networks.
    let out = model
        .image_from_embeddings(
            &req,
            &golden(&file, "txt"),
            &golden(&file, "vec"),
            &mut |_| {},
        )
        .unwrap();
    let expected_t = golden_timesteps(&json);
    assert_eq!(out.timesteps, expected_t, "{case}: schedule");
    assert_close(
        &format!("{case} final latents"),
        &out.latents,
        &golden(&file, "final_latents"),
        1e-4,
    );
    assert_close(
        &format!("{case} decoded"),
        &out.image,
        &golden(&file, "decoded"),
        1e-4,
    );

    // From the prompt: the whole pipeline.
    let full = model.text_to_image(&req, &mut |_| {}).unwrap();
    let px = to_rgb8(&full.image).unwrap();
    let golden_px = golden(&file, "pixels_u8").to_dtype(DType::F32).unwrap();
    let ours_px = Tensor::from_vec(
        px.data.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        golden_px.dims(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let worst = max_abs_diff(&ours_px, &golden_px);
    println!("{case} pixels (from the prompt): max difference {worst} levels");
    assert!(worst <= 1.0, "{case}: pixels differ by {worst} levels");
    px.data
}

#[test]
fn dev_text_to_image_matches_reference_and_layouts_agree() {
    let bfl = check(
        &load(&bfl_sources("flux1-tiny-dev.safetensors"), None),
        "e2e_dev",
    );
    let diffusers = check(&load(&diffusers_sources(), None), "e2e_dev");
    assert!(
        bfl == diffusers,
        "BFL and diffusers layouts must give identical pixels"
    );
}

#[test]
fn schnell_text_to_image_matches_reference() {
    let model = load(
        &bfl_sources("../tiny-variants/flux1-tiny-schnell.safetensors"),
        Some(16),
    );
    assert_eq!(model.variant, fluxfit::variant::Variant::Schnell);
    check(&model, "e2e_schnell");
}

#[test]
fn noise_and_packing_match_reference() {
    let json = golden_json("e2e_dev.json");
    let req = golden_request(&json);
    let dev = candle_core::Device::Cpu;
    let noise = fluxfit::sampling::noise(
        1,
        req.height,
        req.width,
        req.seed,
        NoiseKind::TorchBf16,
        &dev,
    )
    .unwrap();
    assert_eq!(
        max_abs_diff(&noise, &golden("e2e_dev.safetensors", "noise")),
        0.0
    );
    let packed = fluxfit::sampling::pack(&noise).unwrap();
    assert_eq!(
        max_abs_diff(&packed, &golden("e2e_dev.safetensors", "packed_noise")),
        0.0
    );
    let (h, w) = fluxfit::sampling::latent_hw(req.height, req.width);
    let ids = fluxfit::sampling::image_ids(1, h, w, 0.0, &dev).unwrap();
    assert_eq!(
        max_abs_diff(&ids, &golden("e2e_dev.safetensors", "img_ids")),
        0.0
    );
}

/// Distance in units in the last place between two finite f32 of the same sign.
fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

/// Schedules agree within 1e-6 (a few f32 ulps): torch's `linspace` itself differs by an ulp
/// between CPU builds (its vector width and fused multiply-adds depend on AVX2 vs AVX-512, and
/// the shift amplifies that to ~2 ulp), so bit-equality with one machine's torch is not a
/// meaningful target; such a difference moves an image by ~1e-7.
#[test]
fn schedules_match_reference() {
    for case in golden_json("schedule.json").as_array().unwrap() {
        let steps = case["steps"].as_u64().unwrap() as usize;
        let len = case["image_seq_len"].as_u64().unwrap() as usize;
        let shift = case["shift"].as_bool().unwrap();
        let expected: Vec<f32> = case["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let ours = fluxfit::sampling::schedule(steps, len, shift);
        assert_eq!(ours.len(), expected.len());
        let worst = ours
            .iter()
            .zip(&expected)
            .map(|(a, b)| ulps(*a, *b))
            .max()
            .unwrap();
        let abs = ours
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("schedule steps {steps}, L {len}, shift {shift}: max {worst} ulp ({abs:.1e})");
        assert!(
            abs <= 1e-6,
            "steps {steps}, L {len}, shift {shift}: {abs}\n ours {ours:?}\n ref  {expected:?}"
        );
    }
}
