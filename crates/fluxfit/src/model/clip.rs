//! The CLIP text tower (transformers' `CLIPTextModel`, no projection), which gives FLUX its
//! pooled `vec`: the final-norm hidden state at the end-of-text token.
//!
//! Pre-norm transformer with learned absolute positions and a causal mask; no padding mask (the
//! reference passes none, and causality already keeps pads from reaching earlier tokens).

use std::path::Path;

use serde::Deserialize;

use super::t5::{check_rows, count_blocks, dims, from_store_with, ids_tensor, token_rows};
use crate::checkpoint::store::TensorStore;
use crate::error::{Error, Result};
use crate::model::encoder_layer::EncoderLayer;
use crate::model::weights::{Stage, StageSpec, Weights};
use crate::tensor::Tensor;

/// The MLP's activation (`hidden_act`): `QuickGelu` for OpenAI's CLIP models, `Gelu` (erf) for
/// OpenCLIP's larger towers.
pub use super::encoder_layer::Activation as ClipActivation;

#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub max_position_embeddings: usize,
    pub activation: ClipActivation,
    pub layer_norm_eps: f64,
    /// 2 in configs written before transformers PR #24773 (the real CLIP-L's): pooling then takes
    /// the position of the largest id, which is where the tokenizer puts end-of-text.
    pub eos_token_id: u32,
}

/// Every published CLIP text tower uses 64-wide heads; shapes alone do not record the count.
const HEAD_DIM: usize = 64;
/// The argmax pooling rule's marker value (see [`ClipConfig::eos_token_id`]).
const LEGACY_EOS: u32 = 2;

const TOKEN_EMBEDDING: &str = "embeddings.token_embedding.weight";
const POSITION_EMBEDDING: &str = "embeddings.position_embedding.weight";

impl ClipConfig {
    /// openai/clip-vit-large-patch14's text tower, FLUX's CLIP-L.
    pub fn vit_l_14() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_layers: 12,
            num_heads: 12,
            max_position_embeddings: 77,
            activation: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: LEGACY_EOS,
        }
    }

    /// The shared pre-norm layer with CLIP's choices (causal mask given at run time).
    fn layer(&self) -> EncoderLayer {
        EncoderLayer {
            width: self.hidden_size,
            heads: self.num_heads,
            activation: self.activation,
            eps: self.layer_norm_eps,
        }
    }

    /// The configuration of the checkpoint in `store` (canonical keys: no `text_model.` prefix):
    /// from `config_json` when given, else from the shapes with CLIP-L's choices for what they do
    /// not record (64-wide heads, quick GELU, ε 1e-5, argmax pooling). Every tensor is then
    /// checked against it, naming the key at fault.
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
        let [vocab_size, hidden_size] = dims::<2>(store, TOKEN_EMBEDDING)?;
        let [max_position_embeddings, _] = dims::<2>(store, POSITION_EMBEDDING)?;
        let [intermediate_size, _] = dims::<2>(store, "encoder.layers.0.mlp.fc1.weight")?;
        if hidden_size % HEAD_DIM != 0 {
            return Err(Error::Config(format!(
                "{}: CLIP width {hidden_size} is not a multiple of {HEAD_DIM}, so the number of \
                 attention heads cannot be inferred from the shapes; pass the model's config.json",
                store.origin().display()
            )));
        }
        Ok(Self {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers: count_blocks(store, "encoder.layers."),
            num_heads: hidden_size / HEAD_DIM,
            max_position_embeddings,
            activation: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: LEGACY_EOS,
        })
    }

    /// Reads an HF `config.json`: a `CLIPTextConfig`, or a full `CLIPConfig` whose `text_config`
    /// is used; transformers' defaults fill absent fields.
    pub fn from_json(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Config(format!("{}: {msg}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a CLIP config.json: {e}")))?;
        if let Some(inner) = value.get_mut("text_config").map(serde_json::Value::take) {
            value = inner;
        }
        let json: ClipJson = serde_json::from_value(value)
            .map_err(|e| bad(format!("not a CLIP text config: {e}")))?;
        if let Some(t) = json
            .model_type
            .as_deref()
            .filter(|t| !matches!(*t, "clip_text_model" | "clip"))
        {
            return Err(bad(format!(
                "model_type is `{t}`, expected `clip_text_model`"
            )));
        }
        let activation = match json.hidden_act.as_str() {
            "quick_gelu" => ClipActivation::QuickGelu,
            "gelu" => ClipActivation::Gelu,
            other => {
                return Err(bad(format!(
                    "hidden_act `{other}` is not supported (CLIP uses `quick_gelu` or `gelu`)"
                )))
            }
        };
        Ok(Self {
            vocab_size: json.vocab_size,
            hidden_size: json.hidden_size,
            intermediate_size: json.intermediate_size,
            num_layers: json.num_hidden_layers,
            num_heads: json.num_attention_heads,
            max_position_embeddings: json.max_position_embeddings,
            activation,
            layer_norm_eps: json.layer_norm_eps,
            eos_token_id: json.eos_token_id,
        })
    }

    /// Every tensor with the shape this configuration implies, in execution order.
    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let mut out = vec![
            (TOKEN_EMBEDDING.to_string(), vec![self.vocab_size, h]),
            (
                POSITION_EMBEDDING.to_string(),
                vec![self.max_position_embeddings, h],
            ),
        ];
        let norm = |out: &mut Vec<_>, name: &str| {
            out.push((format!("{name}.weight"), vec![h]));
            out.push((format!("{name}.bias"), vec![h]));
        };
        for l in 0..self.num_layers {
            self.layer().expected_shapes(&layer_stage(l), i, &mut out);
        }
        norm(&mut out, "final_layer_norm");
        out
    }

    /// Checks `store` holds exactly this text tower: every tensor with its shape, no extra layers.
    pub fn check(&self, store: &TensorStore) -> Result<()> {
        if self.num_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_heads)
            || self.num_layers == 0
        {
            return Err(Error::Config(format!(
                "CLIP config: width {} must split evenly into {} heads, over at least one layer (has {})",
                self.hidden_size, self.num_heads, self.num_layers
            )));
        }
        let hint = format!(
            " (CLIP text: width {}, MLP {}, vocab {}, {} positions)",
            self.hidden_size, self.intermediate_size, self.vocab_size, self.max_position_embeddings
        );
        for (key, shape) in self.expected_shapes() {
            store.expect_shape(&key, &shape, &hint)?;
        }
        let found = count_blocks(store, "encoder.layers.");
        if found != self.num_layers {
            return Err(Error::Layout {
                path: store.origin().to_path_buf(),
                message: format!(
                    "the checkpoint has {found} CLIP encoder layers, the configuration {}",
                    self.num_layers
                ),
            });
        }
        Ok(())
    }
}

/// transformers' `CLIPTextConfig` fields and defaults (those the text tower uses).
#[derive(Deserialize)]
#[serde(default)]
struct ClipJson {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    hidden_act: String,
    layer_norm_eps: f64,
    eos_token_id: u32,
}

impl Default for ClipJson {
    fn default() -> Self {
        Self {
            model_type: None,
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".to_string(),
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}

fn layer_stage(i: usize) -> String {
    format!("encoder.layers.{i}")
}

/// Where each row's end-of-text token is, the position whose hidden state is pooled.
/// Ties take the first position, as `torch.argmax` does.
pub fn eos_positions(rows: &[Vec<u32>], eos_token_id: u32) -> Vec<usize> {
    let first_max = |row: &[u32], key: &dyn Fn(u32) -> u32| {
        let best = row.iter().map(|&id| key(id)).max().unwrap_or(0);
        row.iter().position(|&id| key(id) == best).unwrap_or(0)
    };
    rows.iter()
        .map(|row| {
            if eos_token_id == LEGACY_EOS {
                first_max(row, &|id| id)
            } else {
                first_max(row, &|id| u32::from(id == eos_token_id))
            }
        })
        .collect()
}

/// Additive causal mask `[L, L]` in f32: 0 on and below the diagonal, −∞ above.
fn causal_mask<T: Tensor>(len: usize, device: &T::Device) -> Result<T> {
    T::from_f32(&[len, len], device, || {
        (0..len)
            .flat_map(|q| (0..len).map(move |k| if k > q { f32::NEG_INFINITY } else { 0.0 }))
            .collect()
    })
}

pub struct ClipTextModel {
    config: ClipConfig,
}

impl ClipTextModel {
    pub fn new(config: ClipConfig) -> Self {
        Self { config }
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// Embeddings, layers, final norm: the order `forward` asks for them. The embedding stage
    /// names its two tables so that a stored `position_ids` buffer is not loaded.
    pub fn stages(&self) -> Vec<StageSpec> {
        let mut stages = vec![StageSpec::groups(
            "embeddings",
            &[
                "embeddings.token_embedding",
                "embeddings.position_embedding",
            ],
        )];
        stages.extend((0..self.config.num_layers).map(|i| StageSpec::under(layer_stage(i))));
        stages.push(StageSpec::under("final_layer_norm"));
        stages
    }

    /// Token rows `[B][L]` → (`last_hidden_state` `[B, L, H]`, `pooler_output` `[B, H]`), in
    /// the weights' dtype.
    pub fn forward<T: Tensor, W: Weights<T>>(&self, w: &W, rows: &[Vec<u32>]) -> Result<(T, T)> {
        let c = &self.config;
        check_rows(rows, c.vocab_size)?;
        let ids: T = ids_tensor(rows, w.device())?;
        let len = ids.dim(1)?;
        if len > c.max_position_embeddings {
            return Err(Error::InvalidRequest(format!(
                "{len} CLIP tokens exceed its {} positions",
                c.max_position_embeddings
            )));
        }
        let mut h = self.embed(&w.stage("embeddings")?, &ids)?;
        let mask: T = causal_mask(len, w.device())?;
        let layer = c.layer();
        for i in 0..c.num_layers {
            h = layer.forward(&w.stage(&layer_stage(i))?, &h, Some(&mask))?;
        }
        let last = layer.norm(&w.stage("final_layer_norm")?, "", &h)?;
        let pooled = pool(&last, &eos_positions(rows, c.eos_token_id))?;
        Ok((last, pooled))
    }

    /// [`Self::forward`] for an id tensor `[B, L]` (u32 or i64).
    pub fn forward_ids<W: Weights<candle_core::Tensor>>(
        &self,
        w: &W,
        input_ids: &candle_core::Tensor,
    ) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
        self.forward(w, &token_rows(input_ids, self.config.vocab_size)?)
    }

    /// Token embedding plus the learned embedding of positions 0..L.
    fn embed<T: Tensor, S: Stage<T>>(&self, stage: &S, ids: &T) -> Result<T> {
        let (b, l) = ids.dims2()?;
        let tokens = stage
            .get(TOKEN_EMBEDDING)?
            .index_select(&ids.flatten_all()?, 0)?
            .reshape(&[b, l, self.config.hidden_size])?;
        let positions = stage.get(POSITION_EMBEDDING)?.narrow(0, 0, l)?;
        tokens.broadcast_add(&positions)
    }
}

/// Row `positions[b]` of each batch element of `hidden` `[B, L, H]` → `[B, H]`.
fn pool<T: Tensor>(hidden: &T, positions: &[usize]) -> Result<T> {
    let (b, l, h) = hidden.dims3()?;
    let index = T::from_u32(&[b], hidden.device(), || {
        positions
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * l + p) as u32)
            .collect()
    })?;
    hidden.reshape(&[b * l, h])?.index_select(&index, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_position_follows_the_eos_rule() {
        // BOS 49406, text, EOS 49407 padded with EOS (the CLIP-L tokenizer pads with EOS).
        let rows = vec![
            vec![49406, 320, 1125, 49407, 49407, 49407],
            vec![49406, 49407, 0, 0, 0, 0],
        ];
        assert_eq!(eos_positions(&rows, LEGACY_EOS), vec![3, 1]);
        assert_eq!(eos_positions(&rows, 49407), vec![3, 1]);
        // Argmax of the ids differs from the first EOS once an added token outranks it.
        let added = vec![vec![49406, 49410, 49407, 0]];
        assert_eq!(eos_positions(&added, LEGACY_EOS), vec![1]);
        assert_eq!(eos_positions(&added, 49407), vec![2]);
        // No EOS at all: torch's argmax over all-false picks position 0.
        assert_eq!(eos_positions(&[vec![5, 6, 7]], 49407), vec![0]);
    }

    #[test]
    fn vit_l_14_shapes_total_its_parameter_count() {
        let params: usize = ClipConfig::vit_l_14()
            .expected_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(params, 123_060_480);
    }
}
