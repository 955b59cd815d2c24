//! Redux against the reference on tiny models, f32 (goldens from
//! tools/reference/make_redux_goldens.py): the SigLIP processor's pixels, SigLIP's hidden
//! states (transformers' `SiglipVisionModel`), the projector's tokens (diffusers'
//! `ReduxImageEncoder` agrees to 0), and the final latents of e2e_dev's run with the tokens
//! appended to its text, for one image and for two mixed (the second at strength 0.5).
//!
//! Tolerances: pixels exact (the resize is Pillow's, byte for byte); hidden states, tokens and
//! latents 1e-4 × max(1, |golden|max), as the other network goldens. The tokens are rounded
//! through bf16 before they join the text, as the reference does; the latents are held at the
//! same 1e-4 after that rounding.

use crate::common::*;
use candle_core::Tensor;
use fluxfit::checkpoint::layout::ReduxPaths;
use fluxfit::image::read_rgb8;
use fluxfit::pipeline::redux::{siglip_pixels, ReduxImage};
use fluxfit::pipeline::run::append_tokens;
use fluxfit::pipeline::{LoadOptions, Model};
use fluxfit::variant::Variant;

const GOLDEN: &str = "redux_dev.safetensors";

fn model() -> Model {
    let mut m = Model::load(
        &bfl_sources("flux1-tiny-dev.safetensors"),
        "fixture",
        LoadOptions {
            variant: Some(Variant::Dev),
            ..LoadOptions::default()
        },
    )
    .expect("fixture model loads");
    m.attach_redux_from(&fixtures().join("redux"), None)
        .expect("the tiny Redux encoder attaches");
    m
}

fn image(name: &str, strength: f64) -> ReduxImage {
    ReduxImage {
        image: read_rgb8(&fixtures().join(name)).unwrap(),
        strength,
    }
}

fn pixels(name: &str) -> Tensor {
    Tensor::from_vec(
        siglip_pixels(&read_rgb8(&fixtures().join(name)).unwrap(), 56),
        (1, 3, 56, 56),
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

#[test]
fn siglip_processing_matches_transformers_exactly() {
    for (file, key) in [("redux_a.png", "pixels_a"), ("redux_b.png", "pixels_b")] {
        let err = max_abs_diff(&pixels(file), &golden(GOLDEN, key));
        assert_eq!(
            err, 0.0,
            "{file}: pixels differ from SiglipImageProcessor's by {err}"
        );
    }
}

#[test]
fn siglip_and_projector_match_the_reference() {
    let m = model();
    let redux = m.redux.as_ref().unwrap();
    for (file, s) in [("redux_a.png", "a"), ("redux_b.png", "b")] {
        let px = pixels(file);
        let hidden = redux.net.hidden_states(&redux.weights, &px).unwrap();
        assert_close(
            &format!("{file}: SigLIP hidden states"),
            &hidden,
            &golden(GOLDEN, &format!("hidden_{s}")),
            1e-4,
        );
        let tokens = redux.net.forward(&redux.weights, &px).unwrap();
        assert_close(
            &format!("{file}: Redux tokens"),
            &tokens,
            &golden(GOLDEN, &format!("tokens_{s}")),
            1e-4,
        );
    }
}

#[test]
fn redux_matches_the_reference_end_to_end() {
    let m = model();
    let req = golden_request(&golden_json("e2e_dev.json"));
    let (txt, vec) = (
        golden("e2e_dev.safetensors", "txt"),
        golden("e2e_dev.safetensors", "vec"),
    );
    let one = [image("redux_a.png", 1.0)];
    let tokens = m.redux_tokens(&one).unwrap();
    let joined = append_tokens(&txt, &tokens).unwrap();
    assert_within_bf16_step("text + Redux tokens", &joined, &golden(GOLDEN, "txt"));
    let out = m
        .redux(&req, &one, None, Some((&txt, &vec)), &mut |_| {})
        .unwrap();
    assert_close(
        "Redux final latents",
        &out.latents,
        &golden(GOLDEN, "final_latents"),
        1e-4,
    );
    let err = max_abs_diff(
        &out.latents,
        &golden("e2e_dev.safetensors", "final_latents"),
    );
    assert!(err > 1e-2, "Redux ignored its image ({err})");

    let two = [image("redux_a.png", 1.0), image("redux_b.png", 0.5)];
    let out = m
        .redux(&req, &two, None, Some((&txt, &vec)), &mut |_| {})
        .unwrap();
    assert_close(
        "Redux mix final latents",
        &out.latents,
        &golden(GOLDEN, "final_latents_mix"),
        1e-4,
    );
}

/// The error of a Redux run on e2e_dev's request and embeddings with `images`.
fn redux_error(m: &Model, images: &[ReduxImage]) -> String {
    let req = golden_request(&golden_json("e2e_dev.json"));
    let (txt, vec) = (
        golden("e2e_dev.safetensors", "txt"),
        golden("e2e_dev.safetensors", "vec"),
    );
    match m.redux(&req, images, None, Some((&txt, &vec)), &mut |_| {}) {
        Ok(_) => panic!("Redux ran with {} images", images.len()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_redux_inputs_are_refused_with_the_fix() {
    let mut m = model();
    let err = redux_error(&m, &[image("redux_a.png", f64::NAN)]);
    assert!(err.contains("strength NaN"), "{err}");
    let err = redux_error(&m, &[]);
    assert!(err.contains("1 to 8 images"), "{err}");
    // A SigLIP folder without the tower's weights, and a projector that is not one.
    let err = ReduxPaths::resolve(&fixtures().join("tiny-bfl"), None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("Redux projector"), "{err}");
    let paths = ReduxPaths {
        projector: fixtures().join("tiny-bfl/ae.safetensors"),
        siglip: fixtures().join("redux/image_encoder"),
    };
    let err = m.attach_redux(&paths).err().unwrap().to_string();
    assert!(err.contains("redux_up.weight"), "{err}");
    // A projector for another text width names both widths.
    let paths = ReduxPaths {
        projector: fixtures().join("redux/flux1-tiny-redux.safetensors"),
        siglip: fixtures().join("redux/image_encoder"),
    };
    m.attach_redux(&paths).unwrap();
    let redux = m.redux.take().unwrap();
    assert_eq!(redux.net.config.txt_dim, 32);
    let err = redux.net.check_width(4096, "x").err().unwrap().to_string();
    assert!(err.contains("width 32") && err.contains("4096"), "{err}");
    // Without the encoder, Redux says how to attach it.
    let err = redux_error(&m, &[image("redux_a.png", 1.0)]);
    assert!(err.contains("--redux"), "{err}");
}
