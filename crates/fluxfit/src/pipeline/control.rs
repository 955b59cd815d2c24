//! FLUX.1 Canny / Depth structural control (docs/flux.md §3 `prepare_control`): the control image's
//! latent joins the noisy latent channel-wise (64 + 64 = the model's 128 input features).

use candle_core::Tensor;

use super::model::Model;
use super::text2image::{Cond, Event, Generated, Request, Start};
use crate::error::{Error, Result};
use crate::image::Rgb8;

/// The reference's Canny thresholds (`CannyImageEncoder(min_t=50, max_t=200)`).
pub const CANNY_LOW: f64 = 50.0;
pub const CANNY_HIGH: f64 = 200.0;

/// The size the control image is resized to for a `width` × `height` request: 16·⌈·/16⌉.
pub fn control_size(width: usize, height: usize) -> (usize, usize) {
    (16 * width.div_ceil(16), 16 * height.div_ceil(16))
}

/// The Canny control image of the reference: the image goes to [−1, 1] (`b/127.5 − 1`) and back
/// to bytes (`((x + 1)·127.5)` truncated, in f32, as the encoder's numpy conversion does),
/// then `cv2.Canny(·, 50, 200)`; the edges (0/255) are repeated to three channels.
pub fn canny_control(img: &Rgb8) -> Rgb8 {
    let bytes: Vec<u8> = img
        .data
        .iter()
        .map(|&b| {
            let x = b as f32 / 127.5 - 1.0;
            ((x + 1.0) * 127.5) as u8
        })
        .collect();
    let edges = crate::canny::canny_rgb(&bytes, img.width, img.height, CANNY_LOW, CANNY_HIGH);
    Rgb8 {
        width: img.width,
        height: img.height,
        data: edges.iter().flat_map(|&e| [e, e, e]).collect(),
    }
}

impl Model {
    /// The control latent `[1, L, 64]`: encoded, rounded through bf16, packed, in the compute
    /// dtype, on the compute device.
    pub fn control_conditioning(&self, image: &Tensor) -> Result<Tensor> {
        super::run::control_latent(self, image)
    }

    /// Structural control: `image` `[1, 3, H, W]` in [−1, 1] is the control image (Canny
    /// edges or a depth map, already made) at the request's size; needs a control model (flow
    /// in_channels 128: FLUX.1 Canny/Depth, or dev with a control LoRA). `embeddings`:
    /// already encoded text (`req.prompt` is then not read).
    pub fn control(
        &self,
        req: &Request,
        image: &Tensor,
        embeddings: Option<(&Tensor, &Tensor)>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generated> {
        let need = 64 + 64;
        if self.flow.net.config.in_channels != need {
            return Err(Error::InvalidRequest(format!(
                "a control image needs a Canny or Depth model (flow in_channels {need}), or dev with a control LoRA (--lora); {} has in_channels {}",
                self.name, self.flow.net.config.in_channels
            )));
        }
        if image.dims() != [1, 3, req.height, req.width] {
            return Err(Error::InvalidRequest(format!(
                "the control image is {:?}, the request needs [1, 3, {}, {}]",
                image.dims(),
                req.height,
                req.width
            )));
        }
        if !req.width.is_multiple_of(16) || !req.height.is_multiple_of(16) {
            return Err(Error::InvalidRequest(format!(
                "control needs sides that are multiples of 16, not {}x{}",
                req.width, req.height
            )));
        }
        self.conditioned(
            req,
            embeddings,
            on_event,
            || self.control_conditioning(image),
            |txt, vec, cond, on_event| self.control_from_latent(req, cond, txt, vec, on_event),
        )
    }

    /// Denoise and decode with a control latent already made ([`Model::control_conditioning`])
    /// and encoded text (`req.prompt` is not read).
    pub fn control_from_latent(
        &self,
        req: &Request,
        cond: &Tensor,
        txt: &Tensor,
        vec: &Tensor,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generated> {
        self.denoise_decode(req, txt, vec, Start::Noise, Cond::Channels(cond), on_event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_images_are_rounded_up_to_16() {
        assert_eq!(control_size(1024, 1024), (1024, 1024));
        assert_eq!(control_size(1000, 770), (1008, 784));
    }
}
