//! Scaled dot-product attention in query chunks, and FLUX's rotary position embedding.
//!
//! The score matrix is the largest activation of a transformer at high resolution
//! (heads × L² elements: 1 GB at 1024² in bf16). Computing it a chunk of queries at a time bounds
//! it by heads × chunk × L; the result equals the unchunked one up to f32 rounding.

use candle_core::{DType, D};

use crate::error::Result;
use crate::tensor::profile::{self, Class};
use crate::tensor::Tensor;

/// Default query-chunk length: large enough to keep matmuls efficient, small enough to bound memory.
pub const DEFAULT_CHUNK: usize = 1024;

/// Softmax attention over `[B, H, L, D]` tensors with no mask, scale 1/√D.
/// `chunk` = None computes all queries at once.
pub fn attention<T: Tensor>(q: &T, k: &T, v: &T, chunk: Option<usize>) -> Result<T> {
    profile::scope(Class::Attention, || attention_steps(q, k, v, chunk))
}

fn attention_steps<T: Tensor>(q: &T, k: &T, v: &T, chunk: Option<usize>) -> Result<T> {
    let d = q.dim(D::Minus1)?;
    let scale = 1.0 / (d as f64).sqrt();
    let l = q.dim(2)?;
    let kt = k.t()?.contiguous()?;
    let block = |q: &T| -> Result<T> {
        let scores = q.contiguous()?.matmul(&kt)?.affine(scale, 0.0)?;
        let probs = scores
            .to_dtype(DType::F32)?
            .softmax_last_dim()?
            .to_dtype(v.dtype())?;
        probs.matmul(&v.contiguous()?)
    };
    match chunk {
        Some(c) if c < l => {
            let mut outs = Vec::with_capacity(l.div_ceil(c));
            let mut start = 0;
            while start < l {
                let n = c.min(l - start);
                outs.push(block(&q.narrow(2, start, n)?)?);
                start += n;
            }
            T::cat(&outs.iter().collect::<Vec<_>>(), 2)
        }
        _ => block(q),
    }
}

/// [`attention`] with the heads merged back: `[B, H, L, D]` in, `[B, L, H·D]` out. With the
/// CPU kernels, one fused pass that keeps each block of queries' scores in cache and writes the
/// merged layout directly.
pub fn attention_merged<T: Tensor>(q: &T, k: &T, v: &T, chunk: Option<usize>) -> Result<T> {
    if q.cpu_kernels() && k.cpu_kernels() && v.cpu_kernels() {
        return q.attention_cpu(k, v);
    }
    let a = attention(q, k, v, chunk)?;
    let (b, nh, l, d) = a.dims4()?;
    a.transpose(1, 2)?.reshape(&[b, l, nh * d])
}

/// Rotation angles for FLUX's n-axis RoPE: returns (cos, sin), each `[B, 1, L, head_dim/2]` f32.
/// `ids` is `[B, L, n_axes]` f32 positions; axis i uses `axes_dim[i]` of the head dims. Computed
/// on the host, then moved to `device`.
pub fn rope_angles<T: Tensor>(
    ids: &T,
    axes_dim: &[usize],
    theta: f64,
    device: &T::Device,
) -> Result<(T, T)> {
    let ids = ids.to_dtype(DType::F32)?;
    let host = T::host_of(device);
    let mut parts = Vec::with_capacity(axes_dim.len());
    for (i, &dim) in axes_dim.iter().enumerate() {
        let omega = T::from_f32(&[1, 1, dim / 2], &host, || {
            (0..dim / 2)
                .map(|k| {
                    let scale = (2 * k) as f64 / dim as f64;
                    (1.0 / theta.powf(scale)) as f32
                })
                .collect()
        })?;
        let pos = ids.narrow(D::Minus1, i, 1)?.to_device(&host)?;
        parts.push(pos.broadcast_mul(&omega)?);
    }
    let angles = T::cat(&parts.iter().collect::<Vec<_>>(), D::Minus1)?.unsqueeze(1)?;
    Ok((
        angles.cos()?.to_device(device)?,
        angles.sin()?.to_device(device)?,
    ))
}

/// Rotates interleaved pairs (2p, 2p+1) of `x` `[B, H, L, D]`; computed in f32 like the reference.
pub fn apply_rope<T: Tensor>(x: &T, cos: &T, sin: &T) -> Result<T> {
    profile::scope(Class::Rope, || apply_rope_steps(x, cos, sin))
}

fn apply_rope_steps<T: Tensor>(x: &T, cos: &T, sin: &T) -> Result<T> {
    let dtype = x.dtype();
    if x.fused_kernels() {
        let (cos, sin) = (cos.squeeze(1)?, sin.squeeze(1)?);
        return x
            .to_dtype(DType::F32)?
            .rope_interleaved_fused(&cos, &sin)?
            .to_dtype(dtype);
    }
    let (b, h, l, d) = x.dims4()?;
    let x = x.to_dtype(DType::F32)?.reshape(&[b, h, l, d / 2, 2])?;
    let x0 = x.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
    let out0 = x0.broadcast_mul(cos)?.sub(&x1.broadcast_mul(sin)?)?;
    let out1 = x0.broadcast_mul(sin)?.add(&x1.broadcast_mul(cos)?)?;
    let out = T::stack(&[&out0, &out1], D::Minus1)?.reshape(&[b, h, l, d])?;
    drop((out0, out1));
    out.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn chunked_attention_matches_unchunked() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 2, 37, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 37, 8), &dev)?;
        let full = attention(&q, &k, &v, None)?;
        for chunk in [1, 5, 16, 36, 37, 100] {
            let c = attention(&q, &k, &v, Some(chunk))?;
            let diff = (&full - &c)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "chunk {chunk}: max diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn rope_with_zero_position_is_identity() -> Result<()> {
        let dev = Device::Cpu;
        let ids = Tensor::zeros((1, 3, 3), DType::F32, &dev)?;
        let (cos, sin) = rope_angles(&ids, &[4, 14, 14], 10_000.0, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (1, 2, 3, 32), &dev)?;
        let y = apply_rope(&x, &cos, &sin)?;
        let diff = (&x - &y)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff == 0.0);
        Ok(())
    }

    #[test]
    fn rope_rotates_interleaved_pairs() -> Result<()> {
        let dev = Device::Cpu;
        // One axis of 2 dims: a single pair rotated by angle pos·1.
        let ids = Tensor::new(&[[[0.5f32]]], &dev)?;
        let (cos, sin) = rope_angles(&ids, &[2], 10_000.0, &dev)?;
        let x = Tensor::new(&[[[[1f32, 2.0]]]], &dev)?;
        let y = apply_rope(&x, &cos, &sin)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (c, s) = (0.5f32.cos(), 0.5f32.sin());
        assert!((y[0] - (c - 2.0 * s)).abs() < 1e-6);
        assert!((y[1] - (s + 2.0 * c)).abs() < 1e-6);
        Ok(())
    }

    /// The fused kernel CUDA runs (candle's `rope_i`, which has a CPU kernel too) rotates the
    /// same pairs by the same angles as the composed rotation.
    #[test]
    fn fused_rope_matches_the_composed_rotation() -> Result<()> {
        use crate::tensor::Tensor as _;
        let dev = Device::Cpu;
        let ids = Tensor::rand(0f32, 40.0, (1, 6, 3), &dev)?;
        let (cos, sin) = rope_angles(&ids, &[4, 6, 6], 10_000.0, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (1, 2, 6, 16), &dev)?;
        let composed = apply_rope(&x, &cos, &sin)?;
        let fused = x.rope_interleaved_fused(&cos.squeeze(1)?, &sin.squeeze(1)?)?;
        let diff = (&composed - &fused)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }
}
