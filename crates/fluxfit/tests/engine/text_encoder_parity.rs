//! The text encoders against transformers (`T5EncoderModel`, `CLIPTextModel`) on the tiny
//! fixtures, plus the configuration and error paths a real checkpoint goes through.
//!
//! Tolerance: max |ours − transformers| ≤ 1e-4. Both sides compute in f32 from the same
//! (f16/bf16-stored) weights, so the only legitimate difference is summation order inside matmuls,
//! softmax and norms: ~1e-6 on activations of magnitude ~1–10. A real bug (a wrong position
//! bucket, a missing or extra score scale, the wrong pooled token, the wrong GELU) moves outputs
//! by 1e-2 or more. Do not loosen it to make a test pass.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use fluxfit::checkpoint::safetensors::SafetensorsFile;
use fluxfit::checkpoint::store::TensorStore;
use fluxfit::memory::residency::{Placement, Residency};
use fluxfit::model::clip::{ClipConfig, ClipTextModel};
use fluxfit::model::t5::{T5Config, T5Encoder};
use fluxfit::Error;

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn clip_dir() -> PathBuf {
    fixtures().join("tiny-diffusers/text_encoder")
}

fn t5_dir() -> PathBuf {
    fixtures().join("tiny-diffusers/text_encoder_2")
}

/// A component folder's store under canonical names (CLIP's `text_model.` stripped).
fn store(dir: &Path) -> TensorStore {
    let file = SafetensorsFile::open(dir.join("model.safetensors")).expect("fixture weights");
    TensorStore::from_files(dir, vec![file], &["text_model."])
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("golden").join(name);
    candle_core::safetensors::load(&path, &Device::Cpu).expect("golden outputs")
}

fn residency(store: TensorStore, stages: Vec<fluxfit::memory::residency::StageSpec>) -> Residency {
    Residency::new(
        Arc::new(store),
        stages,
        Device::Cpu,
        DType::F32,
        Placement::Resident,
    )
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("difference")
}

#[test]
fn t5_matches_transformers() -> fluxfit::Result<()> {
    let store = store(&t5_dir());
    let config = T5Config::from_store(&store, Some(&t5_dir().join("config.json")))?;
    let encoder = T5Encoder::new(config);
    let weights = residency(store, encoder.stages());
    let golden = golden("t5.safetensors");

    let hidden = encoder.forward_ids(&weights, &golden["input_ids"])?;

    let err = max_abs_diff(&hidden, &golden["last_hidden_state"]);
    eprintln!("T5 last_hidden_state: max abs error {err:e}");
    assert!(err <= TOLERANCE, "T5 last_hidden_state off by {err}");
    Ok(())
}

#[test]
fn clip_matches_transformers() -> fluxfit::Result<()> {
    let store = store(&clip_dir());
    let config = ClipConfig::from_store(&store, Some(&clip_dir().join("config.json")))?;
    let model = ClipTextModel::new(config);
    let weights = residency(store, model.stages());
    let golden = golden("clip.safetensors");

    let (hidden, pooled) = model.forward_ids(&weights, &golden["input_ids"])?;

    let err = max_abs_diff(&hidden, &golden["last_hidden_state"]);
    eprintln!("CLIP last_hidden_state: max abs error {err:e}");
    assert!(err <= TOLERANCE, "CLIP last_hidden_state off by {err}");
    let err = max_abs_diff(&pooled, &golden["pooler_output"]);
    eprintln!("CLIP pooler_output: max abs error {err:e}");
    assert!(err <= TOLERANCE, "CLIP pooler_output off by {err}");
    Ok(())
}

/// u32 ids (what the tokenizer gives) and i64 ids (what the goldens hold) are the same request.
#[test]
fn t5_accepts_u32_ids() -> fluxfit::Result<()> {
    let store = store(&t5_dir());
    let encoder = T5Encoder::new(T5Config::from_store(&store, None)?);
    let weights = residency(store, encoder.stages());
    let ids = &golden("t5.safetensors")["input_ids"];
    let from_i64 = encoder.forward_ids(&weights, ids)?;
    let from_u32 = encoder.forward_ids(&weights, &ids.to_dtype(DType::U32)?)?;
    assert_eq!(max_abs_diff(&from_i64, &from_u32), 0.0);
    Ok(())
}

#[test]
fn t5_config_from_shapes_equals_config_json() -> fluxfit::Result<()> {
    let store = store(&t5_dir());
    let from_shapes = T5Config::from_store(&store, None)?;
    let from_json = T5Config::from_store(&store, Some(&t5_dir().join("config.json")))?;
    assert_eq!(from_shapes, from_json);
    Ok(())
}

/// Shapes do not record CLIP's head count; inferring it assumes CLIP-L's 64-wide heads, so the
/// shape-derived config is compared with config.json on every field the shapes do determine.
#[test]
fn clip_config_from_shapes_agrees_with_config_json() -> fluxfit::Result<()> {
    let store = store(&clip_dir());
    let from_json = ClipConfig::from_store(&store, Some(&clip_dir().join("config.json")))?;
    let from_shapes = match ClipConfig::from_store(&store, None) {
        Ok(c) => c,
        // A width that 64-wide heads cannot split must be refused, asking for config.json.
        Err(Error::Config(msg)) => {
            assert!(
                from_json.hidden_size % 64 != 0 && msg.contains("config.json"),
                "{msg}"
            );
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    assert_eq!(
        ClipConfig {
            num_heads: from_json.num_heads,
            activation: from_json.activation,
            layer_norm_eps: from_json.layer_norm_eps,
            eos_token_id: from_json.eos_token_id,
            ..from_shapes
        },
        from_json
    );
    Ok(())
}

/// Each stage owns exactly the tensors the network reads from it, so a plan that streams stage
/// by stage brings in every weight once and nothing else.
#[test]
fn stages_cover_every_tensor_once() -> fluxfit::Result<()> {
    let t5_store = store(&t5_dir());
    let t5 = T5Config::from_store(&t5_store, None)?;
    let clip_store = store(&clip_dir());
    let clip = ClipConfig::from_store(&clip_store, Some(&clip_dir().join("config.json")))?;
    let cases = [
        (
            &t5_store,
            T5Encoder::new(t5.clone()).stages(),
            t5.expected_shapes(),
        ),
        (
            &clip_store,
            ClipTextModel::new(clip.clone()).stages(),
            clip.expected_shapes(),
        ),
    ];
    for (store, stages, expected) in cases {
        let mut seen = BTreeSet::new();
        for stage in &stages {
            for key in stage.keys(store) {
                assert!(seen.insert(key.clone()), "{key} is in two stages");
            }
        }
        // The token embedding may be stored as `encoder.embed_tokens.weight` (T5) instead.
        let expected: BTreeSet<String> = expected
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| store.contains(k))
            .collect();
        assert_eq!(seen, expected);
    }
    Ok(())
}

/// Writes the tensors of `src` to a fresh file with `key` replaced by `replacement`.
fn corrupted_copy(src: &Path, key: &str, replacement: Tensor) -> PathBuf {
    let mut tensors = candle_core::safetensors::load(src, &Device::Cpu).expect("fixture");
    assert!(tensors.insert(key.to_string(), replacement).is_some());
    let dir = std::env::temp_dir().join(format!("fluxfit-te-{}-{key}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path).expect("write corrupted copy");
    path
}

#[test]
fn wrong_shape_names_the_key() -> fluxfit::Result<()> {
    let t5_key = "encoder.block.1.layer.1.DenseReluDense.wo.weight";
    let clip_key = "encoder.layers.1.self_attn.k_proj.weight";
    let cases: [(&str, PathBuf, &str); 2] =
        [("t5", t5_dir(), t5_key), ("clip", clip_dir(), clip_key)];
    for (model, dir, key) in cases {
        let canonical = store(&dir);
        let shape = canonical.shape(key)?.to_vec();
        let stored_key = [key.to_string(), format!("text_model.{key}")]
            .into_iter()
            .find(|k| canonical.files()[0].tensors().contains_key(k))
            .expect("stored name");
        let wrong = Tensor::zeros((shape[0], shape[1] + 1), DType::F32, &Device::Cpu)?;
        let path = corrupted_copy(&dir.join("model.safetensors"), &stored_key, wrong);
        let bad =
            TensorStore::from_files(&path, vec![SafetensorsFile::open(&path)?], &["text_model."]);
        let config = dir.join("config.json");
        let results = match model {
            "t5" => vec![
                T5Config::from_store(&bad, Some(&config)).map(drop),
                T5Config::from_store(&bad, None).map(drop),
            ],
            _ => vec![ClipConfig::from_store(&bad, Some(&config)).map(drop)],
        };
        for result in results {
            match result {
                Err(Error::WrongShape {
                    key: k,
                    expected,
                    found,
                    ..
                }) => {
                    assert_eq!(k, key);
                    assert_eq!(&*expected, shape.as_slice());
                    assert_eq!(&*found, &[shape[0], shape[1] + 1]);
                }
                other => panic!("{model}: expected WrongShape for {key}, got {other:?}"),
            }
        }
        std::fs::remove_dir_all(path.parent().expect("dir")).ok();
    }
    Ok(())
}

#[test]
fn out_of_vocabulary_ids_are_refused() -> fluxfit::Result<()> {
    let store = store(&t5_dir());
    let config = T5Config::from_store(&store, None)?;
    let vocab = config.vocab_size as u32;
    let encoder = T5Encoder::new(config);
    let weights = residency(store, encoder.stages());
    let ids = Tensor::new(&[[0u32, vocab]], &Device::Cpu)?;
    match encoder.forward_ids(&weights, &ids) {
        Err(Error::InvalidRequest(msg)) => assert!(msg.contains(&vocab.to_string()), "{msg}"),
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
    Ok(())
}
