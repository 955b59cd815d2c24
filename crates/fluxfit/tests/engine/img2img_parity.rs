//! img2img against the reference rule (demo_st.py, docs/flux.md §3) on the tiny dev fixture, f32:
//! the init image as read from its PNG, its latent, the start latent and the final latents
//! (golden from tools/reference/make_img2img_golden.py, e2e_dev's embeddings and noise).
//!
//! Tolerances: the init image exactly (both sides compute 2·b/255 − 1 in f32); the encoder's
//! latent, the start latent and the final latents to 1e-4 × max(1, |golden|max), as the
//! other network goldens.

use crate::common::*;
use fluxfit::image::{init_image, read_rgb8};
use fluxfit::pipeline::ImageInit;
use fluxfit::sampling;

const FILE: &str = "img2img_dev.safetensors";

#[test]
fn img2img_matches_reference() {
    let json = golden_json("img2img_dev.json");
    let model = load(&bfl_sources("flux1-tiny-dev.safetensors"), None);
    let req = golden_request(&json);
    let strength = json["strength"].as_f64().unwrap();
    let png = fixtures().join(json["init_image"].as_str().unwrap());
    let image = init_image(&read_rgb8(&png).unwrap(), None).unwrap();
    assert_eq!(
        max_abs_diff(&image, &golden(FILE, "init")),
        0.0,
        "init image"
    );

    let z = model.encode_image(&image).unwrap();
    assert_close("init latent", &z, &golden(FILE, "init_latent"), 1e-4);

    let e2e = "e2e_dev.safetensors";
    let full = sampling::schedule(
        req.steps,
        sampling::image_seq_len(req.height, req.width),
        true,
    );
    let (start, ts) = sampling::img2img_start(
        &golden(e2e, "noise"),
        &golden(FILE, "init_latent"),
        &full,
        strength,
        candle_core::DType::F32,
    )
    .unwrap();
    assert_eq!(
        sampling::img2img_t_idx(strength, req.steps) as u64,
        json["t_idx"].as_u64().unwrap()
    );
    let expected_t = golden_timesteps(&json);
    assert_eq!(ts, expected_t, "remaining schedule");
    assert_close("start latent", &start, &golden(FILE, "start"), 1e-4);

    let init = ImageInit { image, strength };
    let out = model
        .image_to_image(
            &req,
            &init,
            Some((&golden(e2e, "txt"), &golden(e2e, "vec"))),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(out.timesteps, expected_t);
    assert_close(
        "final latents",
        &out.latents,
        &golden(FILE, "final_latents"),
        1e-4,
    );
    // From the prompt too: runs end to end (text embeddings differ by bf16 rounding only).
    let out = model
        .image_to_image(&req, &init, None, &mut |_| {})
        .unwrap();
    assert_eq!(out.image.dims(), &[1, 3, req.height, req.width]);
}

#[test]
fn strength_edges() {
    assert_eq!(sampling::img2img_t_idx(1.0, 50), 0);
    assert_eq!(sampling::img2img_t_idx(0.0, 50), 50);
    assert_eq!(sampling::img2img_t_idx(0.8, 50), 9); // (1 - 0.8)·50 = 9.999999999999998
    assert_eq!(sampling::img2img_t_idx(0.6, 3), 1);
}
