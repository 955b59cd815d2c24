//! [`Tensor`] over candle: each method is the candle call of the same name.

use candle_core::quantized::QMatMul;
use candle_core::shape::Dim;
use candle_core::{DType, Device, Module};

use super::profile::{self, Class};
use super::{cpu_kernels, cpu_ops};
use super::{HostBuffer, Tensor};
use crate::error::Result;

type C = candle_core::Tensor;

impl Tensor for C {
    type Device = Device;
    type QWeight = QMatMul;
    type Host = Vec<f32>;

    fn dims(&self) -> &[usize] {
        C::dims(self)
    }
    fn dtype(&self) -> DType {
        C::dtype(self)
    }
    fn device(&self) -> &Device {
        C::device(self)
    }
    fn is_contiguous(&self) -> bool {
        C::is_contiguous(self)
    }
    fn host_of(_: &Device) -> Device {
        Device::Cpu
    }
    fn same_device(a: &Device, b: &Device) -> bool {
        a.same_device(b)
    }

    fn from_f32(shape: &[usize], device: &Device, fill: impl FnOnce() -> Vec<f32>) -> Result<Self> {
        profile::op(Class::Other, || Ok(C::from_vec(fill(), shape, device)?))
    }
    fn from_u32(shape: &[usize], device: &Device, fill: impl FnOnce() -> Vec<u32>) -> Result<Self> {
        profile::op(Class::Other, || Ok(C::from_vec(fill(), shape, device)?))
    }
    fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Self> {
        profile::op(Class::Other, || Ok(C::zeros(shape, dtype, device)?))
    }

    fn reshape(&self, shape: &[usize]) -> Result<Self> {
        profile::op(Class::Copy, || Ok(C::reshape(self, shape)?))
    }
    fn narrow<D: Dim>(&self, dim: D, start: usize, len: usize) -> Result<Self> {
        Ok(C::narrow(self, dim, start, len)?)
    }
    fn transpose<D1: Dim, D2: Dim>(&self, a: D1, b: D2) -> Result<Self> {
        Ok(C::transpose(self, a, b)?)
    }
    fn permute(&self, dims: &[usize]) -> Result<Self> {
        Ok(C::permute(self, dims)?)
    }
    fn t(&self) -> Result<Self> {
        Ok(C::t(self)?)
    }
    fn get(&self, i: usize) -> Result<Self> {
        Ok(C::get(self, i)?)
    }
    fn chunk<D: Dim>(&self, chunks: usize, dim: D) -> Result<Vec<Self>> {
        Ok(C::chunk(self, chunks, dim)?)
    }
    fn squeeze<D: Dim>(&self, dim: D) -> Result<Self> {
        Ok(C::squeeze(self, dim)?)
    }
    fn unsqueeze<D: Dim>(&self, dim: D) -> Result<Self> {
        Ok(C::unsqueeze(self, dim)?)
    }
    fn flatten_all(&self) -> Result<Self> {
        Ok(C::flatten_all(self)?)
    }
    fn contiguous(&self) -> Result<Self> {
        profile::op(Class::Copy, || Ok(C::contiguous(self)?))
    }
    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        profile::op(Class::Copy, || Ok(C::to_dtype(self, dtype)?))
    }
    fn to_device(&self, device: &Device) -> Result<Self> {
        profile::op(Class::Copy, || Ok(C::to_device(self, device)?))
    }
    fn cat<D: Dim>(parts: &[&Self], dim: D) -> Result<Self> {
        profile::op(Class::Copy, || Ok(C::cat(parts, dim)?))
    }
    fn stack<D: Dim>(parts: &[&Self], dim: D) -> Result<Self> {
        profile::op(Class::Copy, || Ok(C::stack(parts, dim)?))
    }
    fn pad_with_zeros<D: Dim>(&self, dim: D, left: usize, right: usize) -> Result<Self> {
        profile::op(Class::Copy, || {
            Ok(C::pad_with_zeros(self, dim, left, right)?)
        })
    }

    fn add(&self, rhs: &Self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::add(self, rhs)?))
    }
    fn sub(&self, rhs: &Self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::sub(self, rhs)?))
    }
    fn mul(&self, rhs: &Self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::mul(self, rhs)?))
    }
    fn broadcast_add(&self, rhs: &Self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::broadcast_add(self, rhs)?))
    }
    fn broadcast_sub(&self, rhs: &Self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::broadcast_sub(self, rhs)?))
    }
    fn broadcast_mul(&self, rhs: &Self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::broadcast_mul(self, rhs)?))
    }
    fn broadcast_div(&self, rhs: &Self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::broadcast_div(self, rhs)?))
    }
    fn affine(&self, mul: f64, add: f64) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::affine(self, mul, add)?))
    }
    fn sqr(&self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::sqr(self)?))
    }
    fn sqrt(&self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::sqrt(self)?))
    }
    fn recip(&self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::recip(self)?))
    }
    fn exp(&self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::exp(self)?))
    }
    fn cos(&self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::cos(self)?))
    }
    fn sin(&self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::sin(self)?))
    }
    fn abs(&self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::abs(self)?))
    }
    fn relu(&self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::relu(self)?))
    }
    fn gelu(&self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::gelu(self)?))
    }
    fn gelu_erf(&self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::gelu_erf(self)?))
    }
    fn silu(&self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(candle_nn::ops::silu(self)?))
    }
    fn sigmoid(&self) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(candle_nn::ops::sigmoid(self)?))
    }
    fn clamp(&self, min: f64, max: f64) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::clamp(self, min, max)?))
    }
    fn mean_keepdim<D: Dim>(&self, dim: D) -> Result<Self> {
        profile::op(Class::Elementwise, || Ok(C::mean_keepdim(self, dim)?))
    }
    fn softmax_last_dim(&self) -> Result<Self> {
        profile::op(Class::Attention, || {
            Ok(candle_nn::ops::softmax_last_dim(self)?)
        })
    }
    fn matmul(&self, rhs: &Self) -> Result<Self> {
        profile::op(Class::Matmul, || Ok(C::matmul(self, rhs)?))
    }
    fn qmatmul(&self, w: &QMatMul) -> Result<Self> {
        profile::op(Class::Matmul, || Ok(w.forward(self)?))
    }
    fn conv2d(&self, kernel: &Self, padding: usize, stride: usize) -> Result<Self> {
        profile::op(Class::Other, || {
            Ok(C::conv2d(self, kernel, padding, stride, 1, 1)?)
        })
    }
    fn upsample_nearest2d(&self, h: usize, w: usize) -> Result<Self> {
        profile::op(Class::Other, || Ok(C::upsample_nearest2d(self, h, w)?))
    }
    fn index_select<D: Dim>(&self, ids: &Self, dim: D) -> Result<Self> {
        profile::op(Class::Copy, || Ok(C::index_select(self, ids, dim)?))
    }
    fn max_abs(&self) -> Result<f32> {
        Ok(C::abs(self)?
            .max_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?)
    }
    fn all_finite(&self) -> Result<bool> {
        // 0·x is NaN exactly where x is NaN or infinite, and a sum keeps a NaN.
        let probe = self.to_dtype(DType::F32)?.affine(0.0, 0.0)?.sum_all()?;
        Ok(!probe.to_scalar::<f32>()?.is_nan())
    }
    fn fused_kernels(&self) -> bool {
        self.device().is_cuda() || self.cpu_kernels()
    }
    fn rms_norm_fused(&self, scale: &Self, eps: f64) -> Result<Self> {
        profile::op(Class::Norm, || {
            Ok(candle_nn::ops::rms_norm(
                &self.contiguous()?,
                scale,
                eps as f32,
            )?)
        })
    }
    fn layer_norm_fused(&self, w: &Self, b: &Self, eps: f64) -> Result<Self> {
        profile::op(Class::Norm, || {
            Ok(candle_nn::ops::layer_norm(
                &self.contiguous()?,
                w,
                b,
                eps as f32,
            )?)
        })
    }
    fn rope_interleaved_fused(&self, cos: &Self, sin: &Self) -> Result<Self> {
        profile::op(Class::Rope, || {
            Ok(candle_nn::rotary_emb::rope_i(
                &self.contiguous()?,
                &cos.contiguous()?,
                &sin.contiguous()?,
            )?)
        })
    }
    fn cpu_kernels(&self) -> bool {
        self.device().is_cpu() && self.dtype() == DType::F32 && cpu_kernels::enabled()
    }
    fn linear_cpu(&self, w: &Self, b: Option<&Self>) -> Result<Self> {
        profile::op(Class::Matmul, || {
            Ok(match b {
                Some(b) => self.apply_op3_no_bwd(w, b, &cpu_ops::Linear)?,
                None => self.apply_op2_no_bwd(w, &cpu_ops::Linear)?,
            })
        })
    }
    fn ada_norm_cpu(&self, shift: &Self, scale: &Self, eps: f64) -> Result<Self> {
        profile::op(Class::Norm, || {
            Ok(self.contiguous()?.apply_op3_no_bwd(
                &shift.contiguous()?,
                &scale.contiguous()?,
                &cpu_ops::AdaNorm { eps: eps as f32 },
            )?)
        })
    }
    fn gated_add_cpu(&self, gate: &Self, h: &Self) -> Result<Self> {
        profile::op(Class::Elementwise, || {
            Ok(self.contiguous()?.apply_op3_no_bwd(
                &gate.contiguous()?,
                &h.contiguous()?,
                &cpu_ops::GatedAdd,
            )?)
        })
    }
    fn gelu_cpu(&self) -> Result<Self> {
        profile::op(Class::Elementwise, || {
            Ok(self.contiguous()?.apply_op1_no_bwd(&cpu_ops::Gelu)?)
        })
    }
    fn attention_cpu(&self, k: &Self, v: &Self) -> Result<Self> {
        let last_contiguous = |t: &Self| -> Result<Self> {
            Ok(if t.stride().last() == Some(&1) {
                t.clone()
            } else {
                C::contiguous(t)?
            })
        };
        profile::op(Class::Attention, || {
            Ok(last_contiguous(self)?.apply_op3_no_bwd(
                &last_contiguous(k)?,
                &last_contiguous(v)?,
                &cpu_ops::Attention,
            )?)
        })
    }
}

impl HostBuffer<C> for Vec<f32> {
    fn zeros(len: usize, _: &Device) -> Result<Self> {
        Ok(vec![0f32; len])
    }

    fn add_tile(
        &mut self,
        tile: &C,
        planes: usize,
        h: usize,
        w: usize,
        y0: usize,
        x0: usize,
    ) -> Result<()> {
        let (th, tw) = (tile.dim(2)?, tile.dim(3)?);
        let values = tile.flatten_all()?.to_vec1::<f32>()?;
        debug_assert_eq!(values.len(), planes * th * tw);
        for plane in 0..planes {
            for r in 0..th {
                let src = &values[(plane * th + r) * tw..][..tw];
                let dst = &mut self[(plane * h + y0 + r) * w + x0..][..tw];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += s;
                }
            }
        }
        Ok(())
    }

    fn into_tensor(self, shape: &[usize], device: &Device) -> Result<C> {
        Ok(C::from_vec(self, shape, device)?)
    }
}
