//! The T5 v1.1 encoder (transformers' `T5EncoderModel`), which turns the prompt into FLUX's `txt`.
//!
//! Numerics follow transformers rather than the paper where the two differ: RMS norm in f32 then
//! cast to the weight dtype, no 1/√d score scaling (folded into the initialisation), one relative
//! position bias computed by block 0 and reused by every block, and no padding mask (the FLUX
//! reference passes none, so pad tokens are attended to).

use std::path::Path;

use candle_core::{DType, D};
use serde::Deserialize;

use crate::checkpoint::store::TensorStore;
use crate::error::{Error, Result};
use crate::model::ops;
use crate::model::weights::{Stage, StageSpec, Weights};
use crate::tensor::Tensor;

#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    /// Width of one attention head.
    pub d_kv: usize,
    pub num_heads: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    /// `feed_forward_proj = "gated-gelu"` (v1.1: `wo(gelu_new(wi_0·x) ⊙ wi_1·x)`); otherwise the
    /// original T5's `"relu"` (`wo(relu(wi·x))`).
    pub gated: bool,
}

/// Key of the token embedding; some exports name it `encoder.embed_tokens.weight` instead (tied).
const SHARED: &str = "shared.weight";
const EMBED_TOKENS: &str = "encoder.embed_tokens.weight";
const REL_BIAS: &str = "layer.0.SelfAttention.relative_attention_bias.weight";

impl T5Config {
    /// google/t5-v1_1-xxl, the FLUX text encoder.
    pub fn xxl() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 4096,
            d_kv: 64,
            num_heads: 64,
            d_ff: 10240,
            num_layers: 24,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            gated: true,
        }
    }

    fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }

    /// The configuration of the checkpoint in `store`: from `config_json` when given, else from the
    /// tensor shapes (with transformers' defaults for what shapes do not record: max distance 128,
    /// ε 1e-6). Either way every encoder tensor is then checked against it, so a mismatch is
    /// reported here, naming the key, rather than as a matmul error mid-run.
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
        let embed = embedding_key(store)?;
        let [vocab_size, d_model] = dims::<2>(store, embed)?;
        let [relative_attention_num_buckets, num_heads] =
            dims::<2>(store, &format!("{}.{REL_BIAS}", block_stage(0)))?;
        let q_key = format!("{}.layer.0.SelfAttention.q.weight", block_stage(0));
        let [inner, _] = dims::<2>(store, &q_key)?;
        if num_heads == 0 || inner % num_heads != 0 {
            return Err(Error::WrongShape {
                path: store.origin().to_path_buf(),
                found: store.shape(&q_key)?.into(),
                key: q_key,
                expected: vec![num_heads * (inner / num_heads.max(1)).max(1), d_model].into(),
                hint: format!(
                    " (the relative attention bias has {num_heads} heads; q's rows must be a multiple)"
                ),
            });
        }
        let ff = format!("{}.layer.1.DenseReluDense", block_stage(0));
        let gated = store.contains(&format!("{ff}.wi_0.weight"));
        let wi = if gated { "wi_0" } else { "wi" };
        let [d_ff, _] = dims::<2>(store, &format!("{ff}.{wi}.weight"))?;
        Ok(Self {
            vocab_size,
            d_model,
            d_kv: inner / num_heads,
            num_heads,
            d_ff,
            num_layers: count_blocks(store, "encoder.block."),
            relative_attention_num_buckets,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            gated,
        })
    }

    /// Reads an HF `config.json`, with transformers' `T5Config` defaults for absent fields.
    pub fn from_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: T5Json = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: not a T5 config.json: {e}", path.display())))?;
        if let Some(t) = json.model_type.as_deref().filter(|t| *t != "t5") {
            return Err(Error::Config(format!(
                "{}: model_type is `{t}`, expected `t5`",
                path.display()
            )));
        }
        let gated = match json.feed_forward_proj.as_str() {
            "gated-gelu" => true,
            "relu" => false,
            other => {
                return Err(Error::Config(format!(
                    "{}: feed_forward_proj `{other}` is not supported (T5 v1.1 uses `gated-gelu`, the original T5 `relu`)",
                    path.display()
                )))
            }
        };
        Ok(Self {
            vocab_size: json.vocab_size,
            d_model: json.d_model,
            d_kv: json.d_kv,
            num_heads: json.num_heads,
            d_ff: json.d_ff,
            num_layers: json.num_layers,
            relative_attention_num_buckets: json.relative_attention_num_buckets,
            relative_attention_max_distance: json.relative_attention_max_distance,
            layer_norm_epsilon: json.layer_norm_epsilon,
            gated,
        })
    }

    /// Every encoder tensor with the shape this configuration implies, in execution order.
    /// The token embedding is listed under `shared.weight`; [`Self::check`] accepts either name.
    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, inner, ff) = (self.d_model, self.inner_dim(), self.d_ff);
        let mut out = vec![(SHARED.to_string(), vec![self.vocab_size, d])];
        for i in 0..self.num_layers {
            let b = block_stage(i);
            let attn = format!("{b}.layer.0.SelfAttention");
            for p in ["q", "k", "v"] {
                out.push((format!("{attn}.{p}.weight"), vec![inner, d]));
            }
            out.push((format!("{attn}.o.weight"), vec![d, inner]));
            if i == 0 {
                out.push((
                    format!("{b}.{REL_BIAS}"),
                    vec![self.relative_attention_num_buckets, self.num_heads],
                ));
            }
            out.push((format!("{b}.layer.0.layer_norm.weight"), vec![d]));
            let dense = format!("{b}.layer.1.DenseReluDense");
            let wi: &[&str] = if self.gated {
                &["wi_0", "wi_1"]
            } else {
                &["wi"]
            };
            for w in wi {
                out.push((format!("{dense}.{w}.weight"), vec![ff, d]));
            }
            out.push((format!("{dense}.wo.weight"), vec![d, ff]));
            out.push((format!("{b}.layer.1.layer_norm.weight"), vec![d]));
        }
        out.push(("encoder.final_layer_norm.weight".to_string(), vec![d]));
        out
    }

    /// Checks `store` holds exactly this encoder: every tensor present with its shape, no extra blocks.
    pub fn check(&self, store: &TensorStore) -> Result<()> {
        if self.num_heads == 0 || self.num_layers == 0 {
            return Err(Error::Config(format!(
                "T5 config has {} heads and {} layers; both must be positive",
                self.num_heads, self.num_layers
            )));
        }
        let hint = format!(
            " (T5 encoder: d_model {}, {} heads × d_kv {}, d_ff {}, vocab {})",
            self.d_model, self.num_heads, self.d_kv, self.d_ff, self.vocab_size
        );
        for (key, shape) in self.expected_shapes() {
            if key == SHARED {
                let present: Vec<&str> = [SHARED, EMBED_TOKENS]
                    .into_iter()
                    .filter(|k| store.contains(k))
                    .collect();
                if present.is_empty() {
                    return Err(missing_embedding(store));
                }
                for k in present {
                    store.expect_shape(k, &shape, &hint)?;
                }
            } else {
                store.expect_shape(&key, &shape, &hint)?;
            }
        }
        let found = count_blocks(store, "encoder.block.");
        if found != self.num_layers {
            return Err(Error::Layout {
                path: store.origin().to_path_buf(),
                message: format!(
                    "the checkpoint has {found} T5 encoder blocks, the configuration {}",
                    self.num_layers
                ),
            });
        }
        Ok(())
    }
}

/// transformers' `T5Config` fields and defaults (only those the encoder uses).
#[derive(Deserialize)]
#[serde(default)]
struct T5Json {
    model_type: Option<String>,
    vocab_size: usize,
    d_model: usize,
    d_kv: usize,
    d_ff: usize,
    num_layers: usize,
    num_heads: usize,
    relative_attention_num_buckets: usize,
    relative_attention_max_distance: usize,
    layer_norm_epsilon: f64,
    feed_forward_proj: String,
}

impl Default for T5Json {
    fn default() -> Self {
        Self {
            model_type: None,
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".to_string(),
        }
    }
}

fn block_stage(i: usize) -> String {
    format!("encoder.block.{i}")
}

fn embedding_key(store: &TensorStore) -> Result<&'static str> {
    [SHARED, EMBED_TOKENS]
        .into_iter()
        .find(|k| store.contains(k))
        .ok_or_else(|| missing_embedding(store))
}

fn missing_embedding(store: &TensorStore) -> Error {
    Error::MissingKey {
        path: store.origin().to_path_buf(),
        key: SHARED.to_string(),
        hint: format!(" (nor `{EMBED_TOKENS}`): is this a T5 encoder checkpoint?"),
    }
}

/// The shape of `key`, which must have rank `N`.
pub(crate) fn dims<const N: usize>(store: &TensorStore, key: &str) -> Result<[usize; N]> {
    let shape = store.shape(key)?;
    shape.try_into().map_err(|_| Error::WrongRank {
        path: store.origin().to_path_buf(),
        key: key.to_string(),
        rank: N,
        found: shape.into(),
    })
}

/// The rule every encoder's configuration follows: read from `config_json` when the folder
/// has one, else from the tensor shapes; either way every tensor is then checked against it, so
/// a mismatch is reported at load, naming the key, rather than as a matmul error mid-run.
pub(crate) fn from_store_with<C>(
    store: &TensorStore,
    config_json: Option<&Path>,
    from_json: impl FnOnce(&Path) -> Result<C>,
    from_shapes: impl FnOnce(&TensorStore) -> Result<C>,
    check: impl FnOnce(&C, &TensorStore) -> Result<()>,
) -> Result<C> {
    let config = match config_json {
        Some(path) => from_json(path)?,
        None => from_shapes(store)?,
    };
    check(&config, store)?;
    Ok(config)
}

/// Number of consecutive blocks `prefix0.`, `prefix1.`, ... present in `store`.
pub(crate) fn count_blocks(store: &TensorStore, prefix: &str) -> usize {
    let indices: std::collections::BTreeSet<usize> = store
        .keys_with_prefix(prefix)
        .filter_map(|k| k[prefix.len()..].split('.').next()?.parse().ok())
        .collect();
    indices.last().map_or(0, |&n| n + 1)
}

/// Token ids `[B, L]` (u32 or i64) read back to the host and checked against the vocabulary, so
/// a bad id is an error, not an out-of-bounds gather.
pub fn token_rows(input_ids: &candle_core::Tensor, vocab_size: usize) -> Result<Vec<Vec<u32>>> {
    let rows: Vec<Vec<i64>> = match input_ids.dtype() {
        DType::U32 => input_ids
            .to_vec2::<u32>()?
            .into_iter()
            .map(|r| r.into_iter().map(i64::from).collect())
            .collect(),
        DType::I64 => input_ids.to_vec2::<i64>()?,
        other => {
            return Err(Error::InvalidRequest(format!(
                "token ids must be u32 or i64, got {other:?}"
            )))
        }
    };
    rows.into_iter()
        .map(|row| {
            row.into_iter()
                .map(|id| match u32::try_from(id) {
                    Ok(v) if (v as usize) < vocab_size => Ok(v),
                    _ => Err(Error::InvalidRequest(format!(
                        "token id {id} is outside the text encoder's vocabulary of {vocab_size}"
                    ))),
                })
                .collect()
        })
        .collect()
}

/// Refuses ids outside the vocabulary: an error, not an out-of-bounds gather.
pub(crate) fn check_rows(rows: &[Vec<u32>], vocab_size: usize) -> Result<()> {
    match rows.iter().flatten().find(|&&id| id as usize >= vocab_size) {
        Some(id) => Err(Error::InvalidRequest(format!(
            "token id {id} is outside the text encoder's vocabulary of {vocab_size}"
        ))),
        None => Ok(()),
    }
}

/// The `[B, L]` id tensor of `rows` on `device`.
pub(crate) fn ids_tensor<T: Tensor>(rows: &[Vec<u32>], device: &T::Device) -> Result<T> {
    let len = rows.first().map_or(0, Vec::len);
    T::from_u32(&[rows.len(), len], device, || rows.concat())
}

/// Mesh-TensorFlow's bucketing of a relative position `key − query`: exact buckets for the
/// nearest half, logarithmic ones up to `max_distance`, one bucket beyond. Bidirectional (the
/// encoder) spends half the buckets on each sign.
///
/// The logarithm is taken in f32 like the reference's float tensors: at the bin edges
/// (`|rel| = 16, 32, 64` with the defaults) the truncation depends on that rounding.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut num_buckets = num_buckets as i64;
    let mut bucket = 0;
    let distance = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            bucket += num_buckets;
        }
        relative_position.abs()
    } else {
        (-relative_position).max(0)
    };
    let max_exact = num_buckets / 2;
    if distance < max_exact {
        return (bucket + distance) as usize;
    }
    let log_ratio = (distance as f32 / max_exact as f32).ln()
        / (max_distance as f64 / max_exact as f64).ln() as f32;
    let large = max_exact + (log_ratio * (num_buckets - max_exact) as f32) as i64;
    (bucket + large.min(num_buckets - 1)) as usize
}

/// T5's layer norm: RMS only (no mean, no bias), accumulated in f32, cast to the weight's dtype.
fn t5_layer_norm<T: Tensor>(x: &T, weight: &T, eps: f64) -> Result<T> {
    let xf = x.to_dtype(DType::F32)?;
    let variance = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_mul(&variance.affine(1.0, eps)?.sqrt()?.recip()?)?;
    y.to_dtype(weight.dtype())?.broadcast_mul(weight)
}

/// `a + b` with PyTorch's promotion: the residual stream becomes f32 once an f32 term joins it.
fn residual_add<T: Tensor>(a: &T, b: &T) -> Result<T> {
    if a.dtype() == b.dtype() {
        a.add(b)
    } else {
        a.to_dtype(DType::F32)?.add(&b.to_dtype(DType::F32)?)
    }
}

/// transformers clamps f16 hidden states after each sublayer so that an overflow to ±∞ becomes
/// a large finite value instead of NaNs downstream.
fn clamp_f16<T: Tensor>(h: T) -> Result<T> {
    if h.dtype() != DType::F16 {
        return Ok(h);
    }
    let max = f64::from(half::f16::MAX);
    let peak = h.max_abs()?;
    let limit = if peak.is_infinite() {
        max - 1000.0
    } else {
        max
    };
    h.clamp(-limit, limit)
}

pub struct T5Encoder {
    config: T5Config,
}

impl T5Encoder {
    pub fn new(config: T5Config) -> Self {
        Self { config }
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// Embedding, blocks, final norm: the order `forward` asks for them.
    pub fn stages(&self) -> Vec<StageSpec> {
        let mut stages = vec![StageSpec::groups(
            "shared",
            &["shared", "encoder.embed_tokens"],
        )];
        stages.extend((0..self.config.num_layers).map(|i| StageSpec::under(block_stage(i))));
        stages.push(StageSpec::under("encoder.final_layer_norm"));
        stages
    }

    /// Token rows `[B][L]` → `last_hidden_state` `[B, L, d_model]` in the weights' dtype.
    pub fn forward<T: Tensor, W: Weights<T>>(&self, w: &W, rows: &[Vec<u32>]) -> Result<T> {
        check_rows(rows, self.config.vocab_size)?;
        let ids: T = ids_tensor(rows, w.device())?;
        let len = ids.dim(1)?;
        let mut h = self.embed(&w.stage("shared")?, &ids)?;
        let mut bias = None;
        for i in 0..self.config.num_layers {
            let block = w.stage(&block_stage(i))?;
            let bias = match &bias {
                Some(b) => b,
                None => bias.insert(self.position_bias(&block, len)?),
            };
            h = self.block(&block, h, bias)?;
        }
        let norm = w.stage("encoder.final_layer_norm")?;
        t5_layer_norm(&h, &norm.get("weight")?, self.config.layer_norm_epsilon)
    }

    /// [`Self::forward`] for an id tensor `[B, L]` (u32 or i64).
    pub fn forward_ids<W: Weights<candle_core::Tensor>>(
        &self,
        w: &W,
        input_ids: &candle_core::Tensor,
    ) -> Result<candle_core::Tensor> {
        self.forward(w, &token_rows(input_ids, self.config.vocab_size)?)
    }

    fn embed<T: Tensor, S: Stage<T>>(&self, stage: &S, ids: &T) -> Result<T> {
        let table = match stage.get_opt(SHARED) {
            Some(t) => t,
            None => stage.get(EMBED_TOKENS)?,
        };
        let (b, l) = ids.dims2()?;
        table
            .index_select(&ids.flatten_all()?, 0)?
            .reshape(&[b, l, self.config.d_model])
    }

    /// The additive score bias `[1, H, L, L]`, looked up by bucket in block 0's table.
    fn position_bias<T: Tensor, S: Stage<T>>(&self, block0: &S, len: usize) -> Result<T> {
        let c = &self.config;
        let table = block0.get(REL_BIAS)?;
        let buckets = T::from_u32(&[len * len], table.device(), || {
            (0..len as i64)
                .flat_map(|query| {
                    (0..len as i64).map(move |key| {
                        relative_position_bucket(
                            key - query,
                            true,
                            c.relative_attention_num_buckets,
                            c.relative_attention_max_distance,
                        ) as u32
                    })
                })
                .collect()
        })?;
        table
            .index_select(&buckets, 0)?
            .reshape(&[len, len, c.num_heads])?
            .permute(&[2, 0, 1])?
            .unsqueeze(0)?
            .contiguous()
    }

    /// Pre-norm self-attention then pre-norm feed-forward, each added to the residual stream.
    fn block<T: Tensor, S: Stage<T>>(&self, s: &S, h: T, bias: &T) -> Result<T> {
        let eps = self.config.layer_norm_epsilon;
        let x = t5_layer_norm(&h, &s.get("layer.0.layer_norm.weight")?, eps)?;
        let h = clamp_f16(residual_add(&h, &self.self_attention(s, &x, bias)?)?)?;
        let x = t5_layer_norm(&h, &s.get("layer.1.layer_norm.weight")?, eps)?;
        clamp_f16(residual_add(&h, &self.feed_forward(s, &x)?)?)
    }

    /// softmax(q·kᵀ + bias)·v per head, without the 1/√d_kv of the usual formulation.
    fn self_attention<T: Tensor, S: Stage<T>>(&self, s: &S, x: &T, bias: &T) -> Result<T> {
        let (b, l, _) = x.dims3()?;
        let attn = "layer.0.SelfAttention";
        let q = self.split_heads(&s.linear(&format!("{attn}.q"), x)?)?;
        let k = self.split_heads(&s.linear(&format!("{attn}.k"), x)?)?;
        let v = self.split_heads(&s.linear(&format!("{attn}.v"), x)?)?;
        let scores = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(bias)?;
        let probs = scores
            .to_dtype(DType::F32)?
            .softmax_last_dim()?
            .to_dtype(v.dtype())?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape(&[b, l, self.config.inner_dim()])?;
        s.linear(&format!("{attn}.o"), &out)
    }

    /// `[B, L, H·D]` → `[B, H, L, D]`.
    fn split_heads<T: Tensor>(&self, x: &T) -> Result<T> {
        let (b, l, _) = x.dims3()?;
        let (h, d) = (self.config.num_heads, self.config.d_kv);
        x.reshape(&[b, l, h, d])?.transpose(1, 2)?.contiguous()
    }

    /// Gated-GELU (v1.1) or ReLU feed-forward.
    ///
    /// transformers keeps `wo` in f32 when the model runs in f16 (`_keep_in_fp32_modules`), since
    /// T5 v1.1's activations overflow f16 there; we do the same, which (by promotion) also
    /// moves the residual stream to f32 from the first block on.
    fn feed_forward<T: Tensor, S: Stage<T>>(&self, s: &S, x: &T) -> Result<T> {
        let dense = "layer.1.DenseReluDense";
        let hidden = if self.config.gated {
            let gate = ops::gelu_tanh(&s.linear(&format!("{dense}.wi_0"), x)?)?;
            let up = s.linear(&format!("{dense}.wi_1"), x)?;
            gate.mul(&up)?
        } else {
            s.linear(&format!("{dense}.wi"), x)?.relu()?
        };
        let wo_name = format!("{dense}.wo");
        if s.quantized(&format!("{wo_name}.weight")).is_some() {
            return s.linear(&wo_name, &hidden);
        }
        let wo = s.get(&format!("{wo_name}.weight"))?;
        if wo.dtype() != DType::F16 {
            return s.linear(&wo_name, &hidden);
        }
        let f32 = |t: &T| t.to_dtype(DType::F32);
        let hidden = f32(&hidden)?;
        let y = ops::linear(&hidden, &f32(&wo)?, None)?;
        // A LoRA term on `wo`, in f32 like the weight.
        match s.get_opt(&format!("{wo_name}.lora_A.weight")) {
            None => Ok(y),
            Some(a) => {
                let up = f32(&s.get(&format!("{wo_name}.lora_B.weight"))?)?;
                y.add(&ops::linear(
                    &ops::linear(&hidden, &f32(&a)?, None)?,
                    &up,
                    None,
                )?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-computed with the defaults (32 buckets, max distance 128, bidirectional):
    /// 16 buckets per sign, 8 exact, then 8 + ⌊ln(n/8)/ln(16)·8⌋ capped at 15; positive (key
    /// after query) offset by 16.
    #[test]
    fn relative_position_buckets() {
        let bucket = |rel| relative_position_bucket(rel, true, 32, 128);
        let cases = [
            (0, 0),
            (-1, 1),
            (1, 17),
            (-7, 7),
            (7, 23),
            (-8, 8),   // ⌊ln 1⌋ = 0
            (-11, 8),  // ln(11/8)/ln16·8 = 0.92
            (-12, 9),  // ln(1.5)/ln16·8 = 1.17
            (-16, 10), // exactly 2: the f32 rounding edge
            (16, 26),
            (-32, 12),
            (-63, 13),  // 5.95
            (-64, 14),  // exactly 6
            (-90, 14),  // 6.98
            (-91, 15),  // 7.02
            (-127, 15), // 7.98, and the cap
            (-128, 15),
            (-1000, 15),
            (1000, 31),
        ];
        for (rel, want) in cases {
            assert_eq!(bucket(rel), want, "relative position {rel}");
        }
        // Unidirectional (a decoder): only the past has buckets.
        assert_eq!(relative_position_bucket(5, false, 32, 128), 0);
        assert_eq!(relative_position_bucket(-5, false, 32, 128), 5);
        assert_eq!(relative_position_bucket(-32, false, 32, 128), 21); // 16 + ⌊ln 2/ln 8·16⌋
    }

    #[test]
    fn xxl_shapes_total_its_parameter_count() {
        let params: usize = T5Config::xxl()
            .expected_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(params, 4_762_310_656);
    }
}
