//! Text to image (and img2img), as the reference's t2i CLI and demo do it: encode the prompt,
//! draw the seed's noise, integrate the flow over the schedule, decode; and the phases every
//! generation mode shares (`conditioned`, `denoise_decode`), which Fill, Control, Kontext and
//! region generation feed with their conditioning.

use candle_core::{DType, Device, Tensor};

use super::model::Model;
pub use super::request::{Request, MAX_SIDE, MIN_SIDE};
pub use super::run::Event;
use super::run::{self, Parts};
pub(crate) use super::run::{Cond, Start};
use crate::component::{Component, Phase};
use crate::error::{Error, Result};
use crate::memory::ledger::MemoryReport;
use crate::memory::residency::Residency;
use crate::model::autoencoder::AutoEncoder;
use crate::model::clip::ClipTextModel;
use crate::model::flow::Flux;
use crate::model::redux::ReduxEncoder;
use crate::model::t5::T5Encoder;
use crate::variant::Variant;

/// img2img's init image (docs/flux.md §3, demo_st.py): the generation starts from
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
    pub fn validate(&self, req: &Request) -> Result<()> {
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

impl Parts<Tensor> for Model {
    type T5 = Residency;
    type Clip = Residency;
    type Flow = Residency;
    type Vae = Residency;
    type Redux = Residency;
    fn t5(&self) -> (&T5Encoder, &Residency) {
        (&self.t5.net, &self.t5.weights)
    }
    fn clip(&self) -> (&ClipTextModel, &Residency) {
        (&self.clip.net, &self.clip.weights)
    }
    fn flow(&self) -> (&Flux, &Residency) {
        (&self.flow.net, &self.flow.weights)
    }
    fn vae(&self) -> (&AutoEncoder, &Residency) {
        (&self.vae.net, &self.vae.weights)
    }
    fn redux(&self) -> Option<(&ReduxEncoder, &Residency)> {
        self.redux.as_ref().map(|r| (&r.net, &r.weights))
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn variant(&self) -> Variant {
        self.variant
    }
    fn device(&self) -> &Device {
        Model::device(self)
    }
    fn dtype(&self) -> DType {
        Model::dtype(self)
    }
    fn vae_tile(&self) -> Option<usize> {
        self.plan().vae_tile
    }
    fn tokens(&self, prompt: &str, t5_tokens: usize) -> Result<run::Tokens> {
        Ok((
            vec![self.t5_tokenizer.encode(prompt, t5_tokens)?],
            vec![self.clip_tokenizer.encode(prompt, 77)?],
        ))
    }
    fn begin_phase(&self, name: Phase) {
        self.ledger().begin_phase(name);
    }
    fn after_step(
        &self,
        step: usize,
        total: usize,
        x: &Tensor,
        latent_hw: (usize, usize),
    ) -> Result<()> {
        match self.watch() {
            Some(w) => w.after_step(step, total, x, latent_hw),
            None => Ok(()),
        }
    }
    fn end_phase(&self, released: &[Component]) {
        for &c in released {
            self.weights(c).release();
            if let (Component::Clip, Some(r)) = (c, &self.redux) {
                r.weights.release();
            }
        }
        self.ledger().end_phase();
    }
}

impl Model {
    /// T5 sequence `[1, L, d]` and CLIP pooled vector `[1, d]`, rounded through bf16, on the
    /// compute device (the encoders may compute elsewhere under a `cpu` placement).
    pub fn encode_text(&self, prompt: &str, t5_tokens: usize) -> Result<(Tensor, Tensor)> {
        run::encode_text(self, prompt, t5_tokens)
    }

    pub fn text_to_image(
        &self,
        req: &Request,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generated> {
        run::expect_conditioning(self, 0)?;
        self.run(|| {
            use Component::{Clip, T5};
            let (txt, vec) = run::phase(self, Phase::Encode, &[T5, Clip], on_event, |_| {
                self.encode_text(&req.prompt, req.t5_tokens)
            })?;
            self.denoise_decode(req, &txt, &vec, Start::Noise, Cond::None, on_event)
        })
    }

    /// `f` as one run: the ledger's figures of its phases make the returned memory report.
    fn run(&self, f: impl FnOnce() -> Result<Generated>) -> Result<Generated> {
        self.ledger().begin_run();
        let out = f();
        let memory = self.ledger().end_run();
        out.map(|g| Generated { memory, ..g })
    }

    /// The scaled latent `[1, 16, H/8, W/8]` (f32, on the compute device) of an image in
    /// [−1, 1], tiled when the plan has a VAE tile.
    pub fn encode_image(&self, image: &Tensor) -> Result<Tensor> {
        run::encode_image(self, image)
    }

    /// img2img (docs/flux.md §3, demo_st.py): text and init image encoded in the encode phase,
    /// then the remaining schedule from the noised init latent. `embeddings`: already encoded
    /// text (`req.prompt` is then not read).
    pub fn image_to_image(
        &self,
        req: &Request,
        init: &ImageInit,
        embeddings: Option<(&Tensor, &Tensor)>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generated> {
        init.validate(req)?;
        run::expect_conditioning(self, 0)?;
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

    /// A generation with image inputs: see [`run::conditioned`].
    pub(crate) fn conditioned<C>(
        &self,
        req: &Request,
        embeddings: Option<(&Tensor, &Tensor)>,
        on_event: &mut dyn FnMut(Event),
        condition: impl FnOnce() -> Result<C>,
        then: impl FnOnce(&Tensor, &Tensor, &C, &mut dyn FnMut(Event)) -> Result<Generated>,
    ) -> Result<Generated> {
        self.run(|| run::conditioned(self, req, embeddings, on_event, condition, then))
    }

    /// Denoise and decode for already encoded text (`req.prompt` is not read).
    pub fn image_from_embeddings(
        &self,
        req: &Request,
        txt: &Tensor,
        vec: &Tensor,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generated> {
        self.run(|| self.denoise_decode(req, txt, vec, Start::Noise, Cond::None, on_event))
    }

    /// The denoise and decode phases; the memory report is filled in by the caller.
    pub(crate) fn denoise_decode(
        &self,
        req: &Request,
        txt: &Tensor,
        vec: &Tensor,
        start: Start<Tensor>,
        cond: Cond<Tensor>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generated> {
        let (latents, image, timesteps) =
            run::denoise_decode(self, req, txt, vec, start, cond, on_event)?;
        Ok(Generated {
            latents,
            image,
            timesteps,
            memory: MemoryReport::default(),
        })
    }
}
