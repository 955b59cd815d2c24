//! A plan is data (DESIGN principle 4): for each component, where its weights live and in what
//! precision, plus the activation-side knobs. It is chosen before the run (by the user or by
//! the planner from a budget), printed, and recorded in the output's metadata.

use candle_core::DType;

/// The four weight-holding components of a FLUX pipeline, in the order phases use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum ComponentKind {
    T5,
    Clip,
    Flow,
    Vae,
}

impl ComponentKind {
    pub const ALL: [ComponentKind; 4] = [Self::T5, Self::Clip, Self::Flow, Self::Vae];

    pub fn name(self) -> &'static str {
        match self {
            Self::T5 => "t5",
            Self::Clip => "clip",
            Self::Flow => "flow",
            Self::Vae => "vae",
        }
    }

    /// The phase in which the component computes (the VAE encoder also runs in "encode" for
    /// image inputs).
    pub fn phase(self) -> &'static str {
        match self {
            Self::T5 | Self::Clip => "encode",
            Self::Flow => "denoise",
            Self::Vae => "decode",
        }
    }
}

/// Where a component's weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Placement {
    /// Materialised on the compute device on first use and kept for the session.
    Resident,
    /// On the compute device only during the component's phase, released after it.
    Phase,
    /// Stages brought to the device in order, `group` stages at a time, at most `window` groups
    /// held; the next group's transfer is issued before the current group computes.
    Stream { group: usize, window: usize },
    /// Computed on the CPU (phase-scoped there) while the others use the compute device.
    Cpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ComponentPlan {
    pub placement: Placement,
    /// Precision weights are converted to on their way to the device, and computed in.
    #[serde(serialize_with = "dtype_name")]
    pub compute: DType,
}

fn dtype_name<S: serde::Serializer>(d: &DType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(d.as_str())
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    pub t5: ComponentPlan,
    pub clip: ComponentPlan,
    pub flow: ComponentPlan,
    pub vae: ComponentPlan,
    /// Attention query-chunk length; None = unchunked.
    pub attn_chunk: Option<usize>,
    /// VAE tile side in pixels; None = whole image.
    pub vae_tile: Option<usize>,
}

impl Plan {
    /// Everything resident in one dtype: the fastest plan when it fits.
    pub fn resident(dtype: DType, attn_chunk: Option<usize>) -> Self {
        let c = ComponentPlan {
            placement: Placement::Resident,
            compute: dtype,
        };
        Self {
            t5: c,
            clip: c,
            flow: c,
            vae: c,
            attn_chunk,
            vae_tile: None,
        }
    }

    pub fn component(&self, kind: ComponentKind) -> &ComponentPlan {
        match kind {
            ComponentKind::T5 => &self.t5,
            ComponentKind::Clip => &self.clip,
            ComponentKind::Flow => &self.flow,
            ComponentKind::Vae => &self.vae,
        }
    }

    pub fn component_mut(&mut self, kind: ComponentKind) -> &mut ComponentPlan {
        match kind {
            ComponentKind::T5 => &mut self.t5,
            ComponentKind::Clip => &mut self.clip,
            ComponentKind::Flow => &mut self.flow,
            ComponentKind::Vae => &mut self.vae,
        }
    }
}
