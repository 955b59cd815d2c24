//! Text to image, as the reference's t2i CLI does it: encode the prompt, draw the seed's noise,
//! integrate the flow over the schedule, decode.

use candle_core::{DType, Tensor};

use super::model::Model;
use crate::error::{Error, Result};
use crate::model::flow::FlowInputs;
use crate::noise::NoiseKind;
use crate::sampling;

/// Largest side accepted without an explicit opt-in: beyond it memory and time explode.
pub const MAX_SIDE: usize = 4096;
/// Smallest side: below it the latent grid is degenerate.
pub const MIN_SIDE: usize = 64;

/// One text-to-image request.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Text2Image {
    pub prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f32,
    pub seed: u64,
    /// T5 sequence length (the variant's default unless overridden).
    pub t5_tokens: usize,
    #[serde(skip)]
    pub noise: NoiseKind,
}

impl Text2Image {
    /// Refuses requests that cannot give a sensible image, naming the value and the fix.
    pub fn validate(&self, allow_large: bool) -> Result<()> {
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if v < MIN_SIDE {
                return Err(Error::InvalidRequest(format!(
                    "{name} {v} is below the minimum of {MIN_SIDE} pixels"
                )));
            }
            if v > MAX_SIDE && !allow_large {
                return Err(Error::InvalidRequest(format!(
                    "{name} {v} is above {MAX_SIDE} pixels; pass --allow-large if you mean it"
                )));
            }
        }
        if self.steps == 0 {
            return Err(Error::InvalidRequest("steps must be at least 1".into()));
        }
        if self.t5_tokens == 0 {
            return Err(Error::InvalidRequest("t5 tokens must be at least 1".into()));
        }
        if !self.guidance.is_finite() {
            return Err(Error::InvalidRequest(format!(
                "guidance {} is not a number",
                self.guidance
            )));
        }
        Ok(())
    }
}

/// Progress of a generation, for bars and event streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A phase begins: "encode", "denoise", "decode".
    Phase(&'static str),
    /// A denoising step finished.
    Step { step: usize, total: usize },
}

/// What a generation produced.
pub struct Generated {
    /// Final latents `[1, 16, h, w]` (f32).
    pub latents: Tensor,
    /// Decoded image `[1, 3, H, W]` (f32, not clamped), H and W rounded up to multiples of 16.
    pub image: Tensor,
    pub timesteps: Vec<f32>,
}

/// Rounds through bf16 as the reference's embedders do with the encoders' outputs.
fn through_bf16(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(t.to_dtype(DType::BF16)?.to_dtype(dtype)?)
}

impl Model {
    /// T5 sequence `[1, L, d]` and CLIP pooled vector `[1, d]`, rounded through bf16.
    pub fn encode_text(&self, prompt: &str, t5_tokens: usize) -> Result<(Tensor, Tensor)> {
        let dev = self.device();
        let ids = self.t5_tokenizer.encode(prompt, t5_tokens)?;
        let ids = Tensor::from_vec(ids, (1, t5_tokens), dev)?;
        let txt = self.t5.net.forward(&self.t5.weights, &ids)?;
        let ids = self.clip_tokenizer.encode(prompt, 77)?;
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), dev)?;
        let (_, pooled) = self.clip.net.forward(&self.clip.weights, &ids)?;
        Ok((
            through_bf16(&txt, self.dtype())?,
            through_bf16(&pooled, self.dtype())?,
        ))
    }

    pub fn text_to_image(
        &self,
        req: &Text2Image,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generated> {
        on_event(Event::Phase("encode"));
        let (txt, vec) = self.encode_text(&req.prompt, req.t5_tokens)?;
        self.image_from_embeddings(req, &txt, &vec, on_event)
    }

    /// Denoise and decode for already encoded text (`req.prompt` is not read).
    pub fn image_from_embeddings(
        &self,
        req: &Text2Image,
        txt: &Tensor,
        vec: &Tensor,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generated> {
        let dev = self.device().clone();
        let dtype = self.dtype();
        let txt = txt.to_dtype(dtype)?;
        let vec = vec.to_dtype(dtype)?;
        on_event(Event::Phase("denoise"));
        let (lat_h, lat_w) = sampling::latent_hw(req.height, req.width);
        let x = sampling::noise(1, req.height, req.width, req.seed, req.noise, &dev)?
            .to_dtype(dtype)?;
        let img = sampling::pack(&x)?;
        let img_ids = sampling::image_ids(1, lat_h, lat_w, 0.0, &dev)?;
        let txt_ids = sampling::text_ids(1, txt.dim(1)?, &dev)?;
        let timesteps = sampling::schedule(req.steps, img.dim(1)?, self.variant.shift_schedule());
        let guidance = Tensor::new(&[req.guidance], &dev)?.to_dtype(dtype)?;
        let flow = &self.flow;
        let velocity = |x: &Tensor, t: f32| -> Result<Tensor> {
            let t = Tensor::new(&[t], &dev)?.to_dtype(dtype)?;
            flow.net.forward(
                &flow.weights,
                &FlowInputs {
                    img: x,
                    img_ids: &img_ids,
                    txt: &txt,
                    txt_ids: &txt_ids,
                    timesteps: &t,
                    y: &vec,
                    guidance: flow.net.config.guidance_embed.then_some(&guidance),
                },
            )
        };
        let x = sampling::denoise(img, &timesteps, velocity, |step, total| {
            on_event(Event::Step { step, total })
        })?;

        on_event(Event::Phase("decode"));
        let latents = sampling::unpack(&x.to_dtype(DType::F32)?, lat_h, lat_w)?;
        let image = self
            .ae
            .net
            .decode(&self.ae.weights, &latents)?
            .to_dtype(DType::F32)?;
        Ok(Generated {
            latents,
            image,
            timesteps,
        })
    }
}
