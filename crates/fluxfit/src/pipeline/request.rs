//! What every generation mode is asked: the prompt, the output size and the sampling settings,
//! checked before anything is computed.

use crate::error::{Error, Result};
use crate::noise::NoiseKind;

/// Largest side accepted without an explicit opt-in: beyond it memory and time explode.
pub const MAX_SIDE: usize = 4096;
/// Smallest side: below it the latent grid is degenerate.
pub const MIN_SIDE: usize = 64;

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
