//! Bad input at the library's edge: each case is a typed error naming the file, key, shape or
//! value at fault, never a panic.

use std::path::{Path, PathBuf};

use crate::common::{bfl_sources, fixtures};
use fluxfit::checkpoint::layout::{self, ModelPaths};
use fluxfit::checkpoint::safetensors::{serialize_f32, SafetensorsFile};
use fluxfit::image::Format;
use fluxfit::noise::NoiseKind;
use fluxfit::pipeline::{LoadOptions, Model, ModelSources, Request};
use fluxfit::variant::Variant;
use fluxfit::Error;

fn request() -> Request {
    Request {
        prompt: "a fox".into(),
        width: 256,
        height: 256,
        steps: 4,
        guidance: 3.5,
        seed: 0,
        t5_tokens: 256,
        noise: NoiseKind::TorchBf16,
    }
}

#[track_caller]
fn invalid(req: Request, allow_large: bool, names: &[&str]) {
    match req.validate(allow_large) {
        Err(e @ Error::InvalidRequest(_)) => {
            let msg = e.to_string();
            for n in names {
                assert!(msg.contains(n), "`{n}` not in: {msg}");
            }
        }
        other => panic!("expected InvalidRequest naming {names:?}, got {other:?}"),
    }
}

#[test]
fn requests_are_validated() {
    assert!(request().validate(false).is_ok());
    invalid(
        Request {
            width: 32,
            ..request()
        },
        false,
        &["width 32", "64"],
    );
    invalid(
        Request {
            height: 5008,
            ..request()
        },
        false,
        &["height 5008", "4096"],
    );
    assert!(Request {
        height: 5008,
        ..request()
    }
    .validate(true)
    .is_ok());
    invalid(
        Request {
            steps: 0,
            ..request()
        },
        false,
        &["steps"],
    );
    invalid(
        Request {
            t5_tokens: 0,
            ..request()
        },
        false,
        &["t5 tokens"],
    );
    invalid(
        Request {
            guidance: f32::NAN,
            ..request()
        },
        false,
        &["guidance NaN"],
    );
}

#[test]
fn layouts_are_detected() {
    let bfl = ModelPaths::from_dir(&fixtures().join("tiny-bfl")).unwrap();
    assert_eq!(
        bfl.flow.as_deref().and_then(Path::file_name).unwrap(),
        "flux1-tiny-dev.safetensors"
    );
    assert!(bfl.vae.unwrap().ends_with("ae.safetensors"));
    assert!(bfl.t5.is_none() && bfl.clip.is_none());

    let d = fixtures().join("tiny-diffusers");
    let diffusers = ModelPaths::from_dir(&d).unwrap();
    assert_eq!(diffusers.flow, Some(d.join("transformer")));
    assert_eq!(diffusers.vae, Some(d.join("vae")));
    assert_eq!(diffusers.t5, Some(d.join("text_encoder_2")));
    assert_eq!(diffusers.clip_tokenizer, Some(d.join("tokenizer")));
}

#[test]
fn a_folder_of_neither_layout_says_what_was_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a model").unwrap();
    match ModelPaths::from_dir(dir.path()) {
        Err(e @ Error::Layout { .. }) => {
            let msg = e.to_string();
            for n in [
                dir.path().to_str().unwrap(),
                "model_index.json",
                "transformer/",
                "vae/",
                "flux1-*.safetensors",
                "ae.safetensors",
            ] {
                assert!(msg.contains(n), "`{n}` not in: {msg}");
            }
        }
        other => panic!("expected Layout, got {other:?}"),
    }
    let missing = dir.path().join("no-such-folder");
    match ModelPaths::from_dir(&missing) {
        Err(Error::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected Io, got {other:?}"),
    }
}

#[test]
fn missing_parts_name_the_flag_that_supplies_them() {
    let err = ModelSources::resolve(Some(&fixtures().join("tiny-bfl")), ModelPaths::default())
        .unwrap_err()
        .to_string();
    for n in ["tiny-bfl", "T5 encoder", "--t5", "CLIP encoder", "--clip"] {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
    assert!(
        !err.contains("--flow"),
        "the folder has a flow model: {err}"
    );
    let err = ModelSources::resolve(None, ModelPaths::default())
        .unwrap_err()
        .to_string();
    for n in ["--flow", "--vae", "--t5", "--clip"] {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
}

#[test]
fn truncated_and_garbage_checkpoints_are_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("tiny-bfl/ae.safetensors")).unwrap();
    let cases: [(&str, Vec<u8>); 4] = [
        ("half.safetensors", bytes[..bytes.len() / 2].to_vec()),
        ("header-only.safetensors", bytes[..4000].to_vec()),
        ("tiny.safetensors", vec![1, 2, 3]),
        ("garbage.safetensors", {
            let mut b = 64u64.to_le_bytes().to_vec();
            b.extend(std::iter::repeat_n(0xAB, 200));
            b
        }),
    ];
    for (name, content) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        match SafetensorsFile::open(&path) {
            Err(e @ Error::CorruptCheckpoint { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(path.to_str().unwrap()), "{msg}");
                assert!(msg.contains("truncated or corrupt"), "{msg}");
            }
            other => panic!("{name}: expected CorruptCheckpoint, got {other:?}"),
        }
    }
    let missing = dir.path().join("missing.safetensors");
    match SafetensorsFile::open(&missing) {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("missing.safetensors")),
        other => panic!("expected Io, got {other:?}"),
    }
}

/// A copy of the tiny BFL dev flow file with its header edited (data kept as is).
fn edited_flow(
    dir: &Path,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> PathBuf {
    let src = fixtures().join("tiny-bfl/flux1-tiny-dev.safetensors");
    let bytes = std::fs::read(src).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut head = serde_json::to_vec(&header).unwrap();
    head.resize(head.len().div_ceil(8) * 8, b' ');
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&head);
    out.extend_from_slice(&bytes[8 + n..]);
    let path = dir.join("flux1-edited-dev.safetensors");
    std::fs::write(&path, out).unwrap();
    path
}

fn load_with_flow(flow: &Path) -> fluxfit::Result<Model> {
    let src = ModelSources {
        flow: flow.to_path_buf(),
        ..bfl_sources("flux1-tiny-dev.safetensors")
    };
    Model::load(&src, "edited", LoadOptions::default())
}

#[test]
fn a_missing_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let key = "single_blocks.0.linear2.weight";
    let flow = edited_flow(dir.path(), |h| {
        h.remove(key).unwrap();
    });
    match load_with_flow(&flow) {
        Err(Error::MissingKey { key: k, path, .. }) => {
            assert_eq!(k, key);
            assert_eq!(path, flow);
        }
        other => panic!("expected MissingKey, got {:?}", other.err()),
    }
}

#[test]
fn a_wrong_shape_is_named_with_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let key = "double_blocks.0.txt_mlp.2.weight";
    let flow = edited_flow(dir.path(), |h| {
        h[key]["shape"] = serde_json::json!([128, 128]);
    });
    match load_with_flow(&flow) {
        Err(Error::WrongShape {
            key: k,
            expected,
            found,
            ..
        }) => {
            assert_eq!(k, key);
            assert_eq!(&*expected, &[64, 256]);
            assert_eq!(&*found, &[128, 128]);
        }
        other => panic!("expected WrongShape, got {:?}", other.err()),
    }
}

#[test]
fn a_wrong_rank_where_the_configuration_is_read_is_an_error_not_a_panic() {
    for (key, shape) in [
        ("txt_in.weight", serde_json::json!([2048])),
        ("vector_in.in_layer.weight", serde_json::json!([1024])),
        ("final_layer.linear.weight", serde_json::json!([4096])),
        (
            "double_blocks.0.img_mlp.0.weight",
            serde_json::json!([16384]),
        ),
        (
            "double_blocks.0.img_attn.norm.query_norm.scale",
            serde_json::json!([2, 16]),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let flow = edited_flow(dir.path(), |h| h[key]["shape"] = shape.clone());
        match load_with_flow(&flow) {
            Err(e @ Error::WrongRank { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(key) && msg.contains("-D"), "{msg}");
            }
            other => panic!("{key}: expected WrongRank, got {:?}", other.err()),
        }
    }
}

#[test]
fn a_variant_that_does_not_fit_names_those_that_would() {
    let options = LoadOptions {
        variant: Some(Variant::DevFill),
        ..LoadOptions::default()
    };
    let err = Model::load(&bfl_sources("flux1-tiny-dev.safetensors"), "t", options)
        .err()
        .expect("fill cannot load a dev flow")
        .to_string();
    for n in ["flux-dev-fill", "384", "fits flux-dev"] {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
}

#[test]
fn diffusers_parts_that_cannot_be_joined_are_named() {
    // A diffusers transformer with to_k of another width than to_q and to_v.
    let d = fixtures().join("tiny-diffusers/transformer/diffusion_pytorch_model.safetensors");
    let f = SafetensorsFile::open(&d).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (name, info) in f.tensors() {
        let mut shape = info.shape.clone();
        if name == "transformer_blocks.0.attn.to_k.weight" {
            shape = vec![shape[0] / 2, shape[1] * 2];
        }
        tensors.push((name.clone(), shape, vec![0.0; info.numel()]));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("diffusion_pytorch_model.safetensors");
    std::fs::write(&path, serialize_f32(&tensors)).unwrap();
    let err = layout::open_flow(dir.path()).expect_err("must fail");
    let msg = err.to_string();
    for n in [
        "transformer_blocks.0.attn.to_q.weight",
        "transformer_blocks.0.attn.to_k.weight",
        "[32, 128]",
    ] {
        assert!(msg.contains(n), "`{n}` not in: {msg}");
    }

    // to_k missing while to_q and to_v are there: the stored name is reported.
    let tensors: Vec<_> = tensors
        .into_iter()
        .filter(|(n, _, _)| n != "transformer_blocks.0.attn.to_k.weight")
        .collect();
    std::fs::write(&path, serialize_f32(&tensors)).unwrap();
    match layout::open_flow(dir.path()) {
        Err(Error::MissingKey { key, .. }) => {
            assert_eq!(key, "transformer_blocks.0.attn.to_k.weight")
        }
        other => panic!("expected MissingKey, got {:?}", other.err()),
    }
}

#[test]
fn unknown_output_extensions_are_refused() {
    assert_eq!(Format::from_path(Path::new("a.PNG")).unwrap(), Format::Png);
    assert_eq!(
        Format::from_path(Path::new("a.jpeg")).unwrap(),
        Format::Jpeg
    );
    match Format::from_path(Path::new("x.gif")) {
        Err(e @ Error::Output { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("x.gif") && msg.contains(".png"), "{msg}")
        }
        other => panic!("expected Output, got {other:?}"),
    }
}

#[test]
fn io_errors_do_not_repeat_themselves_in_a_source_chain() {
    let err = SafetensorsFile::open("/no/such/file.safetensors").unwrap_err();
    assert!(err.to_string().contains("/no/such/file.safetensors"));
    assert!(std::error::Error::source(&err).is_none());
}

#[test]
fn a_folder_with_several_flow_models_asks_which() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["flux1-dev.safetensors", "flux1-canny-dev.safetensors"] {
        std::fs::copy(
            fixtures().join("tiny-bfl/flux1-tiny-dev.safetensors"),
            dir.path().join(name),
        )
        .unwrap();
    }
    // A LoRA beside them is not a flow model.
    std::fs::copy(
        fixtures().join("tiny-bfl/flux1-tiny-canny-dev-lora.safetensors"),
        dir.path().join("flux1-canny-dev-lora.safetensors"),
    )
    .unwrap();
    let paths = ModelPaths::from_dir(dir.path()).unwrap();
    assert!(paths.flow.is_none());
    assert_eq!(paths.flow_choices.len(), 2);
    let err = ModelSources::resolve(Some(dir.path()), ModelPaths::default())
        .unwrap_err()
        .to_string();
    for n in [
        "--flow",
        "flux1-dev.safetensors",
        "flux1-canny-dev.safetensors",
    ] {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
    assert!(!err.contains("lora"), "{err}");
}

#[test]
fn a_folder_with_a_gguf_flow_model_finds_it() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("flux1-dev-Q8_0.gguf");
    std::fs::copy(fixtures().join("quant/flux1-tiny-dev-Q8_0.gguf"), &gguf).unwrap();
    std::fs::copy(
        fixtures().join("tiny-bfl/ae.safetensors"),
        dir.path().join("ae.safetensors"),
    )
    .unwrap();
    let paths = ModelPaths::from_dir(dir.path()).unwrap();
    assert_eq!(paths.flow, Some(gguf));
    // Beside a safetensors flow model it is a second choice, and the user must say which.
    std::fs::copy(
        fixtures().join("tiny-bfl/flux1-tiny-dev.safetensors"),
        dir.path().join("flux1-dev.safetensors"),
    )
    .unwrap();
    let paths = ModelPaths::from_dir(dir.path()).unwrap();
    assert!(paths.flow.is_none());
    assert_eq!(paths.flow_choices.len(), 2);
}
