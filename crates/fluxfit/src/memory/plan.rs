//! A plan is data (docs/architecture.md principle 4): for each component, where its weights live and in what
//! precision, plus the activation-side knobs. It is chosen before the run (by the user or by
//! the planner from a budget), printed, and recorded in the output's metadata.

use candle_core::DType;

pub use crate::component::Component;

/// Where a component's weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Placement {
    /// Materialised on the compute device on first use and kept for the session.
    Resident,
    /// On the compute device only during the component's phase, released after it.
    Phase,
    /// Stages brought to the device in order, `group` stages at a time, at most `window` groups
    /// held; the next group's transfer is issued before the current group computes. The first
    /// `keep` stages are not streamed: they stay on the device for the phase (partial
    /// residency, for a card that holds part of the model).
    Stream {
        group: usize,
        window: usize,
        keep: usize,
    },
    /// Computed on the CPU (phase-scoped there) while the others use the compute device.
    Cpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ComponentPlan {
    pub placement: Placement,
    /// Precision weights are converted to on their way to the device, and computed in.
    #[serde(serialize_with = "dtype_name")]
    pub compute: DType,
    /// GGUF block-quantized weights stay packed on the device (stored bytes) and each stage is
    /// dequantized to `compute` when the network asks for it; other weights are unaffected.
    pub packed: bool,
    /// With `packed`: Linear weights of types with a fast quantized matmul on the device are
    /// multiplied as they are, not dequantized (activations are quantized to 8 bits on the way,
    /// so images change slightly; see `memory::residency::fast_qmatmul`).
    pub qmatmul: bool,
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
    /// LoRAs merged into each dense weight when its stage is materialised (`W + B·A`, once per
    /// load), instead of their low-rank term computed at every call (see `memory::residency`).
    pub lora_merged: bool,
}

impl Plan {
    /// Everything resident in one dtype: the fastest plan when it fits.
    pub fn resident(dtype: DType, attn_chunk: Option<usize>) -> Self {
        let c = ComponentPlan {
            placement: Placement::Resident,
            compute: dtype,
            packed: false,
            qmatmul: false,
        };
        Self {
            t5: c,
            clip: c,
            flow: c,
            vae: c,
            attn_chunk,
            vae_tile: None,
            lora_merged: false,
        }
    }

    pub fn component(&self, kind: Component) -> &ComponentPlan {
        match kind {
            Component::T5 => &self.t5,
            Component::Clip => &self.clip,
            Component::Flow => &self.flow,
            Component::Vae => &self.vae,
        }
    }

    /// Whether `kind`'s LoRAs are merged into its weights at load: under `lora=merged`, for
    /// every placement but streaming, where the merge would repeat at every staging (every
    /// step) on the loading thread, which costs more than the low-rank term it saves.
    pub fn merges_loras(&self, kind: Component) -> bool {
        self.lora_merged && !matches!(self.component(kind).placement, Placement::Stream { .. })
    }

    pub fn component_mut(&mut self, kind: Component) -> &mut ComponentPlan {
        match kind {
            Component::T5 => &mut self.t5,
            Component::Clip => &mut self.clip,
            Component::Flow => &mut self.flow,
            Component::Vae => &mut self.vae,
        }
    }
}

/// Streaming defaults: one stage per group, two groups held (the one computing and the one
/// being prefetched).
pub const DEFAULT_STREAM_GROUP: usize = 1;
pub const DEFAULT_STREAM_WINDOW: usize = 2;

/// The grammar of `--plan`, for help texts and error messages.
pub const PLAN_SPEC_HELP: &str = "comma-separated items applied in order over `resident`: \
a preset `resident` | `phase` | `stream[:GROUP[:WINDOW[:KEEP]]]` (flow and T5 streamed GROUP \
blocks at a time with WINDOW groups held, default 1:2, the first KEEP blocks kept on the device, \
default 0; CLIP and VAE per phase) | `t5-cpu` (T5 on the CPU), \
or COMPONENT=PLACEMENT with COMPONENT t5|clip|flow|vae and PLACEMENT \
resident|phase|stream[:GROUP[:WINDOW[:KEEP]]]|cpu, or `vae-tile=PX` (decode the image in overlapping \
tiles of PX pixels a side), or `lora=merged` (LoRAs merged into each weight when it is loaded; \
default `lora=unmerged`); a placement may end in `+packed` (GGUF block-quantized weights stay \
packed on the device, each stage dequantized when used) or `+qmatmul` (packed, and multiplied \
quantized where that is faster), and `packed` or `qmatmul` alone apply to flow and T5; \
e.g. `stream:2:3,t5=cpu,vae-tile=512` or `flow=resident+packed`";

impl Placement {
    /// `resident`, `phase`, `stream[:GROUP[:WINDOW[:KEEP]]]` or `cpu`.
    pub fn parse(s: &str) -> crate::Result<Self> {
        let bad =
            |why: String| crate::Error::InvalidRequest(format!("plan placement `{s}`: {why}"));
        let mut parts = s.split(':');
        let head = parts.next().unwrap_or_default();
        let rest: Vec<&str> = parts.collect();
        let placement = match head {
            "resident" => Placement::Resident,
            "phase" => Placement::Phase,
            "cpu" => Placement::Cpu,
            "stream" => {
                if rest.len() > 3 {
                    return Err(bad("expected stream[:GROUP[:WINDOW[:KEEP]]]".into()));
                }
                let num = |i: usize, default: usize, least: usize, what: &str| match rest.get(i) {
                    None => Ok(default),
                    Some(v) => match v.parse::<usize>() {
                        Ok(n) if n >= least => Ok(n),
                        _ => Err(bad(format!(
                            "{what} `{v}` is not a whole number of at least {least}"
                        ))),
                    },
                };
                Placement::Stream {
                    group: num(0, DEFAULT_STREAM_GROUP, 1, "GROUP")?,
                    window: num(1, DEFAULT_STREAM_WINDOW, 1, "WINDOW")?,
                    keep: num(2, 0, 0, "KEEP")?,
                }
            }
            _ => {
                return Err(bad(
                    "expected resident, phase, stream[:GROUP[:WINDOW]] or cpu".into(),
                ))
            }
        };
        if !matches!(placement, Placement::Stream { .. }) && !rest.is_empty() {
            return Err(bad(format!("`{head}` takes no parameters")));
        }
        Ok(placement)
    }

    /// The placement with a stream's group and window at least 1 (0 would hold nothing).
    pub fn normalised(self) -> Self {
        match self {
            Placement::Stream {
                group,
                window,
                keep,
            } => Placement::Stream {
                group: group.max(1),
                window: window.max(1),
                keep,
            },
            p => p,
        }
    }

    /// The inverse of [`Placement::parse`].
    pub fn spec(&self) -> String {
        match self {
            Placement::Resident => "resident".into(),
            Placement::Phase => "phase".into(),
            Placement::Stream {
                group,
                window,
                keep: 0,
            } => format!("stream:{group}:{window}"),
            Placement::Stream {
                group,
                window,
                keep,
            } => format!("stream:{group}:{window}:{keep}"),
            Placement::Cpu => "cpu".into(),
        }
    }
}

impl Plan {
    /// This plan with the items of `spec` applied in order (grammar: [`PLAN_SPEC_HELP`]).
    /// Presets replace placements only; dtypes, attention chunk and VAE tile are kept.
    pub fn with_spec(&self, spec: &str) -> crate::Result<Plan> {
        let mut plan = self.clone();
        let set = |plan: &mut Plan, kinds: &[Component], p: Placement| {
            for k in kinds {
                plan.component_mut(*k).placement = p;
            }
        };
        use Component::*;
        for item in spec.split(',').map(str::trim) {
            if item.is_empty() {
                continue;
            }
            if let Some(v) = item.strip_prefix("vae-tile=") {
                plan.vae_tile = match v.trim() {
                    "none" | "off" => None,
                    v => match v.parse::<usize>() {
                        Ok(n) if n >= 64 && n.is_multiple_of(8) => Some(n),
                        _ => {
                            return Err(crate::Error::InvalidRequest(format!(
                                "plan item `{item}`: the VAE tile is a side in pixels, a multiple of 8 of at least 64, or `none`"
                            )))
                        }
                    },
                };
                continue;
            }
            if let Some(v) = item.strip_prefix("lora=") {
                plan.lora_merged = match v.trim() {
                    "merged" => true,
                    "unmerged" => false,
                    _ => {
                        return Err(crate::Error::InvalidRequest(format!(
                            "plan item `{item}`: expected lora=merged or lora=unmerged"
                        )))
                    }
                };
                continue;
            }
            if item == "packed" || item == "qmatmul" {
                for c in [&mut plan.flow, &mut plan.t5] {
                    c.packed = true;
                    c.qmatmul |= item == "qmatmul";
                }
                continue;
            }
            if let Some((comp, placement)) = item.split_once('=') {
                let kind = Component::ALL
                    .into_iter()
                    .find(|k| k.name() == comp.trim())
                    .ok_or_else(|| {
                        crate::Error::InvalidRequest(format!(
                            "plan item `{item}`: unknown component `{comp}` (expected t5, clip, flow or vae)"
                        ))
                    })?;
                let placement = placement.trim();
                let (placement, packed, qmatmul) =
                    if let Some(p) = placement.strip_suffix("+qmatmul") {
                        (p, true, true)
                    } else if let Some(p) = placement.strip_suffix("+packed") {
                        (p, true, false)
                    } else {
                        (placement, false, false)
                    };
                set(&mut plan, &[kind], Placement::parse(placement)?);
                let c = plan.component_mut(kind);
                (c.packed, c.qmatmul) = (packed, qmatmul);
                continue;
            }
            match item {
                "resident" => set(&mut plan, &Component::ALL, Placement::Resident),
                "phase" => set(&mut plan, &Component::ALL, Placement::Phase),
                "t5-cpu" => set(&mut plan, &[T5], Placement::Cpu),
                s if s == "stream" || s.starts_with("stream:") => {
                    set(&mut plan, &[T5, Flow], Placement::parse(s)?);
                    set(&mut plan, &[Clip, Vae], Placement::Phase);
                }
                _ => {
                    return Err(crate::Error::InvalidRequest(format!(
                        "plan item `{item}` is not understood; --plan takes {PLAN_SPEC_HELP}"
                    )))
                }
            }
        }
        Ok(plan)
    }

    /// The placements as a spec that [`Plan::with_spec`] reads back:
    /// `t5=cpu,clip=phase,flow=stream:1:2,vae=phase`. Recorded in image metadata.
    pub fn spec(&self) -> String {
        let mut items: Vec<String> = Component::ALL
            .iter()
            .map(|k| {
                let c = self.component(*k);
                let packed = match (c.packed, c.qmatmul) {
                    (_, true) => "+qmatmul",
                    (true, false) => "+packed",
                    _ => "",
                };
                format!("{}={}{packed}", k.name(), c.placement.spec())
            })
            .collect();
        if let Some(t) = self.vae_tile {
            items.push(format!("vae-tile={t}"));
        }
        if self.lora_merged {
            items.push("lora=merged".into());
        }
        items.join(",")
    }
}
