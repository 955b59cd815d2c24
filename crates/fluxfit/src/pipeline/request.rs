//! What every generation mode is asked: the prompt, the output size and the sampling settings,
//! checked before anything is computed.

use crate::error::{Error, Result};
use crate::noise::NoiseKind;

/// Largest side accepted without an explicit opt-in: beyond it memory and time explode.
pub const MAX_SIDE: usize = 4096;
/// Smallest side: below it the latent grid is degenerate.
pub const MIN_SIDE: usize = 64;
/// Largest side even with `--allow-large`: 16384² is 1 M image tokens a step, days of compute
/// on any card; sides past it would only exhaust memory (or the planner's patience).
pub const MAX_SIDE_LARGE: usize = 16384;
/// Most denoising steps: rectified-flow models converge in tens (the reference's defaults are
/// 4 and 50); a larger number is a typing slip, and its schedule alone would be gigabytes.
pub const MAX_STEPS: usize = 1000;
/// The T5 length FLUX.1 models are used with (dev: 512; schnell 256, fill 128).
pub const MAX_T5_TOKENS: usize = 512;
/// The T5 length `--allow-large` permits: T5's relative positions take any length, but FLUX was
/// not trained past 512, and memory grows with the square of it in T5's attention.
pub const MAX_T5_TOKENS_LARGE: usize = 4096;

/// One generation request: the prompt, the output size and the sampling settings. Every mode
/// takes it (text to image, img2img, fill, control, Kontext, regions) beside its images.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Request {
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

impl Request {
    /// Refuses requests that cannot give a sensible image, naming the value and the fix.
    pub fn validate(&self, allow_large: bool) -> Result<()> {
        check_sides(self.width, self.height, allow_large)?;
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(Error::InvalidRequest(format!(
                "steps {} is outside 1 to {MAX_STEPS}",
                self.steps
            )));
        }
        check_t5_tokens(self.t5_tokens, allow_large)?;
        if !self.guidance.is_finite() {
            return Err(Error::InvalidRequest(format!(
                "guidance {} is not a number",
                self.guidance
            )));
        }
        Ok(())
    }
}

/// The side limits every output size is held to (the planner's too): [`MIN_SIDE`] to
/// [`MAX_SIDE`], or to [`MAX_SIDE_LARGE`] with `allow_large`.
pub fn check_sides(width: usize, height: usize, allow_large: bool) -> Result<()> {
    for (name, v) in [("width", width), ("height", height)] {
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
        if v > MAX_SIDE_LARGE {
            return Err(Error::InvalidRequest(format!(
                "{name} {v} is above {MAX_SIDE_LARGE} pixels, the limit even with --allow-large \
                 (for larger canvases use `fluxfit regions`)"
            )));
        }
    }
    Ok(())
}

/// The T5 length limits: 1 to [`MAX_T5_TOKENS`], or to [`MAX_T5_TOKENS_LARGE`] with
/// `allow_large`.
pub fn check_t5_tokens(tokens: usize, allow_large: bool) -> Result<()> {
    let max = if allow_large {
        MAX_T5_TOKENS_LARGE
    } else {
        MAX_T5_TOKENS
    };
    if tokens == 0 || tokens > max {
        let hint = if allow_large || tokens <= MAX_T5_TOKENS_LARGE {
            " (FLUX.1 was trained with at most 512; --allow-large permits up to 4096)"
        } else {
            ""
        };
        return Err(Error::InvalidRequest(format!(
            "t5 tokens {tokens} is outside 1 to {max}{hint}"
        )));
    }
    Ok(())
}
