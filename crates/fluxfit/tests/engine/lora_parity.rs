//! LoRAs in every layout fluxfit reads against the reference with the same LoRA merged into its
//! weights (tools/reference/make_lora_goldens.py, cross-checked there against diffusers'
//! `load_lora_weights` where diffusers reads the layout), alone and stacked; the same image on a
//! streamed plan and, on a GGUF base, packed or dequantized; bad LoRAs refused by name.
//!
//! Tolerance: final latents within 1e-4 × max(1, |golden|max), as the other end-to-end goldens
//! (denoising from the reference's embeddings); CLIP's pooled output with a text-encoder LoRA
//! within one bf16 step, as the encoder goldens.

use crate::common::*;
use candle_core::{DType, Tensor};
use fluxfit::checkpoint::lora::Layout;
use fluxfit::checkpoint::safetensors::write_f32;
use fluxfit::memory::plan::Plan;
use fluxfit::pipeline::{LoadOptions, LoraSpec, Model, ModelSources};

fn lora(file: &str, scale: Option<f64>) -> LoraSpec {
    LoraSpec {
        path: fixtures().join("lora").join(file),
        scale,
    }
}

fn with_loras(sources: &ModelSources, loras: Vec<LoraSpec>) -> fluxfit::error::Result<Model> {
    Model::load(
        sources,
        "fixture",
        LoadOptions {
            attn_chunk: Some(256),
            loras,
            ..LoadOptions::default()
        },
    )
}

fn dev() -> ModelSources {
    bfl_sources("flux1-tiny-dev.safetensors")
}

/// Final latents denoised from e2e_dev's embeddings (the goldens' own).
fn latents(model: &Model, case: &str) -> Tensor {
    let req = golden_request(&golden_json(&format!("lora_{case}.json")));
    let txt = golden("e2e_dev.safetensors", "txt");
    let vec = golden("e2e_dev.safetensors", "vec");
    model
        .image_from_embeddings(&req, &txt, &vec, &mut |_| {})
        .unwrap()
        .latents
}

fn check(model: &Model, case: &str) {
    let ours = latents(model, case);
    let want = golden(&format!("lora_{case}.safetensors"), "final_latents");
    assert_close(&format!("LoRA {case}: final latents"), &ours, &want, 1e-4);
}

#[test]
fn every_layout_matches_the_reference_with_the_lora_merged() {
    let base = latents(&with_loras(&dev(), vec![]).unwrap(), "kohya");
    for (case, file, layout, layers) in [
        ("kohya", "kohya.safetensors", Layout::Kohya, 23 + 12),
        (
            "kohya_diffusers",
            "kohya-diffusers.safetensors",
            Layout::Kohya,
            7,
        ),
        ("peft", "peft.safetensors", Layout::Diffusers, 23),
        ("aitoolkit", "aitoolkit.safetensors", Layout::Bfl, 23),
        ("xlabs", "xlabs.safetensors", Layout::XLabs, 5),
    ] {
        let model = with_loras(&dev(), vec![lora(file, None)]).unwrap();
        let s = &model.loras[0];
        println!(
            "{case}: {} layout, {} layers, rank {}, {:?}",
            s.layout, s.layers, s.rank, s.components
        );
        assert_eq!(s.layout, layout, "{case}");
        assert_eq!(s.layers, layers, "{case}: layers adapted");
        assert_eq!(s.scale, 1.0, "{case}: a plain LoRA's default scale");
        assert_eq!(s.hash.len(), 12, "{case}: short hash");
        let ours = latents(&model, case);
        assert!(
            max_abs_diff(&ours, &base) > 0.1,
            "{case}: the LoRA changes the image"
        );
        check(&model, case);
    }
}

#[test]
fn a_kohya_t5_lora_adapts_t5() {
    // sd-scripts' `lora_te3_` (T5) on every Linear of the tiny T5, against transformers' T5 with
    // the LoRA merged (golden from make_lora_goldens.py).
    let model = with_loras(&dev(), vec![lora("kohya-t5.safetensors", None)]).unwrap();
    assert_eq!(
        model.loras[0].components,
        [fluxfit::component::Component::T5]
    );
    let prompt = golden_json("e2e_dev.json")["prompt"]
        .as_str()
        .unwrap()
        .to_string();
    let (txt, _) = model.encode_text(&prompt, 16).unwrap();
    let worst = assert_within_bf16_step(
        "T5 with lora_te3_",
        &txt,
        &golden("lora_kohya_t5.safetensors", "txt"),
    );
    println!("T5 with the LoRA: worst {worst} bf16 steps");
}

#[test]
fn a_kohya_text_encoder_lora_adapts_clip() {
    let model = with_loras(&dev(), vec![lora("kohya.safetensors", None)]).unwrap();
    let json = golden_json("lora_kohya.json");
    let (_, vec) = model
        .encode_text(json["prompt"].as_str().unwrap(), 16)
        .unwrap();
    let worst = assert_within_bf16_step(
        "CLIP pooled with lora_te1_",
        &vec,
        &golden("lora_kohya.safetensors", "vec"),
    );
    println!("CLIP pooled with the LoRA: worst {worst} bf16 steps");
    assert_eq!(
        model.loras[0].components,
        [
            fluxfit::component::Component::Clip,
            fluxfit::component::Component::Flow
        ]
    );
}

#[test]
fn two_stacked_loras_match_the_reference_with_both_merged() {
    let model = with_loras(
        &dev(),
        vec![
            lora("kohya.safetensors", Some(0.7)),
            lora("peft.safetensors", None),
        ],
    )
    .unwrap();
    assert_eq!(model.loras.len(), 2);
    assert_eq!(model.loras[0].scale, 0.7);
    check(&model, "stacked");
}

fn run_plan(model: &mut Model, spec: &str) -> Tensor {
    let plan = Plan::resident(DType::F32, Some(256))
        .with_spec(spec)
        .unwrap();
    model.set_plan(plan);
    latents(model, "stacked")
}

#[test]
fn streamed_plans_and_gguf_bases_give_the_resident_dense_image() {
    let stacked = || {
        vec![
            lora("kohya.safetensors", Some(0.7)),
            lora("peft.safetensors", None),
        ]
    };
    let mut dense = with_loras(&dev(), stacked()).unwrap();
    let resident = run_plan(&mut dense, "resident");
    for spec in ["stream:1:2", "phase", "stream:2:3"] {
        let d = max_abs_diff(&run_plan(&mut dense, spec), &resident);
        println!("dense base, {spec:<22} differs from resident by {d:e}");
        assert_eq!(d, 0.0, "{spec}");
    }
    // The Q8_0 GGUF of the same model: packed or dequantized, streamed or not, one image.
    let gguf = ModelSources {
        flow: fixtures().join("quant/flux1-tiny-dev-Q8_0.gguf"),
        ..dev()
    };
    let mut q8 = with_loras(&gguf, stacked()).unwrap();
    let q8_resident = run_plan(&mut q8, "resident");
    for spec in ["packed", "stream:1:2,flow=stream:1:2+packed"] {
        let d = max_abs_diff(&run_plan(&mut q8, spec), &q8_resident);
        println!("Q8_0 base, {spec:<36} differs from resident by {d:e}");
        assert_eq!(d, 0.0, "{spec}");
    }
    // Against the dense base: no further, relative to the latents' size, than quantization alone
    // moves the image without LoRAs (the stacked LoRAs make latents ~3x larger).
    let plain_dense = latents(&with_loras(&dev(), vec![]).unwrap(), "stacked");
    let plain_q8 = latents(&with_loras(&gguf, vec![]).unwrap(), "stacked");
    let quant = max_abs_diff(&plain_q8, &plain_dense) / max_abs(&plain_dense);
    let with_lora = max_abs_diff(&q8_resident, &resident) / max_abs(&resident);
    println!("Q8_0 vs bf16 base, relative: {quant:.4} without LoRAs, {with_lora:.4} with them");
    assert!(
        with_lora <= 2.0 * quant.max(1e-4),
        "a LoRA on the Q8_0 base strays {with_lora} from the dense base (quantization alone: {quant})"
    );
}

#[test]
fn merged_loras_match_the_reference_on_every_plan() {
    let mut model = with_loras(
        &dev(),
        vec![
            lora("kohya.safetensors", Some(0.7)),
            lora("peft.safetensors", None),
        ],
    )
    .unwrap();
    let unmerged = run_plan(&mut model, "resident");
    let want = golden("lora_stacked.safetensors", "final_latents");
    let tol = 1e-4 * max_abs(&want).max(1.0);
    let mut merged = Vec::new();
    for spec in ["lora=merged", "stream:1:2,lora=merged", "phase,lora=merged"] {
        let ours = run_plan(&mut model, spec);
        assert_close(&format!("stacked, {spec}"), &ours, &want, 1e-4);
        let d = max_abs_diff(&ours, &unmerged);
        println!("{spec:<24} differs from unmerged by {d:e}");
        assert!(d <= tol, "{spec}: {d}");
        merged.push(ours);
    }
    // Merging is deterministic: resident and per-phase merged plans give one image (a
    // streamed component keeps its low-rank term, so the streamed plan differs by rounding).
    assert_eq!(max_abs_diff(&merged[2], &merged[0]), 0.0);
    // The merged plan holds no factors: its weights are the base's, byte for byte.
    let plain = with_loras(&dev(), vec![]).unwrap();
    let held = |m: &Model| m.weights(fluxfit::component::Component::Flow).stage_bytes();
    let mut m = with_loras(&dev(), vec![lora("kohya.safetensors", None)]).unwrap();
    m.set_plan(
        Plan::resident(DType::F32, Some(256))
            .with_spec("lora=merged")
            .unwrap(),
    );
    assert_eq!(held(&m), held(&plain));
    // On a packed GGUF base the block-quantized weights keep their LoRAs unmerged (they are not
    // dense); the weights the file stores dense (biases' layers, small ones) merge.
    let gguf = ModelSources {
        flow: fixtures().join("quant/flux1-tiny-dev-Q8_0.gguf"),
        ..dev()
    };
    let mut q8 = with_loras(&gguf, vec![lora("kohya.safetensors", None)]).unwrap();
    let packed = run_plan(&mut q8, "packed");
    let packed_merged = run_plan(&mut q8, "packed,lora=merged");
    let d = max_abs_diff(&packed, &packed_merged);
    println!("packed Q8_0 base, lora=merged differs from unmerged by {d:e}");
    assert!(d <= 1e-4 * max_abs(&packed).max(1.0), "{d}");
}

/// Writes a LoRA with these tensors (values small and finite) and loads it on the dev base.
fn load_error(tensors: &[(&str, Vec<usize>)], scale: Option<f64>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad-lora.safetensors");
    let shapes: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(n, s)| (n.to_string(), s.clone()))
        .collect();
    write_f32(&path, &shapes, |_, s| vec![0.01; s.iter().product()]).unwrap();
    let spec = LoraSpec {
        path: path.clone(),
        scale,
    };
    let err = with_loras(&dev(), vec![spec])
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("bad-lora.safetensors"),
        "names the file: {err}"
    );
    err
}

#[test]
fn bad_loras_are_refused_naming_what_is_wrong() {
    let sd15 = load_error(
        &[
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                vec![4, 320],
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
                vec![320, 4],
            ),
        ],
        None,
    );
    assert!(sd15.contains("Stable Diffusion 1.x"), "{sd15}");

    let loha = load_error(
        &[("lora_unet_single_blocks_0_linear1.hada_w1_a", vec![4, 64])],
        None,
    );
    assert!(loha.contains("LoHa"), "{loha}");

    // A LoRA for a wider model: the tensors and the base weight, with their shapes.
    let wide = load_error(
        &[
            ("double_blocks.0.img_attn.proj.lora_A.weight", vec![4, 3072]),
            ("double_blocks.0.img_attn.proj.lora_B.weight", vec![3072, 4]),
        ],
        None,
    );
    for part in [
        "double_blocks.0.img_attn.proj.lora_A.weight",
        "[4, 3072]",
        "[3072, 4]",
        "double_blocks.0.img_attn.proj.weight",
        "[64, 64]",
    ] {
        assert!(wide.contains(part), "{part} in: {wide}");
    }

    // Keys no layer matches are listed, all of them, not dropped.
    let unknown = load_error(
        &[
            ("double_blocks.0.img_attn.qkv.lora_A.weight", vec![4, 64]),
            ("double_blocks.0.img_attn.qkv.lora_B.weight", vec![192, 4]),
            ("double_blocks.7.img_attn.qkv.lora_A.weight", vec![4, 64]),
            ("double_blocks.7.img_attn.qkv.lora_B.weight", vec![192, 4]),
            ("not_a_layer.lora_A.weight", vec![4, 64]),
            ("not_a_layer.lora_B.weight", vec![64, 4]),
        ],
        None,
    );
    assert!(unknown.contains("2 key(s)"), "{unknown}");
    assert!(
        unknown.contains("double_blocks.7.img_attn.qkv"),
        "{unknown}"
    );
    assert!(unknown.contains("not_a_layer"), "{unknown}");

    let ok = [
        ("double_blocks.0.img_attn.qkv.lora_A.weight", vec![4, 64]),
        ("double_blocks.0.img_attn.qkv.lora_B.weight", vec![192, 4]),
    ];
    let nan = load_error(&ok, Some(f64::NAN));
    assert!(nan.contains("NaN") && nan.contains("finite"), "{nan}");

    let half = load_error(
        &[(
            "lora_unet_single_blocks_0_linear2.lora_down.weight",
            vec![4, 320],
        )],
        None,
    );
    assert!(half.contains("no up-projection"), "{half}");
}
