//! Sampling as pure functions (docs/flux.md §3): latent geometry, packing, position ids, the timestep
//! schedule and the Euler loop on the predicted velocity. Floating-point steps follow the
//! reference's order and precision so schedules agree to the last bit.

use candle_core::DType;

use crate::error::Result;
use crate::noise::{torch_randn, NoiseKind};
use crate::tensor::Tensor;

/// Latent channels of the FLUX autoencoder.
pub const LATENT_CHANNELS: usize = 16;

/// Latent height and width for an image: 2·⌈px/16⌉ (the 2×2 packing needs even sides).
pub fn latent_hw(height: usize, width: usize) -> (usize, usize) {
    (2 * height.div_ceil(16), 2 * width.div_ceil(16))
}

/// Image tokens of a `height`×`width` image.
pub fn image_seq_len(height: usize, width: usize) -> usize {
    let (h, w) = latent_hw(height, width);
    (h / 2) * (w / 2)
}

/// Initial noise `[n, 16, h, w]` as the reference draws it for `seed`, in f32.
pub fn noise<T: Tensor>(
    n: usize,
    height: usize,
    width: usize,
    seed: u64,
    kind: NoiseKind,
    device: &T::Device,
) -> Result<T> {
    let (h, w) = latent_hw(height, width);
    let numel = n * LATENT_CHANNELS * h * w;
    T::from_f32(&[n, LATENT_CHANNELS, h, w], &T::host_of(device), || {
        torch_randn(seed, numel, kind)
    })?
    .to_device(device)
}

/// "b c (h 2) (w 2) -> b (h w) (c 2 2)": channel-major, then the row, then the column of the patch.
pub fn pack<T: Tensor>(x: &T) -> Result<T> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape(&[b, c, h / 2, 2, w / 2, 2])?
        .permute(&[0, 2, 4, 1, 3, 5])?
        .reshape(&[b, (h / 2) * (w / 2), c * 4])
}

/// Inverse of [`pack`] for a latent of `lat_h`×`lat_w`.
pub fn unpack<T: Tensor>(x: &T, lat_h: usize, lat_w: usize) -> Result<T> {
    let (b, _, f) = x.dims3()?;
    let c = f / 4;
    x.reshape(&[b, lat_h / 2, lat_w / 2, c, 2, 2])?
        .permute(&[0, 3, 1, 4, 2, 5])?
        .reshape(&[b, c, lat_h, lat_w])
}

/// Position ids `[b, (lat_h/2)·(lat_w/2), 3]` = (axis0, row, col), row-major. Generated images use
/// axis0 = 0; Kontext's conditioning tokens use 1.
pub fn image_ids<T: Tensor>(
    b: usize,
    lat_h: usize,
    lat_w: usize,
    axis0: f32,
    device: &T::Device,
) -> Result<T> {
    let (h, w) = (lat_h / 2, lat_w / 2);
    let ids = T::from_f32(&[1, h * w, 3], device, || {
        let mut v = Vec::with_capacity(h * w * 3);
        for r in 0..h {
            for c in 0..w {
                v.extend_from_slice(&[axis0, r as f32, c as f32]);
            }
        }
        v
    })?;
    if b > 1 {
        T::cat(&vec![&ids; b], 0)
    } else {
        Ok(ids)
    }
}

/// Text tokens all sit at position zero.
pub fn text_ids<T: Tensor>(b: usize, len: usize, device: &T::Device) -> Result<T> {
    T::zeros(&[b, len, 3], DType::F32, device)
}

/// `torch.linspace` in f32: the first half counts up from `start`, the second down from `end`.
pub fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// μ(L) through (256, 0.5) and (4096, 1.15), in f64 as Python computes it.
pub fn shift_mu(image_seq_len: usize) -> f64 {
    let (x1, y1, x2, y2) = (256.0, 0.5, 4096.0, 1.15);
    let m = (y2 - y1) / (x2 - x1);
    let b = y1 - m * x1;
    m * image_seq_len as f64 + b
}

/// e^μ / (e^μ + 1/t − 1), in f32 as the reference evaluates it on a tensor (torch turns
/// `scalar / tensor` into `tensor.reciprocal() * scalar`); t = 0 stays 0.
pub fn time_shift(mu: f64, t: f32) -> f32 {
    let e = mu.exp() as f32;
    (1.0 / (e + (1.0 / t - 1.0))) * e
}

/// The `steps + 1` timesteps from 1 to 0, shifted towards 1 for larger images unless `shift` is
/// off (schnell).
pub fn schedule(steps: usize, image_seq_len: usize, shift: bool) -> Vec<f32> {
    let t = linspace(1.0, 0.0, steps + 1);
    if !shift {
        return t;
    }
    let mu = shift_mu(image_seq_len);
    t.into_iter().map(|t| time_shift(mu, t)).collect()
}

/// img2img's first timestep index: `int((1 − strength)·steps)`, the product in f64 and
/// truncated, as Python does it (demo_st.py); `strength` 1 starts from pure noise, 0 skips
/// denoising.
pub fn img2img_t_idx(strength: f64, steps: usize) -> usize {
    (((1.0 - strength) * steps as f64) as usize).min(steps)
}

/// img2img's start (docs/flux.md §3, demo_st.py): with `t = timesteps[t_idx]`,
/// `x = t·noise + (1 − t)·init_latent`, and the remaining schedule `timesteps[t_idx..]`. Each
/// product and the sum are rounded to `dtype` as torch does with a `dtype` state (f32 maths).
pub fn img2img_start<T: Tensor>(
    noise: &T,
    init_latent: &T,
    timesteps: &[f32],
    strength: f64,
    dtype: DType,
) -> Result<(T, Vec<f32>)> {
    let steps = timesteps.len().saturating_sub(1);
    let t_idx = img2img_t_idx(strength, steps);
    let t = timesteps[t_idx] as f64;
    let f32_of = |x: &T| -> Result<T> { x.to_dtype(dtype)?.to_dtype(DType::F32) };
    let a = f32_of(&f32_of(noise)?.affine(t, 0.0)?)?;
    let b = f32_of(&f32_of(init_latent)?.affine(1.0 - t, 0.0)?)?;
    let x = a.add(&b)?.to_dtype(dtype)?;
    Ok((x, timesteps[t_idx..].to_vec()))
}

/// Euler integration of the flow: x ← x + (t_prev − t_curr)·v(x, t_curr) over consecutive
/// timesteps. `velocity` is the model; `on_step(i, n, x)` is called after each step with the
/// state, and an error from it ends the loop (a cancelled run).
pub fn denoise<T: Tensor>(
    x: T,
    timesteps: &[f32],
    velocity: impl FnMut(&T, f32) -> Result<T>,
    on_step: impl FnMut(usize, usize, &T) -> Result<()>,
) -> Result<T> {
    denoise_with(x, timesteps, velocity, |x, _| Ok(x), on_step)
}

/// [`denoise`] with `after_step(x, t_prev)` applied to the state after each step (holding
/// known latents in place while the rest is generated, see [`hold_known`]).
pub fn denoise_with<T: Tensor>(
    mut x: T,
    timesteps: &[f32],
    mut velocity: impl FnMut(&T, f32) -> Result<T>,
    mut after_step: impl FnMut(T, f32) -> Result<T>,
    mut on_step: impl FnMut(usize, usize, &T) -> Result<()>,
) -> Result<T> {
    let n = timesteps.len().saturating_sub(1);
    for (i, pair) in timesteps.windows(2).enumerate() {
        let (t_curr, t_prev) = (pair[0], pair[1]);
        let v = velocity(&x, t_curr)?;
        // Python subtracts the two floats in f64, then the tensor op rounds the factor to f32.
        let dt = (t_prev as f64 - t_curr as f64) as f32;
        let step = v.to_dtype(x.dtype())?.affine(dt as f64, 0.0)?;
        let moved = x.add(&step)?;
        drop((x, step));
        x = after_step(moved, t_prev)?;
        on_step(i + 1, n, &x)?;
    }
    Ok(x)
}

/// Latent inpainting with any text-to-image model (the method of diffusers'
/// `FluxInpaintPipeline`): tokens where `mask` is 1 are replaced by the known latent noised to
/// time `t`, `t·noise + (1 − t)·known`, so the generated rest is denoised in their context.
/// `x`, `noise`, `known` packed `[1, L, 64]`; `mask` `[1, L, 1]` of 0/1.
pub fn hold_known<T: Tensor>(x: &T, noise: &T, known: &T, mask: &T, t: f32) -> Result<T> {
    let dtype = x.dtype();
    let f = |a: &T| a.to_dtype(DType::F32);
    let held = f(noise)?
        .affine(t as f64, 0.0)?
        .add(&f(known)?.affine(1.0 - t as f64, 0.0)?)?;
    let m = f(mask)?;
    let kept = m.broadcast_mul(&held)?;
    let free = m.affine(-1.0, 1.0)?.broadcast_mul(&f(x)?)?;
    kept.add(&free)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn schnell_schedule_is_linear() {
        assert_eq!(schedule(4, 4096, false), vec![1.0, 0.75, 0.5, 0.25, 0.0]);
    }

    #[test]
    fn shift_mu_matches_spec_examples() {
        assert!((shift_mu(4080) - 1.1473).abs() < 1e-4);
        assert!((shift_mu(4096) - 1.15).abs() < 1e-9);
    }

    #[test]
    fn shifted_schedule_keeps_endpoints() {
        let s = schedule(10, 1024, true);
        assert_eq!(s[0], 1.0);
        assert_eq!(*s.last().unwrap(), 0.0);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn pack_unpack_roundtrip_and_order() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 16.0 * 4.0 * 6.0, &dev)?.reshape((1, 16, 4, 6))?;
        let p = pack(&x)?;
        assert_eq!(p.dims(), &[1, 6, 64]);
        // token 0, features: channel 0's 2×2 patch first: (0,0), (0,1), (1,0), (1,1).
        let row: Vec<f32> = p.get(0)?.get(0)?.to_vec1()?;
        assert_eq!(&row[..5], &[0.0, 1.0, 6.0, 7.0, 24.0]);
        let u = unpack(&p, 4, 6)?;
        let diff = (&u - &x)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }

    #[test]
    fn image_ids_are_row_major() -> Result<()> {
        let ids: Tensor = image_ids(1, 4, 6, 0.0, &Device::Cpu)?;
        let v: Vec<Vec<f32>> = ids.get(0)?.to_vec2()?;
        assert_eq!(v.len(), 6);
        assert_eq!(v[1], vec![0.0, 0.0, 1.0]);
        assert_eq!(v[3], vec![0.0, 1.0, 0.0]);
        Ok(())
    }
}
