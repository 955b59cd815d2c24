//! SigLIP's vision tower (transformers' `SiglipVisionModel`, its `last_hidden_state`), the image
//! encoder of FLUX.1 Redux: non-overlapping patches projected to the width, learned absolute
//! positions, pre-norm layers that attend everywhere, a final LayerNorm. The attention-pooling
//! head exists in the checkpoints but only makes `pooler_output`, which Redux does not use.
//!
//! Canonical keys drop transformers' `vision_model.` prefix: `embeddings.patch_embedding.*`,
//! `embeddings.position_embedding.weight`, `encoder.layers.N.*`, `post_layernorm.*`.

use std::path::Path;

use serde::Deserialize;

use super::encoder_layer::{Activation, EncoderLayer};
use super::t5::{count_blocks, dims, from_store_with};
use crate::checkpoint::store::TensorStore;
use crate::error::{Error, Result};
use crate::model::ops;
use crate::model::weights::{Stage, StageSpec, Weights};
use crate::tensor::Tensor;

const PATCH_WEIGHT: &str = "embeddings.patch_embedding.weight";
const PATCH_BIAS: &str = "embeddings.patch_embedding.bias";
const POSITIONS: &str = "embeddings.position_embedding.weight";
const LAYERS: &str = "encoder.layers.";
const POST_NORM: &str = "post_layernorm";

#[derive(Debug, Clone, PartialEq)]
pub struct SiglipConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_channels: usize,
    /// The square side the processor resizes to; `(image_size / patch_size)²` tokens.
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
}

impl SiglipConfig {
    /// google/siglip-so400m-patch14-384, Redux's tower: 729 tokens of width 1152.
    pub fn so400m_patch14_384() -> Self {
        Self {
            hidden_size: 1152,
            intermediate_size: 4304,
            num_layers: 27,
            num_heads: 16,
            num_channels: 3,
            image_size: 384,
            patch_size: 14,
            layer_norm_eps: 1e-6,
            activation: Activation::GeluTanh,
        }
    }

    /// Tokens per image.
    pub fn patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    fn layer(&self) -> EncoderLayer {
        EncoderLayer {
            width: self.hidden_size,
            heads: self.num_heads,
            activation: self.activation,
            eps: self.layer_norm_eps,
        }
    }

    /// The configuration of the tower in `store` (canonical keys): from `config_json` when
    /// given, else from the shapes, which must then be so400m's (the head count is not in
    /// them). Every tensor is then checked against it, naming the key at fault.
    pub fn from_store(store: &TensorStore, config_json: Option<&Path>) -> Result<Self> {
        from_store_with(
            store,
            config_json,
            Self::from_json,
            Self::from_shapes,
            Self::check,
        )
    }

    fn from_shapes(store: &TensorStore) -> Result<Self> {
        let [hidden, channels, patch, _] = dims::<4>(store, PATCH_WEIGHT)?;
        let [positions, _] = dims::<2>(store, POSITIONS)?;
        let so400m = Self::so400m_patch14_384();
        let side = (positions as f64).sqrt().round() as usize;
        if hidden != so400m.hidden_size || side * side != positions {
            return Err(Error::Config(format!(
                "{}: a SigLIP vision tower of width {hidden} with {positions} positions is not \
                 so400m-patch14-384, and its head count cannot be read off the shapes; put its \
                 config.json beside the weights",
                store.origin().display()
            )));
        }
        let [intermediate, _] = dims::<2>(store, "encoder.layers.0.mlp.fc1.weight")?;
        Ok(Self {
            intermediate_size: intermediate,
            num_layers: count_blocks(store, LAYERS),
            num_channels: channels,
            image_size: side * patch,
            patch_size: patch,
            ..so400m
        })
    }

    /// Reads an HF `config.json`: a `SiglipVisionConfig`, or a full `SiglipConfig` whose
    /// `vision_config` is used; transformers' defaults fill absent fields.
    pub fn from_json(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Config(format!("{}: {msg}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| bad(format!("not a SigLIP config.json: {e}")))?;
        if let Some(inner) = value.get_mut("vision_config").map(serde_json::Value::take) {
            value = inner;
        }
        let json: SiglipJson = serde_json::from_value(value)
            .map_err(|e| bad(format!("not a SigLIP vision config: {e}")))?;
        if let Some(t) = json
            .model_type
            .as_deref()
            .filter(|t| !matches!(*t, "siglip_vision_model" | "siglip"))
        {
            return Err(bad(format!(
                "model_type is `{t}`, expected `siglip_vision_model`"
            )));
        }
        let activation = match json.hidden_act.as_str() {
            "gelu_pytorch_tanh" | "gelu_new" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            "quick_gelu" => Activation::QuickGelu,
            other => return Err(bad(format!("hidden_act `{other}` is not supported"))),
        };
        if json.patch_size == 0 || json.image_size < json.patch_size {
            return Err(bad(format!(
                "image_size {} and patch_size {} give no patch",
                json.image_size, json.patch_size
            )));
        }
        Ok(Self {
            hidden_size: json.hidden_size,
            intermediate_size: json.intermediate_size,
            num_layers: json.num_hidden_layers,
            num_heads: json.num_attention_heads,
            num_channels: json.num_channels,
            image_size: json.image_size,
            patch_size: json.patch_size,
            layer_norm_eps: json.layer_norm_eps,
            activation,
        })
    }

    /// Every tensor with the shape this configuration implies, in execution order.
    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, p) = (self.hidden_size, self.patch_size);
        let mut out = vec![
            (PATCH_WEIGHT.to_string(), vec![h, self.num_channels, p, p]),
            (PATCH_BIAS.to_string(), vec![h]),
            (POSITIONS.to_string(), vec![self.patches(), h]),
        ];
        for l in 0..self.num_layers {
            self.layer()
                .expected_shapes(&layer_stage(l), self.intermediate_size, &mut out);
        }
        out.push((format!("{POST_NORM}.weight"), vec![h]));
        out.push((format!("{POST_NORM}.bias"), vec![h]));
        out
    }

    /// Checks `store` holds exactly this tower: every tensor with its shape, no extra layers.
    pub fn check(&self, store: &TensorStore) -> Result<()> {
        if self.num_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_heads)
            || self.num_layers == 0
        {
            return Err(Error::Config(format!(
                "SigLIP config: width {} must split evenly into {} heads, over at least one layer (has {})",
                self.hidden_size, self.num_heads, self.num_layers
            )));
        }
        let hint = format!(
            " (SigLIP vision: width {}, MLP {}, {}px images in {}px patches)",
            self.hidden_size, self.intermediate_size, self.image_size, self.patch_size
        );
        for (key, shape) in self.expected_shapes() {
            store.expect_shape(&key, &shape, &hint)?;
        }
        let found = count_blocks(store, LAYERS);
        if found != self.num_layers {
            return Err(Error::Layout {
                path: store.origin().to_path_buf(),
                message: format!(
                    "the checkpoint has {found} SigLIP encoder layers, the configuration {}",
                    self.num_layers
                ),
            });
        }
        Ok(())
    }
}

/// transformers' `SiglipVisionConfig` fields and defaults.
#[derive(Deserialize)]
#[serde(default)]
struct SiglipJson {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_channels: usize,
    image_size: usize,
    patch_size: usize,
    hidden_act: String,
    layer_norm_eps: f64,
}

impl Default for SiglipJson {
    fn default() -> Self {
        Self {
            model_type: None,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 16,
            hidden_act: "gelu_pytorch_tanh".to_string(),
            layer_norm_eps: 1e-6,
        }
    }
}

fn layer_stage(i: usize) -> String {
    format!("{LAYERS}{i}")
}

pub struct SiglipVision {
    config: SiglipConfig,
}

impl SiglipVision {
    pub fn new(config: SiglipConfig) -> Self {
        Self { config }
    }

    pub fn config(&self) -> &SiglipConfig {
        &self.config
    }

    /// Embeddings, layers, final norm: the order `forward` asks for them. The embedding stage
    /// names its tables so that a stored `position_ids` buffer is not loaded.
    pub fn stages(&self) -> Vec<StageSpec> {
        let mut stages = vec![StageSpec::groups(
            "embeddings",
            &[
                "embeddings.patch_embedding",
                "embeddings.position_embedding",
            ],
        )];
        stages.extend((0..self.config.num_layers).map(|i| StageSpec::under(layer_stage(i))));
        stages.push(StageSpec::under(POST_NORM));
        stages
    }

    /// Pixels `[B, C, S, S]` (processed: see `pipeline::redux::siglip_pixels`) →
    /// `last_hidden_state` `[B, (S/P)², H]` in the weights' dtype.
    pub fn forward<T: Tensor, W: Weights<T>>(&self, w: &W, pixels: &T) -> Result<T> {
        let c = &self.config;
        let (_, ch, hgt, wid) = pixels.dims4()?;
        if ch != c.num_channels || hgt != c.image_size || wid != c.image_size {
            return Err(Error::InvalidRequest(format!(
                "SigLIP takes {}×{}×{} pixels, not {ch}×{hgt}×{wid}",
                c.num_channels, c.image_size, c.image_size
            )));
        }
        let pixels = pixels.to_dtype(w.dtype())?.to_device(w.device())?;
        let mut h = self.embed(&w.stage("embeddings")?, &pixels)?;
        let layer = c.layer();
        for i in 0..c.num_layers {
            h = layer.forward(&w.stage(&layer_stage(i))?, &h, None)?;
        }
        layer.norm(&w.stage(POST_NORM)?, "", &h)
    }

    /// The patch convolution (kernel = stride = P, no padding) as the matmul it is: each
    /// patch's C·P·P values in (c, y, x) order, the conv weight's own order, then the learned
    /// position of each patch. A matmul computes in any dtype on every backend. Like the
    /// convolution, it drops the pixels past the last whole patch (384 = 27·14 + 6).
    fn embed<T: Tensor, S: Stage<T>>(&self, s: &S, pixels: &T) -> Result<T> {
        let c = &self.config;
        let (b, ch, _, _) = pixels.dims4()?;
        let (p, n) = (c.patch_size, c.image_size / c.patch_size);
        let patches = pixels
            .narrow(2, 0, n * p)?
            .narrow(3, 0, n * p)?
            .reshape(&[b, ch, n, p, n, p])?
            .permute(&[0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .reshape(&[b, n * n, ch * p * p])?;
        let weight = s.get(PATCH_WEIGHT)?.reshape(&[c.hidden_size, ch * p * p])?;
        let x = ops::linear(&patches, &weight, Some(&s.get(PATCH_BIAS)?))?;
        x.broadcast_add(&s.get(POSITIONS)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn so400m_shapes_total_its_parameter_count() {
        // SiglipVisionModel(so400m-patch14-384) without its pooling head: 412,987,248 (transformers counts 428,225,600 with it).
        let params: usize = SiglipConfig::so400m_patch14_384()
            .expected_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(params, 412_987_248);
    }
}
