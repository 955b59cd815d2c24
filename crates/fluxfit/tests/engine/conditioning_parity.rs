//! Fill, Control (full model and LoRA on dev) and Kontext against the reference's rules on
//! tiny models, f32: conditioning tensors and final latents (goldens from
//! tools/reference/make_cond_goldens.py, e2e_dev's text embeddings, noise and 3-step schedule).
//!
//! Tolerances: 1e-4 × max(1, |golden|max), as the other network goldens. The conditioning
//! latents are rounded through bf16 on both sides (docs/flux.md §3): held to 1e-4 before the
//! rounding and to one bf16 step after it, since a difference of ~1e-7 between CPUs' matmul
//! kernels can move a value across a rounding boundary (it does on AVX2-only machines).

use crate::common::*;
use candle_core::Tensor;
use fluxfit::image::{read_mask, read_rgb8};
use fluxfit::model::flow::FlowInputs;
use fluxfit::pipeline::fill::fill_tensors;
use fluxfit::pipeline::kontext::image_tensor;
use fluxfit::pipeline::{LoadOptions, LoraSpec, Model};
use fluxfit::sampling;
use fluxfit::variant::Variant;

fn model(flow: &str, variant: Variant, lora: Option<&str>) -> Model {
    Model::load(
        &bfl_sources(flow),
        "fixture",
        LoadOptions {
            variant: Some(variant),
            loras: lora
                .map(|l| LoraSpec {
                    path: fixtures().join("tiny-bfl").join(l),
                    scale: None,
                })
                .into_iter()
                .collect(),
            ..LoadOptions::default()
        },
    )
    .expect("fixture model loads")
}

fn embeddings() -> (Tensor, Tensor) {
    (
        golden("e2e_dev.safetensors", "txt"),
        golden("e2e_dev.safetensors", "vec"),
    )
}

/// The flow's velocity on the first step (t = 1, the seed's noise) with `cond` joined as
/// channels, against the golden's `velocity0`.
fn check_first_velocity(model: &Model, file: &str, cond: &Tensor) {
    let (txt, vec) = embeddings();
    let noise = sampling::pack(&golden("e2e_dev.safetensors", "noise")).unwrap();
    let img = Tensor::cat(&[&noise, cond], 2).unwrap();
    let ids = sampling::image_ids(1, 8, 12, 0.0, &candle_core::Device::Cpu).unwrap();
    let txt_ids = sampling::text_ids(1, txt.dim(1).unwrap(), &candle_core::Device::Cpu).unwrap();
    let v = model
        .flow
        .net
        .forward(
            &model.flow.weights,
            &FlowInputs {
                img: &img,
                img_ids: &ids,
                txt: &txt,
                txt_ids: &txt_ids,
                timesteps: &Tensor::new(&[1f32], &candle_core::Device::Cpu).unwrap(),
                y: &vec,
                guidance: Some(&Tensor::new(&[3.5f32], &candle_core::Device::Cpu).unwrap()),
            },
        )
        .unwrap();
    assert_close(
        &format!("{file}: first velocity"),
        &v,
        &golden(file, "velocity0"),
        1e-4,
    );
}

#[test]
fn fill_matches_reference() {
    let file = "fill_dev.safetensors";
    let req = golden_request(&golden_json("fill_dev.json"));
    let model = model(
        "../tiny-variants/flux1-tiny-fill-dev.safetensors",
        Variant::DevFill,
        None,
    );
    let img = read_rgb8(&fixtures().join("fill_image.png")).unwrap();
    let (_, _, mask) = read_mask(&fixtures().join("fill_mask.png")).unwrap();
    let (image, mask) = fill_tensors(&img, &mask).unwrap();
    // The conditioning itself is checked in fill_parity (within one bf16 step: one element
    // of this input lands on the other side of a rounding boundary).
    check_first_velocity(&model, file, &golden(file, "img_cond"));
    let (txt, vec) = embeddings();
    let out = model
        .fill(&req, &image, &mask, Some((&txt, &vec)), &mut |_| {})
        .unwrap();
    assert_close(
        "fill final latents",
        &out.latents,
        &golden(file, "final_latents"),
        1e-4,
    );
}

#[test]
fn control_matches_reference() {
    let file = "control_dev.safetensors";
    let req = golden_request(&golden_json("control_dev.json"));
    let model = model(
        "../tiny-variants/flux1-tiny-canny-dev.safetensors",
        Variant::DevCanny,
        None,
    );
    let image = image_tensor(&read_rgb8(&fixtures().join("control_image.png")).unwrap()).unwrap();
    let cond = model.control_conditioning(&image).unwrap();
    let unrounded = sampling::pack(&model.encode_image(&image).unwrap()).unwrap();
    assert_close(
        "control latent before bf16",
        &unrounded,
        &golden(file, "control_latent_f32"),
        1e-4,
    );
    assert_within_bf16_step("control latent", &cond, &golden(file, "control_latent"));
    check_first_velocity(&model, file, &golden(file, "control_latent"));
    check_control_latents(&model, &req, &image, file, "control final latents");
}

/// Runs `control` end to end, then holds the final latents, made from the reference's own
/// conditioning (which ours matches to one bf16 step, a step the denoising would amplify), to
/// the golden.
fn check_control_latents(
    model: &Model,
    req: &fluxfit::pipeline::Request,
    image: &Tensor,
    file: &str,
    what: &str,
) {
    let (txt, vec) = embeddings();
    model
        .control(req, image, Some((&txt, &vec)), &mut |_| {})
        .unwrap();
    let cond = golden(file, "control_latent");
    let out = model
        .control_from_latent(req, &cond, &txt, &vec, &mut |_| {})
        .unwrap();
    assert_close(what, &out.latents, &golden(file, "final_latents"), 1e-4);
}

#[test]
fn control_lora_on_dev_matches_reference() {
    let file = "control_lora_dev.safetensors";
    let json = golden_json("control_lora_dev.json");
    assert_eq!(
        json["lora_scale"].as_f64().unwrap(),
        fluxfit::checkpoint::lora::CONTROL_SCALE
    );
    let req = golden_request(&json);
    // The variant comes from the LoRA's file name: dev + canny LoRA = a Canny model.
    let model = Model::load(
        &bfl_sources("flux1-tiny-dev.safetensors"),
        "fixture",
        LoadOptions {
            // No scale given: a control LoRA takes the reference CLI's 0.85.
            loras: vec![LoraSpec {
                path: fixtures().join("tiny-bfl/flux1-tiny-canny-dev-lora.safetensors"),
                scale: None,
            }],
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(model.variant, Variant::DevCanny);
    assert_eq!(model.flow.net.config.in_channels, 128);
    assert_eq!(model.loras[0].scale, json["lora_scale"].as_f64().unwrap());
    check_first_velocity(&model, file, &golden(file, "control_latent"));
    let image = image_tensor(&read_rgb8(&fixtures().join("control_image.png")).unwrap()).unwrap();
    check_control_latents(&model, &req, &image, file, "control LoRA final latents");
}

#[test]
fn kontext_matches_reference() {
    let file = "kontext_dev.safetensors";
    let req = golden_request(&golden_json("kontext_dev.json"));
    let model = model("flux1-tiny-dev.safetensors", Variant::DevKontext, None);
    let image = image_tensor(&read_rgb8(&fixtures().join("kontext_image.png")).unwrap()).unwrap();
    assert_eq!(image.dims(), &[1, 3, 80, 64]);
    let (tokens, ids) = model.kontext_conditioning(&image).unwrap();
    let unrounded = sampling::pack(&model.encode_image(&image).unwrap()).unwrap();
    assert_close(
        "kontext tokens before bf16",
        &unrounded,
        &golden(file, "cond_seq_f32"),
        1e-4,
    );
    assert_within_bf16_step("kontext tokens", &tokens, &golden(file, "cond_seq"));
    assert_eq!(max_abs_diff(&ids, &golden(file, "cond_ids")), 0.0, "ids");
    let (txt, vec) = embeddings();
    let out = model
        .kontext(&req, &image, Some((&txt, &vec)), &mut |_| {})
        .unwrap();
    assert_close(
        "kontext final latents",
        &out.latents,
        &golden(file, "final_latents"),
        1e-4,
    );
    // The same weights as plain dev give another image: the tokens matter.
    let err = max_abs_diff(
        &out.latents,
        &golden("e2e_dev.safetensors", "final_latents"),
    );
    assert!(err > 1e-2, "kontext ignored its image ({err})");
}

#[test]
fn wrong_models_are_refused_with_the_fix() {
    let (txt, vec) = embeddings();
    let req = golden_request(&golden_json("control_dev.json"));
    let dev = model("flux1-tiny-dev.safetensors", Variant::Dev, None);
    let image = Tensor::zeros(
        (1, 3, 64, 96),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let err = dev
        .control(&req, &image, Some((&txt, &vec)), &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--lora"), "{err}");
    let err = dev
        .kontext(&req, &image, Some((&txt, &vec)), &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("flux-dev-kontext"), "{err}");
    // A LoRA for another model names the tensor and both shapes.
    let err = Model::load(
        &bfl_sources("../tiny-variants/flux1-tiny-fill-dev.safetensors"),
        "fixture",
        LoadOptions {
            loras: vec![LoraSpec {
                path: fixtures().join("tiny-bfl/flux1-tiny-canny-dev-lora.safetensors"),
                scale: Some(1.0),
            }],
            ..LoadOptions::default()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("img_in"), "{err}");
}
