//! Scaled dot-product attention in query chunks, and FLUX's rotary position embedding.
//!
//! The score matrix is the largest activation of a transformer at high resolution
//! (heads × L² elements: 1 GB at 1024² in bf16). Computing it a chunk of queries at a time bounds
//! it by heads × chunk × L; the result equals the unchunked one up to f32 rounding.

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;

/// Default query-chunk length: large enough to keep matmuls efficient, small enough to bound memory.
pub const DEFAULT_CHUNK: usize = 1024;

/// Softmax attention over `[B, H, L, D]` tensors with no mask, scale 1/√D.
/// `chunk` = None computes all queries at once.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, chunk: Option<usize>) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let scale = 1.0 / (d as f64).sqrt();
    let l = q.dim(2)?;
    let kt = k.t()?.contiguous()?;
    let block = |q: &Tensor| -> Result<Tensor> {
        let scores = (q.contiguous()?.matmul(&kt)? * scale)?;
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        Ok(probs.matmul(&v.contiguous()?)?)
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
            Ok(Tensor::cat(&outs, 2)?)
        }
        _ => block(q),
    }
}

/// Rotation angles for FLUX's n-axis RoPE: returns (cos, sin), each `[B, 1, L, head_dim/2]` f32.
/// `ids` is `[B, L, n_axes]` f32 positions; axis i uses `axes_dim[i]` of the head dims.
pub fn rope_angles(
    ids: &Tensor,
    axes_dim: &[usize],
    theta: f64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let ids = ids.to_dtype(DType::F32)?;
    let mut parts = Vec::with_capacity(axes_dim.len());
    for (i, &dim) in axes_dim.iter().enumerate() {
        let omega: Vec<f32> = (0..dim / 2)
            .map(|k| {
                let scale = (2 * k) as f64 / dim as f64;
                (1.0 / theta.powf(scale)) as f32
            })
            .collect();
        let omega = Tensor::from_vec(omega, (1, 1, dim / 2), &Device::Cpu)?;
        let pos = ids.narrow(D::Minus1, i, 1)?.to_device(&Device::Cpu)?;
        parts.push(pos.broadcast_mul(&omega)?);
    }
    let angles = Tensor::cat(&parts, D::Minus1)?.unsqueeze(1)?;
    Ok((
        angles.cos()?.to_device(device)?,
        angles.sin()?.to_device(device)?,
    ))
}

/// Rotates interleaved pairs (2p, 2p+1) of `x` `[B, H, L, D]`; computed in f32 like the reference.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let (b, h, l, d) = x.dims4()?;
    let x = x.to_dtype(DType::F32)?.reshape((b, h, l, d / 2, 2))?;
    let x0 = x.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
    let out0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
    let out1 = (x0.broadcast_mul(sin)? + x1.broadcast_mul(cos)?)?;
    let out = Tensor::stack(&[out0, out1], D::Minus1)?.reshape((b, h, l, d))?;
    Ok(out.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
