//! The built-in tiny FLUX family: the real architecture at toy width, weights generated
//! deterministically in process, so the whole pipeline runs in seconds with no download.

use std::path::Path;

use super::model::{LoadOptions, Model, Stores};
use crate::checkpoint::safetensors::{serialize_f32, write_f32, SafetensorsFile};
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

/// The built-in model's tokenizers (a tiny T5 vocabulary, CLIP's real BPE).
pub fn tokenizers() -> (T5Tokenizer, ClipTokenizer) {
    (
        T5Tokenizer::from_bytes(T5_TOKENIZER).expect("the embedded T5 tokenizer parses"),
        ClipTokenizer::from_open_clip_bpe_gz(CLIP_BPE).expect("the embedded CLIP BPE parses"),
    )
}

pub fn memory_store(label: &str, shapes: Vec<(String, Vec<usize>)>) -> Result<TensorStore> {
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

/// The same weights as [`store`], written to `dir/{label}.safetensors` tensor by tensor and
/// memory-mapped: the file is then their one home, as for a downloaded checkpoint.
fn file_store(dir: &Path, label: &str, shapes: Vec<(String, Vec<usize>)>) -> Result<TensorStore> {
    let path = dir.join(format!("{label}.safetensors"));
    write_f32(&path, &shapes, |name, shape| {
        init(&format!("{label}/{name}"), shape)
    })?;
    let file = SafetensorsFile::open(&path)?;
    Ok(TensorStore::from_files(path, vec![file], &[]))
}

/// The shapes of a built-in model's four components: the tiny defaults, or other sizes for
/// tests and benchmarks (the text encoders stay tiny; the flow model reads their width).
#[derive(Debug, Clone, PartialEq)]
pub struct TinyConfigs {
    pub variant: Variant,
    pub flow: FlowConfig,
    pub vae: AutoEncoderConfig,
    pub t5: T5Config,
    pub clip: ClipConfig,
}

impl TinyConfigs {
    /// The tiny model of `variant`'s shape.
    pub fn tiny(variant: Variant) -> Result<Self> {
        let t5_tok = T5Tokenizer::from_bytes(T5_TOKENIZER)?;
        Ok(Self {
            variant,
            flow: flow_config(variant),
            vae: ae_config(),
            t5: t5_config(t5_tok.vocab_size()),
            clip: clip_config(),
        })
    }

    /// A flow model of width `hidden` (MLP 4×, heads of 64, or 2 heads below 128) with `depth`
    /// double and `depth_single` single blocks; the other components tiny. Flow weights take
    /// about `(36 depth + 15 depth_single) hidden²` f32 values.
    pub fn sized(
        variant: Variant,
        hidden: usize,
        depth: usize,
        depth_single: usize,
    ) -> Result<Self> {
        let mut c = Self::tiny(variant)?;
        let heads = if hidden >= 128 { hidden / 64 } else { 2 };
        c.flow = FlowConfig {
            hidden_size: hidden,
            mlp_hidden: 4 * hidden,
            num_heads: heads,
            depth,
            depth_single,
            axes_dim: FlowConfig::default_axes(hidden / heads)?,
            ..c.flow
        };
        Ok(c)
    }
}

/// The tiny model of `variant`'s shape (default schnell: 4 steps, no guidance).
pub fn load(options: LoadOptions) -> Result<Model> {
    let variant = options.variant.unwrap_or(Variant::Schnell);
    load_with(&TinyConfigs::tiny(variant)?, None, options)
}

/// A built-in model of the given shapes, weights generated deterministically (each tensor's
/// values depend only on its name and shape). With `dir`, the weights are written there as
/// safetensors files and memory-mapped, as real checkpoints are; without, they live in memory.
pub fn load_with(configs: &TinyConfigs, dir: Option<&Path>, options: LoadOptions) -> Result<Model> {
    let variant = configs.variant;
    let t5_tok = T5Tokenizer::from_bytes(T5_TOKENIZER)?;
    let clip_tok = ClipTokenizer::from_open_clip_bpe_gz(CLIP_BPE)?;
    let make = |label: &str, shapes| match dir {
        Some(d) => file_store(d, label, shapes),
        None => memory_store(label, shapes),
    };
    let stores = Stores {
        flow: make("flow", configs.flow.expected_shapes())?,
        vae: make("ae", configs.vae.expected_shapes())?,
        t5: make("t5", configs.t5.expected_shapes())?,
        clip: make("clip", configs.clip.expected_shapes())?,
        t5_config: None,
        clip_config: None,
        t5_known: Some(configs.t5.clone()),
        clip_known: Some(configs.clip.clone()),
    };
    let options = LoadOptions {
        variant: Some(variant),
        ..options
    };
    let name = if configs.flow == flow_config(variant) {
        format!("tiny ({variant})")
    } else {
        format!(
            "tiny ({variant}, flow {}×{}+{})",
            configs.flow.hidden_size, configs.flow.depth, configs.flow.depth_single
        )
    };
    Model::from_stores(&name, "tiny", stores, t5_tok, clip_tok, options)
}

/// Writes a built-in model's four files into `dir` for [`open_dir`]: the flow model in bf16 with
/// cheap pseudo-random values of the built-in model's scales (a full-size FLUX.1-dev-shaped one is 24 GB,
/// and torch-exact normals for 12 billion weights would take minutes), the others in f32 as
/// [`load_with`] writes them. For measurements on real shapes where no weights can be had.
pub fn write_dir(configs: &TinyConfigs, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| crate::error::Error::io(dir, e))?;
    // A folder left without its flow file by an interrupted run keeps the small files it has
    // (the same deterministic weights); fluxfit never writes over a file.
    for (label, shapes) in [
        ("ae", configs.vae.expected_shapes()),
        ("t5", configs.t5.expected_shapes()),
        ("clip", configs.clip.expected_shapes()),
    ] {
        if !dir.join(format!("{label}.safetensors")).exists() {
            file_store(dir, label, shapes)?;
        }
    }
    // Last, and renamed into place when whole: its presence says the folder is complete.
    crate::checkpoint::safetensors::write_bf16(
        &dir.join("flow.safetensors"),
        &configs.flow.expected_shapes(),
        |name, shape, out| fast_init(&format!("flow/{name}"), shape, out),
    )
}

/// The model [`write_dir`] wrote, memory-mapped from `dir`.
pub fn open_dir(configs: &TinyConfigs, dir: &Path, options: LoadOptions) -> Result<Model> {
    let open = |label: &str| -> Result<TensorStore> {
        let path = dir.join(format!("{label}.safetensors"));
        let file = SafetensorsFile::open(&path)?;
        Ok(TensorStore::from_files(path, vec![file], &[]))
    };
    let stores = Stores {
        flow: open("flow")?,
        vae: open("ae")?,
        t5: open("t5")?,
        clip: open("clip")?,
        t5_config: None,
        clip_config: None,
        t5_known: Some(configs.t5.clone()),
        clip_known: Some(configs.clip.clone()),
    };
    let t5_tok = T5Tokenizer::from_bytes(T5_TOKENIZER)?;
    let clip_tok = ClipTokenizer::from_open_clip_bpe_gz(CLIP_BPE)?;
    let options = LoadOptions {
        variant: Some(configs.variant),
        ..options
    };
    let name = format!(
        "built-in ({}, flow {}×{}+{}, bf16 file)",
        configs.variant, configs.flow.hidden_size, configs.flow.depth, configs.flow.depth_single
    );
    Model::from_stores(&name, "built-in", stores, t5_tok, clip_tok, options)
}

/// `init`'s scales with uniform values from a hash of the name (bf16 bits): fast enough for
/// billions of weights, and still a network whose activations stay finite.
fn fast_init(name: &str, shape: &[usize], out: &mut [u16]) {
    let is_norm = name.contains("norm") || name.ends_with(".scale");
    if is_norm && shape.len() == 1 {
        let unit = name.ends_with("weight") || name.ends_with("scale");
        out.fill(half::bf16::from_f32(if unit { 1.0 } else { 0.0 }).to_bits());
        return;
    }
    let std = match shape.len() {
        1 => 0.02,
        _ => 1.0 / (shape[1..].iter().product::<usize>() as f32).sqrt(),
    };
    // Uniform on [-a, a] has standard deviation a/√3.
    let a = std * 3f32.sqrt();
    let mut state = seed_of(name);
    for v in out.iter_mut() {
        // splitmix64
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let u = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
        *v = half::bf16::from_f32((2.0 * u - 1.0) * a).to_bits();
    }
}
