//! Text to image (and img2img), as the reference's t2i CLI and demo do it: encode the prompt,
//! draw the seed's noise, integrate the flow over the schedule, decode; and the phases every
//! generation mode shares (`conditioned`, `denoise_decode`), which Fill, Control, Kontext and
//! region generation feed with their conditioning.

use candle_core::{DType, Tensor};

use super::model::Model;
use crate::error::{Error, Result};
use crate::memory::ledger::MemoryReport;
use crate::memory::residency::{Residency, Weights};
use crate::model::flow::FlowInputs;
use crate::noise::NoiseKind;
use crate::sampling;
use crate::variant::Variant;

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

/// img2img's init image (spec §3, demo_st.py): the generation starts from
/// `t·noise + (1 − t)·encode(image)` at `t = timesteps[int((1 − strength)·steps)]`.
#[derive(Debug, Clone)]
pub struct ImageInit {
    /// `[1, 3, height, width]` f32 in [−1, 1], the request's size (see
    /// [`crate::image::init_image`]).
    pub image: Tensor,
    /// In [0, 1]: 1 ignores the image, 0 returns it (re-encoded).
    pub strength: f64,
}

impl ImageInit {
    pub fn validate(&self, req: &Text2Image) -> Result<()> {
        if !(0.0..=1.0).contains(&self.strength) {
            return Err(Error::InvalidRequest(format!(
                "strength {} is outside [0, 1]",
                self.strength
            )));
        }
        let dims = self.image.dims();
        if dims != [1, 3, req.height, req.width] {
            return Err(Error::InvalidRequest(format!(
                "the init image is {dims:?}, the request needs [1, 3, {}, {}]",
                req.height, req.width
            )));
        }
        if !req.width.is_multiple_of(16) || !req.height.is_multiple_of(16) {
            return Err(Error::InvalidRequest(format!(
                "img2img needs sides that are multiples of 16, not {}x{}",
                req.width, req.height
            )));
        }
        Ok(())
    }
}

/// Where denoising starts.
#[derive(Clone, Copy)]
pub(crate) enum Start<'a> {
    /// Text to image: the seed's noise, the whole schedule.
    Noise,
    /// img2img: the init latent and the strength.
    Img2Img(&'a Tensor, f64),
    /// Latent inpainting: the seed's noise, with the packed known latent `[1, L, 64]` held
    /// where the token mask `[1, L, 1]` is 1 (see [`sampling::hold_known`]).
    Hold(&'a Tensor, &'a Tensor),
}

/// What joins the noisy latent at every flow call.
#[derive(Clone, Copy)]
pub(crate) enum Cond<'a> {
    None,
    /// Fill (`[1, L, 320]`) and control (`[1, L, 64]`): concatenated channel-wise.
    Channels(&'a Tensor),
    /// Kontext: conditioning tokens `[1, Lc, 64]` with their ids `[1, Lc, 3]`, appended to the
    /// image sequence; the prediction is cut back to the target tokens.
    Tokens(&'a Tensor, &'a Tensor),
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
    /// What the run held on the compute device, per phase.
    pub memory: MemoryReport,
}

/// Rounds through bf16 as the reference's embedders do with the encoders' outputs.
fn through_bf16(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(t.to_dtype(DType::BF16)?.to_dtype(dtype)?)
}

impl Model {
    /// Runs `f` as phase `name` of the current run: the ledger's figures are kept per phase, and
    /// the phase's components are released at its end (which drops all but resident weights),
    /// whether `f` succeeded or not.
    pub(crate) fn phase<T>(
        &self,
        name: &'static str,
        components: &[&Residency],
        on_event: &mut dyn FnMut(Event),
        f: impl FnOnce(&mut dyn FnMut(Event)) -> Result<T>,
    ) -> Result<T> {
        on_event(Event::Phase(name));
        self.ledger().begin_phase(name);
        let out = f(on_event);
        for c in components {
            c.release();
        }
        self.ledger().end_phase();
        out
    }

    /// T5 sequence `[1, L, d]` and CLIP pooled vector `[1, d]`, rounded through bf16, on the
    /// compute device (the encoders may compute elsewhere under a `cpu` placement).
    pub fn encode_text(&self, prompt: &str, t5_tokens: usize) -> Result<(Tensor, Tensor)> {
        let dev = self.device();
        let t5 = &self.t5.weights;
        let ids = self.t5_tokenizer.encode(prompt, t5_tokens)?;
        let ids = Tensor::from_vec(ids, (1, t5_tokens), t5.device())?;
        let txt = self.t5.net.forward(t5, &ids)?;
        let clip = &self.clip.weights;
        let ids = self.clip_tokenizer.encode(prompt, 77)?;
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), clip.device())?;
        let (_, pooled) = self.clip.net.forward(clip, &ids)?;
        Ok((
            through_bf16(&txt, self.dtype())?.to_device(dev)?,
            through_bf16(&pooled, self.dtype())?.to_device(dev)?,
        ))
    }

    pub fn text_to_image(
        &self,
        req: &Text2Image,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generated> {
        self.expect_conditioning(0)?;
        self.ledger().begin_run();
        let encoders = [&self.t5.weights, &self.clip.weights];
        let encoded = self.phase("encode", &encoders, on_event, |_| {
            self.encode_text(&req.prompt, req.t5_tokens)
        });
        let out = encoded.and_then(|(txt, vec)| {
            self.denoise_decode(req, &txt, &vec, Start::Noise, Cond::None, on_event)
        });
        let memory = self.ledger().end_run();
        out.map(|g| Generated { memory, ..g })
    }

    /// The scaled latent `[1, 16, H/8, W/8]` (f32, on the compute device) of an image in
    /// [−1, 1], tiled when the plan has a VAE tile.
    pub fn encode_image(&self, image: &Tensor) -> Result<Tensor> {
        let ae = &self.ae;
        let x = image.to_device(ae.weights.device())?;
        let z = match self.plan().vae_tile {
            Some(t) => ae.net.encode_tiled(&ae.weights, &x, t)?,
            None => ae.net.encode(&ae.weights, &x)?,
        };
        Ok(z.to_dtype(DType::F32)?.to_device(self.device())?)
    }

    /// img2img (spec §3, demo_st.py): text and init image encoded in the encode phase, then
    /// the remaining schedule from the noised init latent. `embeddings`: already encoded text
    /// (`req.prompt` is then not read).
    pub fn image_to_image(
        &self,
        req: &Text2Image,
        init: &ImageInit,
        embeddings: Option<(&Tensor, &Tensor)>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generated> {
        init.validate(req)?;
        self.expect_conditioning(0)?;
        self.conditioned(
            req,
            embeddings,
            on_event,
            || self.encode_image(&init.image),
            |txt, vec, z, on_event| {
                let start = Start::Img2Img(z, init.strength);
                self.denoise_decode(req, txt, vec, start, Cond::None, on_event)
            },
        )
    }

    /// A generation with image inputs: the encode phase makes the text embeddings (unless
    /// given; `req.prompt` is then not read) and, with the autoencoder, whatever `condition`
    /// derives from the images; `run` denoises and decodes.
    pub(crate) fn conditioned<C>(
        &self,
        req: &Text2Image,
        embeddings: Option<(&Tensor, &Tensor)>,
        on_event: &mut dyn FnMut(Event),
        condition: impl FnOnce() -> Result<C>,
        run: impl FnOnce(&Tensor, &Tensor, &C, &mut dyn FnMut(Event)) -> Result<Generated>,
    ) -> Result<Generated> {
        self.ledger().begin_run();
        let encoders = [&self.t5.weights, &self.clip.weights, &self.ae.weights];
        let encoded = self.phase("encode", &encoders, on_event, |_| {
            let (txt, vec) = match embeddings {
                Some((t, v)) => (t.clone(), v.clone()),
                None => self.encode_text(&req.prompt, req.t5_tokens)?,
            };
            Ok((txt, vec, condition()?))
        });
        let out = encoded.and_then(|(txt, vec, c)| run(&txt, &vec, &c, on_event));
        let memory = self.ledger().end_run();
        out.map(|g| Generated { memory, ..g })
    }

    /// Denoise and decode for already encoded text (`req.prompt` is not read).
    pub fn image_from_embeddings(
        &self,
        req: &Text2Image,
        txt: &Tensor,
        vec: &Tensor,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generated> {
        self.ledger().begin_run();
        let out = self.denoise_decode(req, txt, vec, Start::Noise, Cond::None, on_event);
        let memory = self.ledger().end_run();
        out.map(|g| Generated { memory, ..g })
    }

    /// Refuses, naming what is missing, a run whose conditioning does not fill the flow
    /// model's input (a Canny model asked for plain text to image, say).
    fn expect_conditioning(&self, channels: usize) -> Result<()> {
        let (given, need) = (64 + channels, self.flow.net.config.in_channels);
        if given == need {
            return Ok(());
        }
        let what = match self.variant {
            Variant::DevFill => "a mask and an image: use `fluxfit fill`".to_string(),
            Variant::DevCanny | Variant::DevDepth => {
                "a control image (--control-image)".to_string()
            }
            _ => format!(
                "{} conditioning features per token",
                need.saturating_sub(64)
            ),
        };
        Err(Error::InvalidRequest(format!(
            "{} ({}) takes {need} input features per token and needs {what}; this request gives {given}",
            self.name, self.variant
        )))
    }

    /// The denoise and decode phases; the memory report is filled in by the caller.
    pub(crate) fn denoise_decode(
        &self,
        req: &Text2Image,
        txt: &Tensor,
        vec: &Tensor,
        start: Start,
        cond: Cond,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generated> {
        self.expect_conditioning(match cond {
            Cond::Channels(c) => c.dim(2)?,
            _ => 0,
        })?;
        let dev = self.device().clone();
        let dtype = self.dtype();
        let txt = txt.to_dtype(dtype)?.to_device(&dev)?;
        let vec = vec.to_dtype(dtype)?.to_device(&dev)?;
        let (lat_h, lat_w) = sampling::latent_hw(req.height, req.width);
        let flow = &self.flow;
        let (x, timesteps) = self.phase("denoise", &[&flow.weights], on_event, |on_event| {
            let x = sampling::noise(1, req.height, req.width, req.seed, req.noise, &dev)?
                .to_dtype(dtype)?;
            let timesteps = sampling::schedule(
                req.steps,
                (lat_h / 2) * (lat_w / 2),
                self.variant.shift_schedule(),
            );
            let (x, timesteps) = match start {
                Start::Img2Img(z, strength) => {
                    sampling::img2img_start(&x, z, &timesteps, strength, dtype)?
                }
                Start::Noise | Start::Hold(..) => (x, timesteps),
            };
            // Under a `cpu` placement the flow computes on the CPU: its inputs go there and
            // its velocity comes back.
            let wdev = flow.weights.device().clone();
            let to_w = |t: &Tensor| t.to_device(&wdev);
            let img = sampling::pack(&x)?;
            let l_img = img.dim(1)?;
            let img_ids = sampling::image_ids(1, lat_h, lat_w, 0.0, &dev)?;
            let (channels_w, tokens_w, img_ids_w) = match cond {
                Cond::None => (None, None, to_w(&img_ids)?),
                Cond::Channels(c) => (Some(to_w(&c.to_dtype(dtype)?)?), None, to_w(&img_ids)?),
                Cond::Tokens(c, ids) => (
                    None,
                    Some(to_w(&c.to_dtype(dtype)?)?),
                    to_w(&Tensor::cat(&[&img_ids, &ids.to_device(&dev)?], 1)?)?,
                ),
            };
            let txt_ids = sampling::text_ids(1, txt.dim(1)?, &dev)?;
            let guidance = Tensor::new(&[req.guidance], &dev)?.to_dtype(dtype)?;
            let (txt_w, txt_ids_w, vec_w, guidance_w) =
                (to_w(&txt)?, to_w(&txt_ids)?, to_w(&vec)?, to_w(&guidance)?);
            let velocity = |x: &Tensor, t: f32| -> Result<Tensor> {
                let t = Tensor::new(&[t], &wdev)?.to_dtype(dtype)?;
                let mut img = x.to_device(&wdev)?;
                if let Some(c) = &channels_w {
                    img = Tensor::cat(&[&img, c], 2)?;
                }
                if let Some(c) = &tokens_w {
                    img = Tensor::cat(&[&img, c], 1)?;
                }
                let v = flow.net.forward(
                    &flow.weights,
                    &FlowInputs {
                        img: &img,
                        img_ids: &img_ids_w,
                        txt: &txt_w,
                        txt_ids: &txt_ids_w,
                        timesteps: &t,
                        y: &vec_w,
                        guidance: flow.net.config.guidance_embed.then_some(&guidance_w),
                    },
                )?;
                // Kontext: only the target tokens' prediction moves the latent.
                let v = if tokens_w.is_some() {
                    v.narrow(1, 0, l_img)?
                } else {
                    v
                };
                Ok(v.to_device(&dev)?)
            };
            let hold = match start {
                Start::Hold(known, mask) => Some((
                    img.clone(),
                    known.to_dtype(dtype)?.to_device(&dev)?,
                    mask.to_device(&dev)?,
                )),
                _ => None,
            };
            let after = |x: Tensor, t: f32| match &hold {
                Some((noise, known, mask)) => sampling::hold_known(&x, noise, known, mask, t),
                None => Ok(x),
            };
            let x = sampling::denoise_with(img, &timesteps, velocity, after, |step, total| {
                on_event(Event::Step { step, total })
            })?;
            Ok((x, timesteps))
        })?;

        let ae = &self.ae;
        let (latents, image) = self.phase("decode", &[&ae.weights], on_event, |_| {
            let latents = sampling::unpack(&x.to_dtype(DType::F32)?, lat_h, lat_w)?;
            let z = latents.to_device(ae.weights.device())?;
            let image = match self.plan().vae_tile {
                Some(t) if t < 8 * lat_h.max(lat_w) => ae.net.decode_tiled(&ae.weights, &z, t)?,
                _ => ae.net.decode(&ae.weights, &z)?,
            }
            .to_dtype(DType::F32)?
            .to_device(&dev)?;
            drop(z);
            Ok((latents, image))
        })?;
        Ok(Generated {
            latents,
            image,
            timesteps,
            memory: MemoryReport::default(),
        })
    }
}
