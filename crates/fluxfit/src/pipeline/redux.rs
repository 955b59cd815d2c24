//! FLUX.1 Redux (docs/flux.md §2.3 `ReduxImageEncoder`, §3 `prepare_redux`): images become
//! tokens in T5's space, appended to the prompt's T5 sequence, so the flow model is prompted by
//! the images (image variation) and, with several, mixes them. Denoising is then text to image
//! (or img2img).
//!
//! Several images: each image's tokens are appended in turn, as chaining ComfyUI's style-model
//! nodes does. A strength multiplies an image's tokens, as diffusers' `prompt_embeds_scale`
//! and ComfyUI's "multiply" strength do; 1 is the reference.

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;

use super::model::{redux_residency, Model, Part};
use super::run::{self, ReduxInput};
use super::text2image::{Cond, Event, Generated, ImageInit, Request, Start};
use crate::checkpoint::layout::{self, ReduxPaths};
use crate::error::{Error, Result};
use crate::image::Rgb8;
use crate::model::redux::{ReduxConfig, ReduxEncoder};
use crate::model::siglip::SiglipConfig;
use crate::resample;

/// Most images one run mixes: each adds 729 tokens to every flow step's attention.
pub const MAX_IMAGES: usize = 8;

/// SigLIP's processing as transformers' `SiglipImageProcessor` (the PIL one the reference was
/// written against) does it: resize to `size`² with Pillow's BICUBIC (aspect not kept), then
/// `(b/255 − 0.5)/0.5` in f32 (the rescale in f64, rounded to f32, then the normalisation in
/// f32). Returns `[3, size, size]` channel-major.
pub fn siglip_pixels(img: &Rgb8, size: usize) -> Vec<f32> {
    let data = resample::bicubic_rgb8(&img.data, img.width, img.height, size, size);
    let plane = size * size;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let v = (px[c] as f64 / 255.0) as f32;
            out[c * plane + i] = (v - 0.5) / 0.5;
        }
    }
    out
}

/// An image for Redux and its strength.
#[derive(Debug, Clone)]
pub struct ReduxImage {
    pub image: Rgb8,
    pub strength: f64,
}

impl ReduxImage {
    /// Refuses a strength that is not a finite number in [0, 10] (past that the image tokens
    /// swamp attention; 0 removes the image).
    pub fn check(&self, what: &str) -> Result<()> {
        if !(self.strength.is_finite() && (0.0..=10.0).contains(&self.strength)) {
            return Err(Error::InvalidRequest(format!(
                "{what}: Redux strength {} must be a number from 0 to 10 (1 is the reference)",
                self.strength
            )));
        }
        if self.image.width == 0 || self.image.height == 0 {
            return Err(Error::InvalidRequest(format!("{what}: the image is empty")));
        }
        Ok(())
    }
}

impl Model {
    /// Opens Redux's encoder (the projector and the SigLIP tower, memory-mapped; nothing is read
    /// yet), checks every shape and that its tokens have the flow model's text width.
    pub fn attach_redux(&mut self, paths: &ReduxPaths) -> Result<()> {
        let (store, config_json) = layout::open_redux(paths)?;
        let siglip = SiglipConfig::from_store(&store, config_json.as_deref())?;
        let config = ReduxConfig::from_store(&store, siglip)?;
        let net = ReduxEncoder::new(config);
        net.check_width(
            self.flow.net.config.context_in_dim,
            &paths.projector.display().to_string(),
        )?;
        let weights = redux_residency(
            self.ledger(),
            self.device(),
            self.plan(),
            Arc::new(store),
            net.stages(),
        );
        self.redux = Some(Part { net, weights });
        Ok(())
    }

    /// [`Model::attach_redux`] from a Redux folder or file and an optional SigLIP location.
    pub fn attach_redux_from(&mut self, redux: &Path, siglip: Option<&Path>) -> Result<()> {
        self.attach_redux(&ReduxPaths::resolve(redux, siglip)?)
    }

    /// The processed pixels `[1, 3, S, S]` of each image, with its strength.
    pub fn redux_inputs(&self, images: &[ReduxImage]) -> Result<Vec<ReduxInput<Tensor>>> {
        let Some(r) = &self.redux else {
            return Err(Error::InvalidRequest(
                "Redux images need the Redux encoder: name it with --redux".into(),
            ));
        };
        if images.is_empty() || images.len() > MAX_IMAGES {
            return Err(Error::InvalidRequest(format!(
                "Redux takes 1 to {MAX_IMAGES} images, not {}",
                images.len()
            )));
        }
        let size = r.net.config.siglip.image_size;
        images
            .iter()
            .enumerate()
            .map(|(i, img)| {
                img.check(&format!("Redux image {}", i + 1))?;
                let pixels = Tensor::from_vec(
                    siglip_pixels(&img.image, size),
                    (1, 3, size, size),
                    &candle_core::Device::Cpu,
                )?;
                Ok(ReduxInput {
                    pixels,
                    strength: img.strength,
                })
            })
            .collect()
    }

    /// Each image's Redux tokens `[1, N, T]` (bf16-rounded, times its strength).
    pub fn redux_tokens(&self, images: &[ReduxImage]) -> Result<Vec<Tensor>> {
        run::redux_tokens(self, &self.redux_inputs(images)?)
    }

    /// Redux image variation (docs/flux.md §3 `prepare_redux`): the images' tokens follow the
    /// prompt's T5 tokens (the reference's prompt is empty); then text to image, or img2img
    /// from `init`. `embeddings`: already encoded text (`req.prompt` is then not read).
    pub fn redux(
        &self,
        req: &Request,
        images: &[ReduxImage],
        init: Option<&ImageInit>,
        embeddings: Option<(&Tensor, &Tensor)>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generated> {
        run::expect_conditioning(self, 0)?;
        if let Some(init) = init {
            init.validate(req)?;
        }
        let inputs = self.redux_inputs(images)?;
        self.conditioned(
            req,
            embeddings,
            on_event,
            || {
                let tokens = run::redux_tokens(self, &inputs)?;
                let z = init.map(|i| self.encode_image(&i.image)).transpose()?;
                Ok((tokens, z))
            },
            |txt, vec, (tokens, z), on_event| {
                let txt = run::append_tokens(txt, tokens)?;
                let start = match (z, init) {
                    (Some(z), Some(i)) => Start::Img2Img(z, i.strength),
                    _ => Start::Noise,
                };
                self.denoise_decode(req, &txt, vec, start, Cond::None, on_event)
            },
        )
    }
}
