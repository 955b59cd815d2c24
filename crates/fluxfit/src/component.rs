//! The vocabulary of a run: the four components that hold weights and the three phases that
//! use them. Plans, the ledger, the planner and the pipeline all speak it.

use std::fmt;

/// The four weight-holding components of a FLUX pipeline, in the order phases use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Component {
    T5,
    Clip,
    Flow,
    Vae,
}

impl Component {
    pub const ALL: [Component; 4] = [Self::T5, Self::Clip, Self::Flow, Self::Vae];

    pub fn name(self) -> &'static str {
        match self {
            Self::T5 => "t5",
            Self::Clip => "clip",
            Self::Flow => "flow",
            Self::Vae => "vae",
        }
    }

    /// The phase in which the component computes (the VAE encoder also runs in the encode
    /// phase for image inputs).
    pub fn phase(self) -> Phase {
        match self {
            Self::T5 | Self::Clip => Phase::Encode,
            Self::Flow => Phase::Denoise,
            Self::Vae => Phase::Decode,
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// The three phases of a generation, each with its own set of weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Text encoders (and the VAE encoder for image inputs).
    Encode,
    /// The flow transformer, once per step.
    Denoise,
    /// The VAE decoder.
    Decode,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Self::Encode, Self::Denoise, Self::Decode];

    pub fn name(self) -> &'static str {
        match self {
            Self::Encode => "encode",
            Self::Denoise => "denoise",
            Self::Decode => "decode",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}
