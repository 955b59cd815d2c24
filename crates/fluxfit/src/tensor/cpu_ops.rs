//! candle custom ops over [`cpu_kernels`](super::cpu_kernels): they check each input's dtype,
//! layout and extent, then hand plain slices to the kernels. CPU and f32 only; the
//! [`Tensor`](super::Tensor) methods that apply them are taken only where
//! `Tensor::cpu_kernels` says so.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape};

use super::cpu_kernels::{self as k, Heads, Mat};

/// The f32 values of a storage from its layout's start.
fn values<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(&v[l.start_offset()..]),
        _ => bail!("{op}: f32 values only"),
    }
}

/// The f32 values of a contiguous layout, exactly its elements.
fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let v = values(s, l, op)?;
    if !l.is_contiguous() {
        bail!("{op}: needs a contiguous input");
    }
    Ok(&v[..l.shape().elem_count()])
}

/// Whether every element a strided view reaches lies inside `data`.
fn reaches(data: &[f32], dims: &[usize], strides: &[usize]) -> bool {
    if dims.contains(&0) {
        return true;
    }
    let last: usize = dims.iter().zip(strides).map(|(d, s)| (d - 1) * s).sum();
    last < data.len()
}

/// `[B, L, H]` with one `[B, 1, H]` row per batch: (dim, rows per batch, batches).
fn rows_and_batch(x: &Layout, row: &Layout, op: &str) -> Result<(usize, usize)> {
    let (xd, rd) = (x.dims(), row.dims());
    if xd.len() != 3 || rd != [xd[0], 1, xd[2]] {
        bail!("{op}: x {xd:?} with per-batch rows {rd:?}");
    }
    Ok((xd[2], xd[1]))
}

/// GELU, tanh approximation.
pub struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fluxfit-gelu-tanh"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        k::gelu_tanh(x, &mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

/// AdaLN: LayerNorm without affine, then `·(1 + scale) + shift` (x, shift, scale).
pub struct AdaNorm {
    pub eps: f32,
}

impl CustomOp3 for AdaNorm {
    fn name(&self) -> &'static str {
        "fluxfit-ada-norm"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dim, per) = rows_and_batch(xl, sl, self.name())?;
        rows_and_batch(xl, cl, self.name())?;
        let x = contiguous(xs, xl, self.name())?;
        let shift = contiguous(ss, sl, self.name())?;
        let scale = contiguous(cs, cl, self.name())?;
        let mut y = vec![0f32; x.len()];
        if !y.is_empty() {
            k::ada_norm(x, dim, per, shift, scale, self.eps, &mut y);
        }
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }
}

/// The gated residual `x + gate·h` (x, gate, h).
pub struct GatedAdd;

impl CustomOp3 for GatedAdd {
    fn name(&self) -> &'static str {
        "fluxfit-gated-add"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        hs: &CpuStorage,
        hl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dim, per) = rows_and_batch(xl, gl, self.name())?;
        if hl.dims() != xl.dims() {
            bail!("{}: x {:?} and h {:?}", self.name(), xl.dims(), hl.dims());
        }
        let x = contiguous(xs, xl, self.name())?;
        let gate = contiguous(gs, gl, self.name())?;
        let h = contiguous(hs, hl, self.name())?;
        let mut y = vec![0f32; x.len()];
        if !y.is_empty() {
            k::gated_add(x, gate, h, dim, per, &mut y);
        }
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }
}

/// `x·wᵀ (+ b)` for `x` `[m, k]` and `w` `[n, k]`, any strides.
pub struct Linear;

impl Linear {
    fn run(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        b: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (xd, wd) = (xl.dims(), wl.dims());
        if xd.len() != 2 || wd.len() != 2 || xd[1] != wd[1] {
            bail!("fluxfit-linear: x {xd:?} against weight {wd:?}");
        }
        let (m, kk, n) = (xd[0], xd[1], wd[0]);
        let x = values(xs, xl, "fluxfit-linear")?;
        let w = values(ws, wl, "fluxfit-linear")?;
        if !reaches(x, xd, xl.stride()) || !reaches(w, wd, wl.stride()) {
            bail!("fluxfit-linear: a view reaches past its storage");
        }
        if b.is_some_and(|b| b.len() != n) {
            bail!(
                "fluxfit-linear: bias of {} for {n} outputs",
                b.map_or(0, <[f32]>::len)
            );
        }
        let mut y = vec![0f32; m * n];
        if m * n > 0 {
            let (xs, wst) = (xl.stride(), wl.stride());
            k::linear(
                Mat {
                    data: x,
                    rs: xs[0],
                    cs: xs[1],
                },
                Mat {
                    data: w,
                    rs: wst[0],
                    cs: wst[1],
                },
                b,
                m,
                n,
                kk,
                &mut y,
            );
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fluxfit-linear"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(xs, xl, ws, wl, None)
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fluxfit-linear-bias"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let b = contiguous(bs, bl, "fluxfit-linear-bias")?;
        self.run(xs, xl, ws, wl, Some(b))
    }
}

/// Softmax attention over `[B, H, L, D]` q, k, v (last dim contiguous) → `[B, L, H·D]`.
pub struct Attention;

impl Attention {
    fn heads<'a>(s: &'a CpuStorage, l: &Layout, dims: &[usize]) -> Result<Heads<'a>> {
        let data = values(s, l, "fluxfit-attention")?;
        let st = l.stride();
        if l.dims() != dims || st[3] != 1 || !reaches(data, dims, st) {
            bail!(
                "fluxfit-attention: {:?} (strides {st:?}) against {dims:?} with a contiguous last dim",
                l.dims()
            );
        }
        Ok(Heads {
            data,
            sb: st[0],
            sh: st[1],
            sl: st[2],
        })
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fluxfit-attention"
    }
    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = ql.dims().to_vec();
        if dims.len() != 4 {
            bail!("fluxfit-attention: q is {dims:?}, not [B, H, L, D]");
        }
        let (q, kk, v) = (
            Self::heads(qs, ql, &dims)?,
            Self::heads(ks, kl, &dims)?,
            Self::heads(vs, vl, &dims)?,
        );
        let (b, h, l, d) = (dims[0], dims[1], dims[2], dims[3]);
        let mut out = vec![0f32; b * l * h * d];
        if !out.is_empty() {
            k::attention(q, kk, v, (b, h, l, d), &mut out);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, l, h * d))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor as C, D};

    use crate::model::attention::attention;
    use crate::model::ops::{layer_norm_plain, modulate};
    use crate::tensor::Tensor as _;

    fn max_rel(a: &C, b: &C) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let m = b.abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap().max(1.0)
    }

    fn randn(shape: &[usize], seed: u64) -> C {
        let n = shape.iter().product();
        let v = crate::noise::torch_randn(seed, n, crate::noise::NoiseKind::TorchF32);
        C::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Each kernel against the same math composed from candle's ops, to f32 rounding, on
    /// shapes with two batches, odd lengths and strided inputs.
    #[test]
    fn kernels_match_the_composed_ops() -> crate::Result<()> {
        let x = randn(&[2, 37, 96], 1).affine(3.0, 0.5)?;
        let mods = randn(&[2, 1, 288], 2);
        let (shift, scale, gate) = (
            mods.narrow(D::Minus1, 0, 96)?,
            mods.narrow(D::Minus1, 96, 96)?,
            mods.narrow(D::Minus1, 192, 96)?,
        );
        let want = modulate(&layer_norm_plain(&x, 1e-6)?, &shift, &scale)?;
        let got = x.ada_norm_cpu(&shift, &scale, 1e-6)?;
        assert!(
            max_rel(&got, &want) < 1e-6,
            "ada_norm {}",
            max_rel(&got, &want)
        );

        let h = randn(&[2, 37, 96], 3);
        let want = x.add(&gate.broadcast_mul(&h)?)?;
        assert_eq!(
            max_rel(&x.gated_add_cpu(&gate, &h)?, &want),
            0.0,
            "gated_add"
        );

        let g = randn(&[5, 333], 4).affine(4.0, 0.0)?;
        assert!(max_rel(&g.gelu_cpu()?, &g.gelu()?) < 1e-6, "gelu");

        // A weight read through a transposed view, with and without a bias.
        let w = randn(&[40, 96], 5).t()?.contiguous()?.t()?;
        let b = randn(&[40], 6);
        let x2 = x.reshape((74, 96))?;
        let want = x2.matmul(&w.t()?)?;
        assert!(max_rel(&x2.linear_cpu(&w, None)?, &want) < 1e-6, "linear");
        let want = want.broadcast_add(&b)?;
        assert!(
            max_rel(&x2.linear_cpu(&w, Some(&b))?, &want) < 1e-6,
            "linear+bias"
        );

        // q from a fused qkv projection: strided heads, as the flow model's split leaves them.
        for l in [1, 63, 64, 65, 200] {
            let qkv = randn(&[2, l, 3, 3, 32], 7 + l as u64).permute((2, 0, 3, 1, 4))?;
            let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
            let a = attention(&q, &k, &v, None)?;
            let want = a.transpose(1, 2)?.reshape((2, l, 96))?;
            let got = q.attention_cpu(&k, &v)?;
            assert!(
                max_rel(&got, &want) < 1e-5,
                "attention L={l}: {}",
                max_rel(&got, &want)
            );
        }
        Ok(())
    }

    /// Inputs the kernels do not take are refused, not misread.
    #[test]
    fn kernels_refuse_what_they_do_not_take() {
        let x = randn(&[2, 4, 8], 1);
        let wrong = randn(&[1, 1, 8], 2);
        assert!(x.ada_norm_cpu(&wrong, &wrong, 1e-6).is_err());
        assert!(x.gated_add_cpu(&wrong, &x).is_err());
        let w = randn(&[3, 7], 3);
        assert!(x.reshape((8, 8)).unwrap().linear_cpu(&w, None).is_err());
        let bf = x.to_dtype(DType::BF16).unwrap();
        assert!(bf.gelu_cpu().is_err());
    }
}
