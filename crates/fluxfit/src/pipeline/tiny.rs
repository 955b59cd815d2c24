//! The built-in tiny FLUX family: the real architecture at toy width, weights generated
//! deterministically in process, so the whole pipeline runs in seconds with no download.

use super::model::{LoadOptions, Model, Stores};
use crate::checkpoint::safetensors::{serialize_f32, SafetensorsFile};
use crate::checkpoint::store::TensorStore;
use crate::error::Result;
use crate::model::autoencoder::AutoEncoderConfig;
use crate::model::clip::{ClipActivation, ClipConfig};
use crate::model::flow::FlowConfig;
use crate::model::t5::T5Config;
use crate::noise::{torch_randn, NoiseKind};
use crate::tokenizer::{ClipTokenizer, T5Tokenizer};
use crate::variant::Variant;

const CLIP_BPE: &[u8] = include_bytes!("../../assets/bpe_simple_vocab_16e6.txt.gz");
const T5_TOKENIZER: &[u8] = include_bytes!("../../assets/t5_tiny_tokenizer.json");

/// Width of the tiny text encoders, which is also what the tiny flow model reads.
const TEXT_DIM: usize = 32;

pub fn flow_config(variant: Variant) -> FlowConfig {
    FlowConfig {
        in_channels: variant.in_channels(),
        out_channels: 64,
        vec_in_dim: TEXT_DIM,
        context_in_dim: TEXT_DIM,
        hidden_size: 64,
        mlp_hidden: 256,
        num_heads: 2,
        depth: 2,
        depth_single: 2,
        axes_dim: vec![4, 14, 14],
        theta: 10_000.0,
        qkv_bias: true,
        guidance_embed: variant.guidance_embed(),
    }
}

pub fn ae_config() -> AutoEncoderConfig {
    AutoEncoderConfig {
        ch: 32,
        ch_mult: vec![1, 1, 2, 2],
        num_res_blocks: 1,
        ..AutoEncoderConfig::flux()
    }
}

pub fn t5_config(vocab_size: usize) -> T5Config {
    T5Config {
        vocab_size,
        d_model: TEXT_DIM,
        d_kv: 8,
        num_heads: 4,
        d_ff: 64,
        num_layers: 2,
        relative_attention_num_buckets: 32,
        relative_attention_max_distance: 128,
        layer_norm_epsilon: 1e-6,
        gated: true,
    }
}

pub fn clip_config() -> ClipConfig {
    ClipConfig {
        vocab_size: 49408,
        hidden_size: TEXT_DIM,
        intermediate_size: 64,
        num_layers: 2,
        num_heads: 2,
        max_position_embeddings: 77,
        activation: ClipActivation::QuickGelu,
        layer_norm_eps: 1e-5,
        eos_token_id: 2,
    }
}

/// FNV-1a: a stable per-tensor seed, so each tensor's values depend only on its name.
fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Values for one tensor: norms start at one, biases small, matrices scaled by fan-in so that
/// activations stay O(1) through the blocks.
fn init(name: &str, shape: &[usize]) -> Vec<f32> {
    let numel: usize = shape.iter().product();
    let is_norm = name.contains("norm") || name.ends_with(".scale");
    if is_norm && shape.len() == 1 {
        let unit = name.ends_with("weight") || name.ends_with("scale");
        return vec![if unit { 1.0 } else { 0.0 }; numel];
    }
    let std = match shape.len() {
        1 => 0.02,
        _ if name.contains("embedding") || name.contains("shared") => 0.5,
        _ => 1.0 / (shape[1..].iter().product::<usize>() as f32).sqrt(),
    };
    torch_randn(seed_of(name), numel, NoiseKind::TorchF32)
        .into_iter()
        .map(|v| v * std)
        .collect()
}

fn store(label: &str, shapes: Vec<(String, Vec<usize>)>) -> Result<TensorStore> {
    let tensors: Vec<_> = shapes
        .into_iter()
        .map(|(name, shape)| {
            let v = init(&format!("{label}/{name}"), &shape);
            (name, shape, v)
        })
        .collect();
    let file = SafetensorsFile::from_bytes(format!("<tiny {label}>"), serialize_f32(&tensors))?;
    Ok(TensorStore::from_files(
        format!("<tiny {label}>"),
        vec![file],
        &[],
    ))
}

/// The tiny model of `variant`'s shape (default schnell: 4 steps, no guidance).
pub fn load(options: LoadOptions) -> Result<Model> {
    let variant = options.variant.unwrap_or(Variant::Schnell);
    let t5_tok = T5Tokenizer::from_bytes(T5_TOKENIZER)?;
    let clip_tok = ClipTokenizer::from_open_clip_bpe_gz(CLIP_BPE)?;
    let t5 = t5_config(t5_tok.vocab_size());
    let clip = clip_config();
    let stores = Stores {
        flow: store("flow", flow_config(variant).expected_shapes())?,
        ae: store("ae", ae_config().expected_shapes())?,
        t5: store("t5", t5.expected_shapes())?,
        clip: store("clip", clip.expected_shapes())?,
        t5_config: None,
        clip_config: None,
        t5_known: Some(t5),
        clip_known: Some(clip),
    };
    let options = LoadOptions {
        variant: Some(variant),
        ..options
    };
    Model::from_stores(
        &format!("tiny ({variant})"),
        "tiny",
        stores,
        t5_tok,
        clip_tok,
        options,
    )
}
