//! Small numeric building blocks shared by the networks, with the reference's precision rules.

use candle_core::{DType, D};

use crate::error::Result;
use crate::tensor::Tensor;

/// `x·wᵀ + b` for a PyTorch-layout weight `[out, in]` and any number of leading dims.
pub fn linear<T: Tensor>(x: &T, w: &T, b: Option<&T>) -> Result<T> {
    let dims = x.dims().to_vec();
    let in_dim = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape(&[rows, in_dim])?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = w.dim(0)?;
    y.reshape(&out)
}

/// LayerNorm over the last dim without affine parameters (the flow model's `elementwise_affine=False`).
pub fn layer_norm_plain<T: Tensor>(x: &T, eps: f64) -> Result<T> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centred = xf.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centred.broadcast_div(&var.affine(1.0, eps)?.sqrt()?)?;
    y.to_dtype(dtype)
}

/// LayerNorm with weight and bias (CLIP).
/// The affine part is applied in f32 before rounding back, as torch's fused kernel does.
pub fn layer_norm<T: Tensor>(x: &T, w: &T, b: &T, eps: f64) -> Result<T> {
    let y = layer_norm_plain(&x.to_dtype(DType::F32)?, eps)?;
    let w = w.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    y.broadcast_mul(&w)?.broadcast_add(&b)?.to_dtype(x.dtype())
}

/// RMSNorm computed in f32 then cast back, times `scale` (the reference's QK-norm).
pub fn rms_norm<T: Tensor>(x: &T, scale: &T, eps: f64) -> Result<T> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let rms = xf
        .sqr()?
        .mean_keepdim(D::Minus1)?
        .affine(1.0, eps)?
        .sqrt()?;
    let y = xf.broadcast_div(&rms)?.to_dtype(dtype)?;
    y.broadcast_mul(scale)
}

/// GELU with the tanh approximation (PyTorch `approximate="tanh"`, T5's `gelu_new`).
pub fn gelu_tanh<T: Tensor>(x: &T) -> Result<T> {
    x.gelu()
}

pub fn silu<T: Tensor>(x: &T) -> Result<T> {
    x.silu()
}

/// `(1 + scale)·x + shift`, the adaptive-norm modulation.
pub fn modulate<T: Tensor>(x: &T, shift: &T, scale: &T) -> Result<T> {
    x.broadcast_mul(&scale.affine(1.0, 1.0)?)?
        .broadcast_add(shift)
}
