//! Checkpoint layouts that real distributions use, built from the tiny fixtures: the same
//! weights must give the same tensors whatever the file layout.

use std::path::{Path, PathBuf};

use crate::common::*;
use candle_core::{DType, Device};
use fluxfit::checkpoint::layout::{open_clip, open_flow, open_t5};
use fluxfit::checkpoint::safetensors::{serialize_f32, SafetensorsFile};
use fluxfit::checkpoint::store::TensorStore;

/// A fresh empty folder under the target dir (tests must not write into the source tree).
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every tensor of a file as (name, shape, f32 values).
fn tensors_of(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let f = SafetensorsFile::open(path).unwrap();
    f.tensors()
        .keys()
        .map(|k| {
            let t = f
                .load(k, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            (
                k.clone(),
                t.dims().to_vec(),
                t.flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
}

/// Every canonical key of two stores holds the same values.
fn assert_same_tensors(a: &TensorStore, b: &TensorStore) {
    let keys: Vec<&String> = a.keys().collect();
    assert_eq!(
        keys,
        b.keys().collect::<Vec<_>>(),
        "canonical key sets differ"
    );
    for k in keys {
        let x = a.load(k, &Device::Cpu, DType::F32).unwrap();
        let y = b.load(k, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(max_abs_diff(&x, &y), 0.0, "{k}");
    }
}

#[test]
fn bfl_file_with_diffusion_model_prefix_loads_the_same() {
    let src = fixtures().join("tiny-bfl/flux1-tiny-dev.safetensors");
    let renamed: Vec<_> = tensors_of(&src)
        .into_iter()
        .map(|(k, s, v)| (format!("model.diffusion_model.{k}"), s, v))
        .collect();
    let dir = scratch("prefixed");
    let path = dir.join("flux1-dev.safetensors");
    std::fs::write(&path, serialize_f32(&renamed)).unwrap();
    assert_same_tensors(&open_flow(&src).unwrap(), &open_flow(&path).unwrap());
}

#[test]
fn sharded_checkpoint_with_index_loads_the_same() {
    let src = fixtures().join("tiny-diffusers/text_encoder_2");
    let all = tensors_of(&src.join("model.safetensors"));
    let dir = scratch("sharded");
    let (a, b) = all.split_at(all.len() / 2);
    let mut map = serde_json::Map::new();
    for (i, part) in [a, b].into_iter().enumerate() {
        let name = format!("model-0000{}-of-00002.safetensors", i + 1);
        std::fs::write(dir.join(&name), serialize_f32(part)).unwrap();
        for (k, _, _) in part {
            map.insert(k.clone(), name.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_same_tensors(&open_t5(&src).unwrap(), &open_t5(&dir).unwrap());

    // A shard named by the index but absent is reported by name.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = open_t5(&dir).unwrap_err().to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

#[test]
fn clip_with_or_without_text_model_prefix_loads_the_same() {
    let src = fixtures().join("tiny-diffusers/text_encoder");
    let stripped: Vec<_> = tensors_of(&src.join("model.safetensors"))
        .into_iter()
        .map(|(k, s, v)| {
            (
                k.strip_prefix("text_model.").unwrap_or(&k).to_string(),
                s,
                v,
            )
        })
        .collect();
    let dir = scratch("clip_plain");
    std::fs::write(dir.join("model.safetensors"), serialize_f32(&stripped)).unwrap();
    assert_same_tensors(&open_clip(&src).unwrap(), &open_clip(&dir).unwrap());
}

#[test]
fn diffusers_transformer_maps_onto_bfl_names() {
    let bfl = open_flow(&fixtures().join("tiny-bfl/flux1-tiny-dev.safetensors")).unwrap();
    let diffusers = open_flow(&fixtures().join("tiny-diffusers/transformer")).unwrap();
    assert_same_tensors(&bfl, &diffusers);
}

/// The built-in model written as files with a bf16 flow model (what `fluxfit device-check`
/// writes at full size) opens as a checkpoint: every flow tensor stored as bf16 bytes the GPU's
/// upload can copy as they are, and the model generates a finite image.
#[test]
fn a_written_built_in_model_opens_with_a_bf16_flow_file() {
    use fluxfit::pipeline::tiny::{self, TinyConfigs};
    use fluxfit::pipeline::{LoadOptions, Request};
    use fluxfit::variant::Variant;
    let dir = scratch("written-built-in");
    let configs = TinyConfigs::sized(Variant::Dev, 128, 1, 1).unwrap();
    tiny::write_dir(&configs, &dir).unwrap();
    assert!(!dir.join("flow.safetensors.partial").exists());
    let file = SafetensorsFile::open(dir.join("flow.safetensors")).unwrap();
    let store = TensorStore::from_files(dir.join("flow.safetensors"), vec![file], &[]);
    let expected = configs.flow.expected_shapes();
    assert_eq!(store.len(), expected.len());
    for (key, shape) in &expected {
        let d = store.direct_bytes(key).unwrap().expect("stored as is");
        assert_eq!((d.dtype, &d.shape), (DType::BF16, shape), "{key}");
        assert_eq!(d.bytes.len(), shape.iter().product::<usize>() * 2, "{key}");
    }
    let model = tiny::open_dir(&configs, &dir, LoadOptions::default()).unwrap();
    let req = Request {
        prompt: "a red fox".into(),
        width: 64,
        height: 64,
        steps: 2,
        guidance: 3.5,
        seed: 1,
        t5_tokens: 16,
        noise: fluxfit::noise::NoiseKind::TorchF32,
    };
    let out = model.text_to_image(&req, &mut |_| {}).unwrap();
    let max = max_abs(&out.image);
    assert!(max.is_finite() && max > 0.0, "{max}");
    let _ = std::fs::remove_dir_all(&dir);
}
