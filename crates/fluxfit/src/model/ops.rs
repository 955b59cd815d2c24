//! Small numeric building blocks shared by the networks, with the reference's precision rules.
//!
//! Where the tensors' device has fused kernels ([`Tensor::fused_kernels`]: CUDA), the norms
//! run as one kernel that accumulates in f32 and rounds once; elsewhere they are composed
//! step by step in f32. The two round the output differently by at most one bf16 step.

use candle_core::{DType, D};

use crate::error::Result;
use crate::tensor::profile::{self, Class};
use crate::tensor::Tensor;

/// `x·wᵀ + b` for a PyTorch-layout weight `[out, in]` and any number of leading dims.
pub fn linear<T: Tensor>(x: &T, w: &T, b: Option<&T>) -> Result<T> {
    let dims = x.dims().to_vec();
    let in_dim = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape(&[rows, in_dim])?;
    let y = if x.cpu_kernels() && w.cpu_kernels() {
        x2.linear_cpu(w, b)?
    } else {
        let y = x2.matmul(&w.t()?)?;
        match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        }
    };
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = w.dim(0)?;
    y.reshape(&out)
}

/// LayerNorm over the last dim without affine parameters (the flow model's `elementwise_affine=False`).
pub fn layer_norm_plain<T: Tensor>(x: &T, eps: f64) -> Result<T> {
    profile::scope(Class::Norm, || layer_norm_plain_steps(x, eps))
}

fn layer_norm_plain_steps<T: Tensor>(x: &T, eps: f64) -> Result<T> {
    let dtype = x.dtype();
    if x.fused_kernels() {
        let d = x.dim(D::Minus1)?;
        let host = T::host_of(x.device());
        let ones = T::from_f32(&[d], &host, || vec![1.0; d])?
            .to_dtype(dtype)?
            .to_device(x.device())?;
        let zeros = T::zeros(&[d], dtype, x.device())?;
        return x.layer_norm_fused(&ones, &zeros, eps);
    }
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
    profile::scope(Class::Norm, || layer_norm_steps(x, w, b, eps))
}

fn layer_norm_steps<T: Tensor>(x: &T, w: &T, b: &T, eps: f64) -> Result<T> {
    if x.fused_kernels() {
        let dtype = x.dtype();
        return x.layer_norm_fused(&w.to_dtype(dtype)?, &b.to_dtype(dtype)?, eps);
    }
    let y = layer_norm_plain(&x.to_dtype(DType::F32)?, eps)?;
    let w = w.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    y.broadcast_mul(&w)?.broadcast_add(&b)?.to_dtype(x.dtype())
}

/// RMSNorm computed in f32 then cast back, times `scale` (the reference's QK-norm).
pub fn rms_norm<T: Tensor>(x: &T, scale: &T, eps: f64) -> Result<T> {
    profile::scope(Class::Norm, || rms_norm_steps(x, scale, eps))
}

fn rms_norm_steps<T: Tensor>(x: &T, scale: &T, eps: f64) -> Result<T> {
    let dtype = x.dtype();
    if x.fused_kernels() {
        return x.rms_norm_fused(&scale.to_dtype(dtype)?, eps);
    }
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
    if x.cpu_kernels() {
        return x.gelu_cpu();
    }
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

/// AdaLN: LayerNorm without affine parameters, then [`modulate`] by the conditioning's
/// `shift` and `scale` (`x` `[B, L, H]`, `shift`, `scale` `[B, 1, H]`).
pub fn ada_norm<T: Tensor>(x: &T, shift: &T, scale: &T, eps: f64) -> Result<T> {
    if x.cpu_kernels() && shift.cpu_kernels() && scale.cpu_kernels() {
        return profile::scope(Class::Norm, || x.ada_norm_cpu(shift, scale, eps));
    }
    modulate(&layer_norm_plain(x, eps)?, shift, scale)
}

/// The gated residual `x + gate·h` (`x`, `h` `[B, L, H]`, `gate` `[B, 1, H]`).
pub fn gated_add<T: Tensor>(x: &T, gate: &T, h: &T) -> Result<T> {
    if x.cpu_kernels() && gate.cpu_kernels() && h.cpu_kernels() {
        return x.gated_add_cpu(gate, h);
    }
    x.add(&gate.broadcast_mul(h)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor as C};

    fn max_diff(a: &C, b: &C) -> f32 {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Deterministic values of a spread like N(mean, std²).
    fn values(n: usize, mean: f32, std: f32, seed: f32) -> C {
        let v: Vec<f32> = (0..n)
            .map(|i| mean + std * 1.7 * ((i as f32 * 12.9898 + seed).sin() * 43758.545).fract())
            .collect();
        C::from_vec(v, n, &Device::Cpu).unwrap()
    }

    /// The fused norms CUDA runs (candle's kernels, which have CPU versions too) agree with the
    /// composed ones: to f32 rounding in f32; in bf16 within two steps at the output's largest
    /// magnitude, because the composed RMSNorm rounds twice (before and after the scale) where
    /// the kernel rounds once.
    #[test]
    fn fused_norms_match_the_composed_ones() -> Result<()> {
        let dev = Device::Cpu;
        let x = values(640, 0.0, 3.0, 1.0).reshape((2, 5, 64))?;
        let w = values(64, 1.0, 0.2, 2.0);
        let b = values(64, 0.0, 0.2, 3.0);
        for dtype in [DType::F32, DType::BF16] {
            let (x, w, b) = (x.to_dtype(dtype)?, w.to_dtype(dtype)?, b.to_dtype(dtype)?);
            let ones = C::ones(64, dtype, &dev)?;
            let zeros = C::zeros(64, dtype, &dev)?;
            for (name, composed, fused) in [
                (
                    "rms_norm",
                    rms_norm(&x, &w, 1e-6)?,
                    x.rms_norm_fused(&w, 1e-6)?,
                ),
                (
                    "layer_norm",
                    layer_norm(&x, &w, &b, 1e-5)?,
                    x.layer_norm_fused(&w, &b, 1e-5)?,
                ),
                (
                    "layer_norm_plain",
                    layer_norm_plain(&x, 1e-6)?,
                    x.layer_norm_fused(&ones, &zeros, 1e-6)?,
                ),
            ] {
                // One step of the dtype at the output's largest magnitude.
                let largest = composed
                    .abs()?
                    .max_all()?
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?;
                let step = if dtype == DType::F32 {
                    1e-6
                } else {
                    1.0 / 128.0
                };
                let d = max_diff(&composed, &fused);
                assert!(
                    d <= largest * step,
                    "{name} {dtype:?}: {d} (largest {largest})"
                );
            }
        }
        Ok(())
    }
}
