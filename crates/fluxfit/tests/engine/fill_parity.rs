//! Fill: the conditioning tensor against the reference's `prepare_fill` (golden from
//! tools/reference/make_fill_golden.py on the tiny fixture autoencoder), and the pipeline end
//! to end on an in-process tiny Fill model (flow in_channels 384).
//!
//! Tolerances: the mask features exactly (bf16 of b/255 on both sides); the masked-image latent
//! is rounded to bf16 on both sides, so an encoder difference of ~1e-6 can land on the
//! neighbouring bf16 value: held to one bf16 step at the golden value plus 1e-6 (and the latent
//! before rounding to 1e-4 × max(1, |golden|max)).

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use fluxfit::image::{read_mask, read_rgb8};
use fluxfit::noise::NoiseKind;
use fluxfit::pipeline::fill::{fill_conditioning, fill_tensors};
use fluxfit::pipeline::{tiny, LoadOptions, Request};
use fluxfit::variant::Variant;

#[test]
fn fill_conditioning_matches_prepare_fill() {
    let model = load(&bfl_sources("flux1-tiny-dev.safetensors"), None);
    let img = read_rgb8(&fixtures().join("fill_image.png")).unwrap();
    let (mw, mh, mask) = read_mask(&fixtures().join("fill_mask.png")).unwrap();
    assert_eq!((mw, mh), (img.width, img.height));
    let (image, mask) = fill_tensors(&img, &mask).unwrap();
    let ours = fill_conditioning(&image, &mask, DType::F32, |x| model.encode_image(x)).unwrap();
    let gold = golden("fill_cond.safetensors", "cond");
    assert_eq!(ours.dims(), &[1, 24, 320]);
    assert_eq!(ours.dims(), gold.dims());
    let m_ours = ours.narrow(2, 64, 256).unwrap();
    let m_gold = gold.narrow(2, 64, 256).unwrap();
    assert_eq!(max_abs_diff(&m_ours, &m_gold), 0.0, "mask features");
    // Before the bf16 rounding: the encoder's latent of the masked image, to 1e-4.
    let one_minus = mask.affine(-1.0, 1.0).unwrap();
    let z = model
        .encode_image(&image.broadcast_mul(&one_minus).unwrap())
        .unwrap();
    let zg = golden("fill_cond.safetensors", "masked_latent");
    let err = max_abs_diff(&z, &zg);
    println!("masked latent before bf16: max abs error {err:.3e}");
    assert!(err <= 1e-4 * max_abs(&zg).max(1.0), "{err}");
    assert_within_bf16_step(
        "masked latent",
        &ours.narrow(2, 0, 64).unwrap(),
        &gold.narrow(2, 0, 64).unwrap(),
    );
}

#[test]
fn tiny_fill_model_runs_end_to_end() {
    let model = tiny::load(LoadOptions {
        attn_chunk: Some(256),
        variant: Some(Variant::DevFill),
        ..LoadOptions::default()
    })
    .unwrap();
    assert_eq!(model.flow.net.config.in_channels, 384);
    let req = Request {
        prompt: "a white paper cup".into(),
        width: 64,
        height: 32,
        steps: 2,
        guidance: 30.0,
        seed: 1,
        t5_tokens: 16,
        noise: NoiseKind::TorchBf16,
    };
    let image = Tensor::zeros((1, 3, 32, 64), DType::F32, &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, 1, 32, 64), DType::F32, &Device::Cpu).unwrap();
    let out = model.fill(&req, &image, &mask, None, &mut |_| {}).unwrap();
    assert_eq!(out.image.dims(), &[1, 3, 32, 64]);
    // A text-to-image model is refused.
    let t2i = tiny::load(LoadOptions {
        attn_chunk: Some(256),
        variant: Some(Variant::Dev),
        ..LoadOptions::default()
    })
    .unwrap();
    let Err(err) = t2i.fill(&req, &image, &mask, None, &mut |_| {}) else {
        panic!("a text-to-image model ran fill");
    };
    assert!(err.to_string().contains("384"), "{err}");
}
