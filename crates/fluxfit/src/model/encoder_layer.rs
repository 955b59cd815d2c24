//! The pre-norm transformer layer that CLIP's text tower and SigLIP's vision tower share
//! (transformers' `CLIPEncoderLayer` and `SiglipEncoderLayer` have the same weights and the
//! same order): `h + attn(ln1(h))`, then `h + mlp(ln2(h))`, with biased q/k/v/out projections
//! and a two-layer MLP. The towers differ only in the activation, the norm's ε and the mask.
//!
//! Keys, relative to the layer's stage: `layer_norm{1,2}.{weight,bias}`,
//! `self_attn.{q,k,v,out}_proj.{weight,bias}`, `mlp.fc{1,2}.{weight,bias}`.

use candle_core::DType;

use crate::error::Result;
use crate::model::ops;
use crate::model::weights::Stage;
use crate::tensor::Tensor;

/// The MLP's activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x·σ(1.702·x)`: OpenAI's CLIP models (`quick_gelu`).
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP's larger towers (`gelu`).
    Gelu,
    /// The tanh approximation of GELU: SigLIP (`gelu_pytorch_tanh`).
    GeluTanh,
}

/// One layer's shape and rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderLayer {
    pub width: usize,
    pub heads: usize,
    pub activation: Activation,
    pub eps: f64,
}

impl EncoderLayer {
    /// Every tensor of one layer under `p` (`encoder.layers.3`) with its shape, in the order
    /// the layer uses them.
    pub fn expected_shapes(&self, p: &str, mlp: usize, out: &mut Vec<(String, Vec<usize>)>) {
        let h = self.width;
        let mut push = |name: String, rows: usize, cols: Option<usize>| {
            let weight = match cols {
                Some(c) => vec![rows, c],
                None => vec![rows],
            };
            out.push((format!("{name}.weight"), weight));
            out.push((format!("{name}.bias"), vec![rows]));
        };
        push(format!("{p}.layer_norm1"), h, None);
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            push(format!("{p}.self_attn.{proj}"), h, Some(h));
        }
        push(format!("{p}.layer_norm2"), h, None);
        push(format!("{p}.mlp.fc1"), mlp, Some(h));
        push(format!("{p}.mlp.fc2"), h, Some(mlp));
    }

    /// The layer over `h` `[B, L, width]`; `mask` is an additive f32 `[L, L]` (CLIP's causal
    /// mask) or none (SigLIP attends everywhere).
    pub fn forward<T: Tensor, S: Stage<T>>(&self, s: &S, h: &T, mask: Option<&T>) -> Result<T> {
        let x = self.norm(s, "layer_norm1.", h)?;
        let h = h.add(&self.self_attention(s, &x, mask)?)?;
        let x = self.norm(s, "layer_norm2.", &h)?;
        h.add(&self.mlp(s, &x)?)
    }

    /// A LayerNorm with weight and bias under `name` (`post_layernorm.` as well).
    pub fn norm<T: Tensor, S: Stage<T>>(&self, s: &S, name: &str, x: &T) -> Result<T> {
        let w = s.get(&format!("{name}weight"))?;
        let b = s.get(&format!("{name}bias"))?;
        ops::layer_norm(x, &w, &b, self.eps)
    }

    /// softmax(q·kᵀ/√d + mask)·v per head; scores in the compute dtype, softmax in f32 (as
    /// transformers' eager attention does). Each projection takes its LoRA term, if any.
    fn self_attention<T: Tensor, S: Stage<T>>(&self, s: &S, x: &T, mask: Option<&T>) -> Result<T> {
        let (b, l, h) = x.dims3()?;
        let q = self.split_heads(&s.linear("self_attn.q_proj", x)?)?;
        let k = self.split_heads(&s.linear("self_attn.k_proj", x)?)?;
        let v = self.split_heads(&s.linear("self_attn.v_proj", x)?)?;
        let scale = 1.0 / ((self.width / self.heads) as f64).sqrt();
        let scores = q.matmul(&k.t()?.contiguous()?)?.affine(scale, 0.0)?;
        let scores = scores.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = scores.softmax_last_dim()?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape(&[b, l, h])?;
        s.linear("self_attn.out_proj", &out)
    }

    /// `[B, L, H]` → `[B, heads, L, head_dim]`.
    fn split_heads<T: Tensor>(&self, x: &T) -> Result<T> {
        let (b, l, _) = x.dims3()?;
        let (n, d) = (self.heads, self.width / self.heads);
        x.reshape(&[b, l, n, d])?.transpose(1, 2)?.contiguous()
    }

    fn mlp<T: Tensor, S: Stage<T>>(&self, s: &S, x: &T) -> Result<T> {
        let x = s.linear("mlp.fc1", x)?;
        let x = match self.activation {
            Activation::QuickGelu => quick_gelu(&x)?,
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluTanh => ops::gelu_tanh(&x)?,
        };
        s.linear("mlp.fc2", &x)
    }
}

/// `x·σ(1.702·x)`, the sigmoid approximation of GELU that OpenAI's CLIP was trained with.
fn quick_gelu<T: Tensor>(x: &T) -> Result<T> {
    x.mul(&x.affine(1.702, 0.0)?.sigmoid()?)
}
