//! A running generation's line back to whoever started it: a request to stop, checked between
//! denoising steps, and cheap previews of the latent every few steps. The CLI runs without one;
//! a server attaches one per job ([`super::Model::set_watch`]).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::image::Rgb8;
use crate::sampling;

/// A preview of the image being denoised, after `step` of `total` steps.
pub struct Preview {
    pub step: usize,
    pub total: usize,
    pub image: Rgb8,
}

/// Cancellation and previews of one job.
pub struct Watch {
    cancelled: AtomicBool,
    /// A preview after every this many steps (and after the last); 0: none.
    preview_every: usize,
    on_preview: Box<dyn Fn(Preview) + Send + Sync>,
}

impl Watch {
    pub fn new(preview_every: usize, on_preview: impl Fn(Preview) + Send + Sync + 'static) -> Self {
        Self {
            cancelled: AtomicBool::new(false),
            preview_every,
            on_preview: Box::new(on_preview),
        }
    }

    /// Asks the run to stop: it ends with [`crate::Error::Cancelled`] after the step in
    /// progress, dropping what it holds.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Between steps: stops a cancelled run, hands out a preview when one is due. `x` is the
    /// packed latent `[1, L, 64]` of a `lat_h` × `lat_w` latent.
    pub(crate) fn after_step(
        &self,
        step: usize,
        total: usize,
        x: &Tensor,
        (lat_h, lat_w): (usize, usize),
    ) -> Result<()> {
        if self.is_cancelled() {
            return Err(crate::Error::Cancelled { step, total });
        }
        let due =
            self.preview_every > 0 && (step.is_multiple_of(self.preview_every) || step == total);
        if due {
            let latent = sampling::unpack(&x.to_dtype(DType::F32)?, lat_h, lat_w)?;
            (self.on_preview)(Preview {
                step,
                total,
                image: latent_preview(&latent)?,
            });
        }
        Ok(())
    }
}

/// Approximate RGB of a FLUX latent `[1, 16, h, w]` (the sampler's scaled latent) at the
/// latent's resolution, without the VAE: a fixed linear map of the 16 channels plus a bias,
/// fitted by ComfyUI to FLUX.1's autoencoder (its `latent_rgb_factors`). Costs one small
/// matmul, so a preview every step is affordable.
pub fn latent_preview(latent: &Tensor) -> Result<Rgb8> {
    let (_, c, h, w) = latent.dims4()?;
    if c != RGB_FACTORS.len() {
        return Err(crate::Error::InvalidRequest(format!(
            "a preview needs a 16-channel latent, got {c} channels"
        )));
    }
    let factors: Vec<f32> = RGB_FACTORS.iter().flatten().copied().collect();
    let factors = Tensor::from_vec(factors, (c, 3), latent.device())?;
    let bias = Tensor::from_vec(RGB_BIAS.to_vec(), (1, 3), latent.device())?;
    // [h·w, 16] × [16, 3] + bias, in [−1, 1].
    let rgb = latent
        .get(0)?
        .reshape((c, h * w))?
        .t()?
        .matmul(&factors)?
        .broadcast_add(&bias)?
        .clamp(-1f32, 1f32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(Rgb8 {
        width: w,
        height: h,
        data: rgb.iter().map(|&x| (127.5 * (x + 1.0)) as u8).collect(),
    })
}

/// Rows: latent channels; columns: R, G, B.
const RGB_FACTORS: [[f32; 3]; 16] = [
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
];
const RGB_BIAS: [f32; 3] = [-0.0329, -0.0718, -0.0851];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_is_the_linear_map_at_latent_resolution() {
        // A latent that is 1 in channel 4 only: the preview is that row plus the bias.
        let mut v = vec![0f32; 16 * 2 * 3];
        for p in 0..6 {
            v[4 * 6 + p] = 1.0;
        }
        let latent = Tensor::from_vec(v, (1, 16, 2, 3), &candle_core::Device::Cpu).unwrap();
        let img = latent_preview(&latent).unwrap();
        assert_eq!((img.width, img.height), (3, 2));
        let want: Vec<u8> = (0..3)
            .map(|i| (127.5 * (RGB_FACTORS[4][i] + RGB_BIAS[i] + 1.0)) as u8)
            .collect();
        assert_eq!(&img.data[..3], &want[..]);
        assert_eq!(&img.data[15..18], &want[..]);
    }

    #[test]
    fn a_cancelled_watch_stops_after_the_step() {
        let w = Watch::new(0, |_| {});
        let x = Tensor::zeros((1, 4, 64), DType::F32, &candle_core::Device::Cpu).unwrap();
        w.after_step(1, 4, &x, (4, 4)).unwrap();
        w.cancel();
        let e = w.after_step(2, 4, &x, (4, 4)).unwrap_err();
        assert!(
            matches!(e, crate::Error::Cancelled { step: 2, total: 4 }),
            "{e}"
        );
    }

    #[test]
    fn previews_come_every_n_steps_and_after_the_last() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let w = Watch::new(2, move |p| s.lock().unwrap().push(p.step));
        let x = Tensor::zeros((1, 4, 64), DType::F32, &candle_core::Device::Cpu).unwrap();
        for step in 1..=5 {
            w.after_step(step, 5, &x, (4, 4)).unwrap();
        }
        assert_eq!(*seen.lock().unwrap(), vec![2, 4, 5]);
    }
}
