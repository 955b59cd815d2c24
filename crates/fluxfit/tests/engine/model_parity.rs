//! Flow transformer and autoencoder against the reference (diffusers, f32) on the tiny
//! fixtures, in both checkpoint layouts.
//!
//! Tolerance: 1e-4 × max(1, |golden|max). Both sides compute in f32 from the same bf16-exact
//! weights; the residual is summation order and transcendental rounding (measured ~1e-6), while
//! any layout or math error (chunk order, RoPE pairing, scale/shift swap) moves outputs by >1%.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use fluxfit::checkpoint::layout::{open_flow, open_vae};
use fluxfit::memory::residency::{Placement, Residency};
use fluxfit::model::autoencoder::{AutoEncoder, AutoEncoderConfig};
use fluxfit::model::flow::{FlowConfig, FlowInputs, Flux};

const REL_TOL: f32 = 1e-4;

fn assert_close(what: &str, ours: &Tensor, golden: &Tensor) {
    let err = max_abs_diff(ours, golden);
    let tol = REL_TOL * max_abs(golden).max(1.0);
    println!("{what}: max abs error {err:.3e} (tolerance {tol:.1e})");
    assert!(err <= tol, "{what}: max abs error {err} > {tol}");
}

fn flow_output(path: &std::path::Path, golden_file: &str, chunk: Option<usize>) -> Tensor {
    let store = open_flow(path).expect("flow checkpoint");
    let cfg = FlowConfig::from_store(&store).expect("config from shapes");
    cfg.validate(&store).expect("shapes");
    let flux = Flux::new(cfg, chunk);
    let w = Residency::new(
        store.into(),
        flux.stages(),
        Device::Cpu,
        DType::F32,
        Placement::Resident,
    );
    let g = |n: &str| golden(golden_file, n);
    let guidance = flux.config.guidance_embed.then(|| g("guidance"));
    flux.forward(
        &w,
        &FlowInputs {
            img: &g("img"),
            img_ids: &g("img_ids"),
            txt: &g("txt"),
            txt_ids: &g("txt_ids"),
            timesteps: &g("timesteps"),
            y: &g("y"),
            guidance: guidance.as_ref(),
        },
    )
    .expect("forward")
}

#[test]
fn flow_dev_matches_reference_in_both_layouts() {
    let bfl = flow_output(
        &fixtures().join("tiny-bfl/flux1-tiny-dev.safetensors"),
        "flow_dev.safetensors",
        None,
    );
    assert_close(
        "flow dev (BFL file)",
        &bfl,
        &golden("flow_dev.safetensors", "out"),
    );
    let diffusers = flow_output(
        &fixtures().join("tiny-diffusers"),
        "flow_dev.safetensors",
        None,
    );
    assert_eq!(
        max_abs_diff(&bfl, &diffusers),
        0.0,
        "layouts must give identical outputs"
    );
}

#[test]
fn flow_schnell_without_guidance_embedder_matches_reference() {
    let out = flow_output(
        &fixtures().join("tiny-variants/flux1-tiny-schnell.safetensors"),
        "flow_schnell.safetensors",
        None,
    );
    assert_close(
        "flow schnell",
        &out,
        &golden("flow_schnell.safetensors", "out"),
    );
}

#[test]
fn chunked_attention_agrees_with_unchunked() {
    let path = fixtures().join("tiny-bfl/flux1-tiny-dev.safetensors");
    let full = flow_output(&path, "flow_dev.safetensors", None);
    for chunk in [1, 5, 7, 32] {
        let c = flow_output(&path, "flow_dev.safetensors", Some(chunk));
        let err = max_abs_diff(&full, &c);
        assert!(err < 1e-5 * max_abs(&full).max(1.0), "chunk {chunk}: {err}");
    }
}

fn vae(path: &std::path::Path) -> (AutoEncoder, Residency) {
    let store = open_vae(path).expect("ae checkpoint");
    let cfg = AutoEncoderConfig::from_store(&store).expect("config");
    cfg.validate(&store).expect("shapes");
    let ae = AutoEncoder::new(cfg, None);
    let mut stages = ae.encoder_stages();
    stages.extend(ae.decoder_stages());
    let w = Residency::new(
        store.into(),
        stages,
        Device::Cpu,
        DType::F32,
        Placement::Resident,
    );
    (ae, w)
}

#[test]
fn vae_encode_and_decode_match_reference_in_both_layouts() {
    let image = golden("vae.safetensors", "image");
    let z_in = golden("vae.safetensors", "z_in");
    let mut outs = Vec::new();
    for (name, path) in [
        ("BFL", fixtures().join("tiny-bfl/ae.safetensors")),
        ("diffusers", fixtures().join("tiny-diffusers")),
    ] {
        let (ae, w) = vae(&path);
        let z = ae.encode(&w, &image).expect("encode");
        assert_close(
            &format!("vae encode ({name})"),
            &z,
            &golden("vae.safetensors", "z"),
        );
        let x = ae.decode(&w, &z_in).expect("decode");
        assert_close(
            &format!("vae decode ({name})"),
            &x,
            &golden("vae.safetensors", "decoded"),
        );
        outs.push((z, x));
    }
    assert_eq!(max_abs_diff(&outs[0].0, &outs[1].0), 0.0);
    assert_eq!(max_abs_diff(&outs[0].1, &outs[1].1), 0.0);
}
