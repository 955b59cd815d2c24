//! The phases of a generation, over any [`Tensor`]: encode the text (and the conditioning
//! image), denoise, decode. [`super::Model`] runs them over candle to make images; the planner
//! runs the same functions over meta tensors to predict what they hold, so the pipeline, like
//! each network, is described once.

use candle_core::DType;

use super::request::Request;
use crate::component::{Component, Phase};
use crate::error::{Error, Result};
use crate::model::autoencoder::AutoEncoder;
use crate::model::clip::ClipTextModel;
use crate::model::flow::{FlowInputs, Flux};
use crate::model::redux::ReduxEncoder;
use crate::model::t5::T5Encoder;
use crate::model::weights::Weights;
use crate::sampling;
use crate::tensor::Tensor;
use crate::variant::Variant;

/// Progress of a generation, for bars and event streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A phase begins.
    Phase(Phase),
    /// A denoising step finished.
    Step { step: usize, total: usize },
}

/// What the phases need of a model: its four networks with their weights (and Redux's image
/// encoder when attached), where and in what precision it computes, and the bookkeeping of
/// phase boundaries.
pub trait Parts<T: Tensor> {
    type T5: Weights<T>;
    type Clip: Weights<T>;
    type Flow: Weights<T>;
    type Vae: Weights<T>;
    type Redux: Weights<T>;
    fn t5(&self) -> (&T5Encoder, &Self::T5);
    fn clip(&self) -> (&ClipTextModel, &Self::Clip);
    fn flow(&self) -> (&Flux, &Self::Flow);
    fn vae(&self) -> (&AutoEncoder, &Self::Vae);
    /// Redux's SigLIP tower and projector; it computes in the encode phase under CLIP's
    /// placement and is released with CLIP.
    fn redux(&self) -> Option<(&ReduxEncoder, &Self::Redux)>;
    /// The model's name, for messages.
    fn name(&self) -> &str;
    fn variant(&self) -> Variant;
    /// The compute device.
    fn device(&self) -> &T::Device;
    /// The compute dtype of latents and embeddings.
    fn dtype(&self) -> DType;
    /// The plan's VAE tile (pixels), if any.
    fn vae_tile(&self) -> Option<usize>;
    /// T5 and CLIP token rows of `prompt`.
    fn tokens(&self, prompt: &str, t5_tokens: usize) -> Result<Tokens>;
    fn begin_phase(&self, phase: Phase);
    /// After denoising step `step` of `total`, with the packed latent `x` of a `latent_hw`
    /// latent: where a watched run stops when cancelled and hands out previews. An error ends
    /// the run.
    fn after_step(
        &self,
        _step: usize,
        _total: usize,
        _x: &T,
        _latent_hw: (usize, usize),
    ) -> Result<()> {
        Ok(())
    }
    /// End of a phase: `released` components drop all but resident weights.
    fn end_phase(&self, released: &[Component]);
}

/// Token rows `[B][L]` of the two encoders: (T5, CLIP).
pub type Tokens = (Vec<Vec<u32>>, Vec<Vec<u32>>);

/// Where denoising starts.
#[derive(Clone, Copy)]
pub enum Start<'a, T> {
    /// Text to image: the seed's noise, the whole schedule.
    Noise,
    /// img2img: the init latent and the strength.
    Img2Img(&'a T, f64),
    /// Latent inpainting: the seed's noise, with the packed known latent `[1, L, 64]` held
    /// where the token mask `[1, L, 1]` is 1 (see [`sampling::hold_known`]).
    Hold(&'a T, &'a T),
}

/// What joins the noisy latent at every flow call.
#[derive(Clone, Copy)]
pub enum Cond<'a, T> {
    None,
    /// Fill (`[1, L, 320]`) and control (`[1, L, 64]`): concatenated channel-wise.
    Channels(&'a T),
    /// Kontext: conditioning tokens `[1, Lc, 64]` with their ids `[1, Lc, 3]`, appended to the
    /// image sequence; the prediction is cut back to the target tokens.
    Tokens(&'a T, &'a T),
}

/// Runs `f` as phase `name`: the phase's figures are kept apart, and `released` components
/// drop all but resident weights at its end, whether `f` succeeded or not.
pub fn phase<T: Tensor, P: Parts<T>, R>(
    p: &P,
    name: Phase,
    released: &[Component],
    on_event: &mut dyn FnMut(Event),
    f: impl FnOnce(&mut dyn FnMut(Event)) -> Result<R>,
) -> Result<R> {
    on_event(Event::Phase(name));
    p.begin_phase(name);
    let out = f(on_event);
    p.end_phase(released);
    out
}

/// Rounds through bf16 as the reference's embedders do with the encoders' outputs.
fn through_bf16<T: Tensor>(t: &T, dtype: DType) -> Result<T> {
    t.to_dtype(DType::BF16)?.to_dtype(dtype)
}

/// T5 sequence `[1, L, d]` and CLIP pooled vector `[1, d]`, rounded through bf16, on the
/// compute device (the encoders may compute elsewhere under a `cpu` placement).
pub fn encode_text<T: Tensor, P: Parts<T>>(
    p: &P,
    prompt: &str,
    t5_tokens: usize,
) -> Result<(T, T)> {
    let (t5_rows, clip_rows) = p.tokens(prompt, t5_tokens)?;
    let (t5, t5w) = p.t5();
    let txt: T = t5.forward(t5w, &t5_rows)?;
    let (clip, clipw) = p.clip();
    let (_, pooled): (T, T) = clip.forward(clipw, &clip_rows)?;
    let dev = p.device();
    Ok((
        through_bf16(&txt, p.dtype())?.to_device(dev)?,
        through_bf16(&pooled, p.dtype())?.to_device(dev)?,
    ))
}

/// The scaled latent `[1, 16, H/8, W/8]` (f32, on the compute device) of an image in
/// [−1, 1], tiled when the plan has a VAE tile.
pub fn encode_image<T: Tensor, P: Parts<T>>(p: &P, image: &T) -> Result<T> {
    let (ae, w) = p.vae();
    let x = image.to_device(w.device())?;
    let z = match p.vae_tile() {
        Some(t) => ae.encode_tiled(w, &x, t)?,
        None => ae.encode(w, &x)?,
    };
    z.to_dtype(DType::F32)?.to_device(p.device())
}

/// A generation with image inputs: the encode phase makes the text embeddings (unless given;
/// the prompt is then not read) and, with the autoencoder, whatever `condition` derives from
/// the images; `run` denoises and decodes.
pub fn conditioned<T: Tensor, P: Parts<T>, C, R>(
    p: &P,
    req: &Request,
    embeddings: Option<(&T, &T)>,
    on_event: &mut dyn FnMut(Event),
    condition: impl FnOnce() -> Result<C>,
    run: impl FnOnce(&T, &T, &C, &mut dyn FnMut(Event)) -> Result<R>,
) -> Result<R> {
    use Component::{Clip, Vae, T5};
    let encoded = phase(p, Phase::Encode, &[T5, Clip, Vae], on_event, |_| {
        let (txt, vec) = match embeddings {
            Some((t, v)) => (t.clone(), v.clone()),
            None => encode_text(p, &req.prompt, req.t5_tokens)?,
        };
        Ok((txt, vec, condition()?))
    })?;
    let (txt, vec, c) = encoded;
    run(&txt, &vec, &c, on_event)
}

/// Refuses, naming what is missing, a run whose conditioning does not fill the flow model's
/// input (a Canny model asked for plain text to image, say).
pub fn expect_conditioning<T: Tensor, P: Parts<T>>(p: &P, channels: usize) -> Result<()> {
    let (given, need) = (64 + channels, p.flow().0.config.in_channels);
    if given == need {
        return Ok(());
    }
    let what = match p.variant() {
        Variant::DevFill => "a mask and an image: use `fluxfit fill`".to_string(),
        Variant::DevCanny | Variant::DevDepth => "a control image (--control-image)".to_string(),
        _ => format!(
            "{} conditioning features per token",
            need.saturating_sub(64)
        ),
    };
    Err(Error::InvalidRequest(format!(
        "{} ({}) takes {need} input features per token and needs {what}; this request gives {given}",
        p.name(),
        p.variant()
    )))
}

/// The denoise and decode phases: (final latents `[1, 16, h, w]` f32, decoded image
/// `[1, 3, H, W]` f32, the timesteps run).
pub fn denoise_decode<T: Tensor, P: Parts<T>>(
    p: &P,
    req: &Request,
    txt: &T,
    vec: &T,
    start: Start<T>,
    cond: Cond<T>,
    on_event: &mut dyn FnMut(Event),
) -> Result<(T, T, Vec<f32>)> {
    expect_conditioning(
        p,
        match cond {
            Cond::Channels(c) => c.dim(2)?,
            _ => 0,
        },
    )?;
    let dev = p.device().clone();
    let dtype = p.dtype();
    let txt = txt.to_dtype(dtype)?.to_device(&dev)?;
    let vec = vec.to_dtype(dtype)?.to_device(&dev)?;
    let (lat_h, lat_w) = sampling::latent_hw(req.height, req.width);
    let (flow, flow_w) = p.flow();
    let flow_phase = [Component::Flow];
    let (x, timesteps) = phase(p, Phase::Denoise, &flow_phase, on_event, |on_event| {
        let x = sampling::noise::<T>(1, req.height, req.width, req.seed, req.noise, &dev)?
            .to_dtype(dtype)?;
        let timesteps = sampling::schedule(
            req.steps,
            (lat_h / 2) * (lat_w / 2),
            p.variant().shift_schedule(),
        );
        let (x, timesteps) = match start {
            Start::Img2Img(z, strength) => {
                sampling::img2img_start(&x, z, &timesteps, strength, dtype)?
            }
            Start::Noise | Start::Hold(..) => (x, timesteps),
        };
        // Under a `cpu` placement the flow computes on the CPU: its inputs go there and its
        // velocity comes back.
        let wdev = flow_w.device().clone();
        let to_w = |t: &T| t.to_device(&wdev);
        let img = sampling::pack(&x)?;
        let l_img = img.dim(1)?;
        let img_ids: T = sampling::image_ids(1, lat_h, lat_w, 0.0, &dev)?;
        let (channels_w, tokens_w, img_ids_w) = match cond {
            Cond::None => (None, None, to_w(&img_ids)?),
            Cond::Channels(c) => (Some(to_w(&c.to_dtype(dtype)?)?), None, to_w(&img_ids)?),
            Cond::Tokens(c, ids) => (
                None,
                Some(to_w(&c.to_dtype(dtype)?)?),
                to_w(&T::cat(&[&img_ids, &ids.to_device(&dev)?], 1)?)?,
            ),
        };
        let txt_ids: T = sampling::text_ids(1, txt.dim(1)?, &dev)?;
        let guidance = T::from_f32(&[1], &dev, || vec![req.guidance])?.to_dtype(dtype)?;
        let (txt_w, txt_ids_w, vec_w, guidance_w) =
            (to_w(&txt)?, to_w(&txt_ids)?, to_w(&vec)?, to_w(&guidance)?);
        let velocity = |x: &T, t: f32| -> Result<T> {
            let t = T::from_f32(&[1], &wdev, || vec![t])?.to_dtype(dtype)?;
            let mut img = x.to_device(&wdev)?;
            if let Some(c) = &channels_w {
                img = T::cat(&[&img, c], 2)?;
            }
            if let Some(c) = &tokens_w {
                img = T::cat(&[&img, c], 1)?;
            }
            let v = flow.forward(
                flow_w,
                &FlowInputs {
                    img: &img,
                    img_ids: &img_ids_w,
                    txt: &txt_w,
                    txt_ids: &txt_ids_w,
                    timesteps: &t,
                    y: &vec_w,
                    guidance: flow.config.guidance_embed.then_some(&guidance_w),
                },
            )?;
            // Kontext: only the target tokens' prediction moves the latent.
            let v = if tokens_w.is_some() {
                v.narrow(1, 0, l_img)?
            } else {
                v
            };
            v.to_device(&dev)
        };
        let hold = match start {
            Start::Hold(known, mask) => Some((
                img.clone(),
                known.to_dtype(dtype)?.to_device(&dev)?,
                mask.to_device(&dev)?,
            )),
            _ => None,
        };
        let after = |x: T, t: f32| match &hold {
            Some((noise, known, mask)) => sampling::hold_known(&x, noise, known, mask, t),
            None => Ok(x),
        };
        let x = sampling::denoise_with(img, &timesteps, velocity, after, |step, total, x| {
            if !x.all_finite()? {
                return Err(non_finite(
                    format!("denoising step {step} of {total}"),
                    p.dtype(),
                ));
            }
            on_event(Event::Step { step, total });
            p.after_step(step, total, x, (lat_h, lat_w))
        })?;
        Ok((x, timesteps))
    })?;

    let (ae, ae_w) = p.vae();
    let (latents, image) = phase(p, Phase::Decode, &[Component::Vae], on_event, |_| {
        let latents = sampling::unpack(&x.to_dtype(DType::F32)?, lat_h, lat_w)?;
        let z = latents.to_device(ae_w.device())?;
        let image = match p.vae_tile() {
            Some(t) if t < 8 * lat_h.max(lat_w) => ae.decode_tiled(ae_w, &z, t)?,
            _ => ae.decode(ae_w, &z)?,
        }
        .to_dtype(DType::F32)?
        .to_device(&dev)?;
        drop(z);
        if !image.all_finite()? {
            return Err(non_finite("the VAE decoder".into(), p.dtype()));
        }
        Ok((latents, image))
    })?;
    Ok((latents, image, timesteps))
}

/// A run stopped by a NaN or an infinity, which would otherwise end as a black image.
fn non_finite(where_: String, dtype: DType) -> Error {
    Error::InvalidRequest(format!(
        "{where_} produced NaN or infinite values, so the image would be black: the weights \
         hold non-finite values (a damaged or badly converted checkpoint or LoRA), or the \
         computation overflowed in {dtype:?} (try --dtype f32, or a lower LoRA scale)"
    ))
}

/// The control latent `[1, L, 64]`: encoded, rounded through bf16, packed, in the compute
/// dtype, on the compute device (Canny / Depth, docs/flux.md §3 `prepare_control`).
pub fn control_latent<T: Tensor, P: Parts<T>>(p: &P, image: &T) -> Result<T> {
    let z = encode_image(p, image)?.to_dtype(DType::BF16)?;
    sampling::pack(&z)?.to_dtype(p.dtype())
}

/// Kontext's conditioning tokens `[1, Lc, 64]` (encoded, rounded through bf16, packed, in the
/// compute dtype) and their ids (1, r, c) `[1, Lc, 3]`, on the compute device
/// (docs/flux.md §3 `prepare_kontext`).
pub fn kontext_tokens<T: Tensor, P: Parts<T>>(p: &P, image: &T) -> Result<(T, T)> {
    let (_, _, h, w) = image.dims4()?;
    if !h.is_multiple_of(16) || !w.is_multiple_of(16) {
        return Err(Error::InvalidRequest(format!(
            "the Kontext conditioning image must have sides that are multiples of 16, not {w}x{h}"
        )));
    }
    let z = encode_image(p, image)?.to_dtype(DType::BF16)?;
    let tokens = sampling::pack(&z)?.to_dtype(p.dtype())?;
    let ids = sampling::image_ids(1, h / 8, w / 8, 1.0, p.device())?;
    Ok((tokens, ids))
}

/// One Redux image: processed pixels `[1, 3, S, S]` (f32; see `pipeline::redux::siglip_pixels`)
/// and the strength its tokens are multiplied by (1: the reference).
pub struct ReduxInput<T> {
    pub pixels: T,
    pub strength: f64,
}

/// Each image's Redux tokens `[1, N, T]`: SigLIP, the projector, rounded through bf16 as the
/// reference's `prepare_redux` does, times the image's strength; in the compute dtype, on the
/// compute device (docs/flux.md §3 `prepare_redux`).
pub fn redux_tokens<T: Tensor, P: Parts<T>>(p: &P, images: &[ReduxInput<T>]) -> Result<Vec<T>> {
    let Some((redux, w)) = p.redux() else {
        return Err(Error::InvalidRequest(
            "Redux images need the Redux encoder: name it with --redux".into(),
        ));
    };
    images
        .iter()
        .map(|img| {
            let tokens = redux.forward(w, &img.pixels)?;
            let tokens = through_bf16(&tokens, p.dtype())?.to_device(p.device())?;
            if img.strength == 1.0 {
                Ok(tokens)
            } else {
                tokens.affine(img.strength, 0.0)
            }
        })
        .collect()
}

/// The text sequence with the Redux tokens appended (all of them get zero ids, as text does).
pub fn append_tokens<T: Tensor>(txt: &T, tokens: &[T]) -> Result<T> {
    if tokens.is_empty() {
        return Ok(txt.clone());
    }
    let txt = txt.to_dtype(tokens[0].dtype())?;
    let mut parts = vec![&txt];
    parts.extend(tokens.iter());
    T::cat(&parts, 1)
}
