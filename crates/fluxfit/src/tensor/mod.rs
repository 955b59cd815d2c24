//! The tensor the networks are written against: one trait, two implementations.
//!
//! - [`candle_core::Tensor`] computes (`candle.rs`): each method is the candle call of the same
//!   name, so a network generic over [`Tensor`] runs exactly the kernels it would run written
//!   against candle directly.
//! - [`meta::Meta`] holds only a shape, strides, a dtype and a shared storage block (`meta.rs`):
//!   each method allocates, shares or frees *sizes* the way candle does (views share storage,
//!   `contiguous` and a strided `reshape` copy, every op allocates its output) and records its
//!   cost (FLOPs, bytes moved, kernel workspace). The planner runs the networks and the
//!   pipeline's phases over it to predict peaks and times, as PyTorch's meta device or JAX's
//!   `eval_shape` run a model over shapes: no network is described twice.
//!
//! The method names and meanings are candle's; only the operators (`a + b`, `x * 2.0`) become
//! methods (`add`, `affine`), which is what candle's operators call.

pub mod candle;
pub mod cpu_kernels;
pub mod cpu_ops;
pub mod meta;
pub mod profile;

use candle_core::shape::Dim;
use candle_core::DType;

use crate::error::{Error, Result};

/// Where a network's tensors live and what they can do. See the module doc.
pub trait Tensor: Clone + Sized {
    /// A compute device (candle's `Device`; a meta heap side).
    type Device: Clone + std::fmt::Debug;
    /// A block-quantized Linear weight multiplied as it is (`+qmatmul` plans).
    type QWeight;
    /// An f32 buffer on the host that tiles are blended into (tiled VAE).
    type Host: HostBuffer<Self>;

    // ---- shape ----
    fn dims(&self) -> &[usize];
    fn dtype(&self) -> DType;
    fn device(&self) -> &Self::Device;
    fn is_contiguous(&self) -> bool;
    /// The host (CPU) side of `device`: where small constants are built before they move.
    fn host_of(device: &Self::Device) -> Self::Device;
    /// Whether two devices are the same one (a move between them is free).
    fn same_device(a: &Self::Device, b: &Self::Device) -> bool;

    fn dim<D: Dim>(&self, d: D) -> Result<usize> {
        let shape = candle_core::Shape::from(self.dims());
        Ok(self.dims()[d.to_index(&shape, "dim")?])
    }
    fn rank_dims<const N: usize>(&self) -> Result<[usize; N]> {
        self.dims().try_into().map_err(|_| {
            Error::Candle(candle_core::Error::UnexpectedNumberOfDims {
                expected: N,
                got: self.dims().len(),
                shape: candle_core::Shape::from(self.dims()),
            })
        })
    }
    fn dims2(&self) -> Result<(usize, usize)> {
        let [a, b] = self.rank_dims()?;
        Ok((a, b))
    }
    fn dims3(&self) -> Result<(usize, usize, usize)> {
        let [a, b, c] = self.rank_dims()?;
        Ok((a, b, c))
    }
    fn dims4(&self) -> Result<(usize, usize, usize, usize)> {
        let [a, b, c, d] = self.rank_dims()?;
        Ok((a, b, c, d))
    }
    fn elem_count(&self) -> usize {
        self.dims().iter().product()
    }

    // ---- construction: `fill` runs only where values exist ----
    fn from_f32(
        shape: &[usize],
        device: &Self::Device,
        fill: impl FnOnce() -> Vec<f32>,
    ) -> Result<Self>;
    fn from_u32(
        shape: &[usize],
        device: &Self::Device,
        fill: impl FnOnce() -> Vec<u32>,
    ) -> Result<Self>;
    fn zeros(shape: &[usize], dtype: DType, device: &Self::Device) -> Result<Self>;

    // ---- views and copies ----
    fn reshape(&self, shape: &[usize]) -> Result<Self>;
    fn narrow<D: Dim>(&self, dim: D, start: usize, len: usize) -> Result<Self>;
    fn transpose<D1: Dim, D2: Dim>(&self, a: D1, b: D2) -> Result<Self>;
    fn permute(&self, dims: &[usize]) -> Result<Self>;
    fn t(&self) -> Result<Self>;
    fn get(&self, i: usize) -> Result<Self>;
    fn chunk<D: Dim>(&self, chunks: usize, dim: D) -> Result<Vec<Self>>;
    fn squeeze<D: Dim>(&self, dim: D) -> Result<Self>;
    fn unsqueeze<D: Dim>(&self, dim: D) -> Result<Self>;
    fn flatten_all(&self) -> Result<Self>;
    fn contiguous(&self) -> Result<Self>;
    fn to_dtype(&self, dtype: DType) -> Result<Self>;
    fn to_device(&self, device: &Self::Device) -> Result<Self>;
    fn cat<D: Dim>(parts: &[&Self], dim: D) -> Result<Self>;
    fn stack<D: Dim>(parts: &[&Self], dim: D) -> Result<Self>;
    fn pad_with_zeros<D: Dim>(&self, dim: D, left: usize, right: usize) -> Result<Self>;

    // ---- arithmetic ----
    fn add(&self, rhs: &Self) -> Result<Self>;
    fn sub(&self, rhs: &Self) -> Result<Self>;
    fn mul(&self, rhs: &Self) -> Result<Self>;
    fn broadcast_add(&self, rhs: &Self) -> Result<Self>;
    fn broadcast_sub(&self, rhs: &Self) -> Result<Self>;
    fn broadcast_mul(&self, rhs: &Self) -> Result<Self>;
    fn broadcast_div(&self, rhs: &Self) -> Result<Self>;
    /// `x·mul + add` (what candle's `x + f64`, `x * f64`, `x / f64` are).
    fn affine(&self, mul: f64, add: f64) -> Result<Self>;
    fn sqr(&self) -> Result<Self>;
    fn sqrt(&self) -> Result<Self>;
    fn recip(&self) -> Result<Self>;
    fn exp(&self) -> Result<Self>;
    fn cos(&self) -> Result<Self>;
    fn sin(&self) -> Result<Self>;
    fn abs(&self) -> Result<Self>;
    fn relu(&self) -> Result<Self>;
    /// GELU, tanh approximation.
    fn gelu(&self) -> Result<Self>;
    /// GELU, exact (erf).
    fn gelu_erf(&self) -> Result<Self>;
    fn silu(&self) -> Result<Self>;
    fn sigmoid(&self) -> Result<Self>;
    fn clamp(&self, min: f64, max: f64) -> Result<Self>;
    fn mean_keepdim<D: Dim>(&self, dim: D) -> Result<Self>;
    fn softmax_last_dim(&self) -> Result<Self>;
    fn matmul(&self, rhs: &Self) -> Result<Self>;
    /// `x·Wᵀ` with a block-quantized `W` (x f32, contiguous).
    fn qmatmul(&self, w: &Self::QWeight) -> Result<Self>;
    fn conv2d(&self, kernel: &Self, padding: usize, stride: usize) -> Result<Self>;
    fn upsample_nearest2d(&self, h: usize, w: usize) -> Result<Self>;
    fn index_select<D: Dim>(&self, ids: &Self, dim: D) -> Result<Self>;
    /// The largest absolute value, as f32 (0 where there are no values).
    fn max_abs(&self) -> Result<f32>;
    /// Whether every element is finite (no NaN, no infinity).
    fn all_finite(&self) -> Result<bool>;

    /// Whether the networks use the fused kernels below on this tensor's device (CUDA: one
    /// kernel instead of a chain of element-wise ones and their f32 intermediates). Elsewhere
    /// `model::ops` composes the same math from the ops above.
    fn fused_kernels(&self) -> bool {
        false
    }
    /// RMSNorm over the last dim times `scale` (same dtype), accumulated in f32.
    fn rms_norm_fused(&self, scale: &Self, eps: f64) -> Result<Self>;
    /// LayerNorm over the last dim with weight and bias (same dtype), accumulated in f32.
    fn layer_norm_fused(&self, w: &Self, b: &Self, eps: f64) -> Result<Self>;
    /// Rotation of interleaved pairs of `[B, H, L, D]` by `cos`/`sin` `[B, L, D/2]` (same dtype).
    fn rope_interleaved_fused(&self, cos: &Self, sin: &Self) -> Result<Self>;

    /// Whether `model::ops` runs fluxfit's own CPU kernels on this tensor (f32 on the CPU, see
    /// `cpu_kernels`): the methods below, and the fused norms and RoPE above. Elsewhere the
    /// same math is composed from the ops above.
    fn cpu_kernels(&self) -> bool {
        false
    }
    /// `x·wᵀ + b` for `x` `[m, k]`, `w` `[n, k]`, the bias the matmul's starting value.
    fn linear_cpu(&self, w: &Self, b: Option<&Self>) -> Result<Self>;
    /// LayerNorm without affine over the last dim, then `·(1 + scale) + shift`: `x` `[B, L, H]`,
    /// `shift`, `scale` `[B, 1, H]`.
    fn ada_norm_cpu(&self, shift: &Self, scale: &Self, eps: f64) -> Result<Self>;
    /// The gated residual `x + gate·h`: `x`, `h` `[B, L, H]`, `gate` `[B, 1, H]`.
    fn gated_add_cpu(&self, gate: &Self, h: &Self) -> Result<Self>;
    /// GELU, tanh approximation, in one vectorised pass.
    fn gelu_cpu(&self) -> Result<Self>;
    /// Softmax attention (scale 1/√D) of `[B, H, L, D]` queries (`self`), keys and values, a
    /// block of queries at a time, heads merged: `[B, L, H·D]`.
    fn attention_cpu(&self, k: &Self, v: &Self) -> Result<Self>;
}

/// A host f32 buffer that weighted tiles are added into, then made a tensor.
pub trait HostBuffer<T: Tensor>: Sized {
    fn zeros(len: usize, device: &T::Device) -> Result<Self>;
    /// Adds `tile` (`[planes, th, tw]` worth of f32 values) into the `[planes, h, w]` buffer at
    /// row `y0`, column `x0`.
    fn add_tile(
        &mut self,
        tile: &T,
        planes: usize,
        h: usize,
        w: usize,
        y0: usize,
        x0: usize,
    ) -> Result<()>;
    /// The buffer as a tensor of `shape` on `device`.
    fn into_tensor(self, shape: &[usize], device: &T::Device) -> Result<T>;
}
