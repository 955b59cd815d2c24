//! The planner: for a model, a request and a plan, the peak bytes each phase needs on the
//! compute device and the time it takes; over a list of candidate plans, the fastest one that
//! fits a budget, or, when none fits, the nearest requests and plans that would.
//!
//! # The model
//!
//! `peak(plan) = max over phases [weights held + activations + workspace]` (weights held:
//! resident ones, this phase's, a stream window in flight). Each term comes from running the
//! pipeline's own phases (`pipeline::run`) and the networks' own code over meta tensors
//! ([`crate::tensor::meta`]), which allocate and free sizes as candle does, with the weights of
//! a manifest (names, shapes, storage dtypes of the real checkpoints, or a checkpoint's
//! headers) held by the residency's rules (`meta_weights`). No network is described twice: a
//! change to a network or to the pipeline changes the prediction with it.
//!
//! Time per stage is `max(compute, prefetch)` plus any synchronous transfer, where
//! compute = FLOPs / matmul rate + elementwise traffic / bandwidth and transfers are weight
//! bytes over the link; the denoising pass runs twice (the first pays the loads of resident
//! and per-phase weights, the second is the steady state) and is multiplied out over the
//! steps.

pub mod choice;
mod device;
pub mod manifest;
mod meta_model;
mod meta_weights;
pub mod report;

use candle_core::quantized::GgmlDType;
use candle_core::DType;

pub use crate::tensor::meta::{ConvImpl, PhaseStat, Segment};
pub use device::{available_ram, ram, DeviceKind, DeviceProfile, HostProfile};
pub use meta_weights::StageCost;

use crate::checkpoint::gguf;
use crate::checkpoint::quantize::{self, QuantSpec};
use crate::component::{Component, Phase};
use crate::error::{Error, Result};
use crate::memory::plan::{ComponentPlan, Placement, Plan};
use crate::model::autoencoder::{AutoEncoder, AutoEncoderConfig};
use crate::model::clip::{ClipConfig, ClipTextModel};
use crate::model::flow::{FlowConfig, Flux};
use crate::model::redux::{ReduxConfig, ReduxEncoder};
use crate::model::t5::{T5Config, T5Encoder};
use crate::model::weights::{held_after_merge, lora_merges, StageSpec};
use crate::pipeline::fill::fill_conditioning;
use crate::pipeline::run::{self, Cond, Start};
use crate::planner::manifest::{Entry, Manifest};
use crate::tensor::meta::{Heap, Meta};
use crate::variant::Variant;
use meta_model::MetaModel;
use meta_weights::MetaWeights;

/// What the planner knows of a model: the four configurations and their checkpoints' manifests.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub variant: Variant,
    pub flow: FlowConfig,
    pub vae: AutoEncoderConfig,
    pub t5: T5Config,
    pub clip: ClipConfig,
    pub flow_manifest: Manifest,
    pub vae_manifest: Manifest,
    pub t5_manifest: Manifest,
    pub clip_manifest: Manifest,
    /// Redux's encoder and its checkpoint, used when a workload has Redux images.
    pub redux: Option<(ReduxConfig, Manifest)>,
}

impl ModelSpec {
    /// A published FLUX.1 variant, from the built-in manifests: no file needed.
    pub fn published(variant: Variant) -> Self {
        Self {
            name: variant.name().to_string(),
            variant,
            flow: variant.flow_config(),
            vae: AutoEncoderConfig::flux(),
            t5: T5Config::xxl(),
            clip: ClipConfig::vit_l_14(),
            flow_manifest: Manifest::flow(variant),
            vae_manifest: Manifest::vae(),
            t5_manifest: Manifest::t5_xxl(),
            clip_manifest: Manifest::clip_l(),
            redux: Some((ReduxConfig::flux(), Manifest::redux())),
        }
    }

    /// A loaded model (configurations read off its checkpoints, manifests from their headers).
    pub fn from_model(model: &crate::pipeline::Model) -> Self {
        Self {
            name: model.name.clone(),
            variant: model.variant,
            flow: model.flow.net.config.clone(),
            vae: model.vae.net.config.clone(),
            t5: model.t5.net.config().clone(),
            clip: model.clip.net.config().clone(),
            flow_manifest: Manifest::from_store(Component::Flow, model.flow.weights.store()),
            vae_manifest: Manifest::from_store(Component::Vae, model.vae.weights.store()),
            t5_manifest: Manifest::from_store(Component::T5, model.t5.weights.store()),
            clip_manifest: Manifest::from_store(Component::Clip, model.clip.weights.store()),
            redux: Some(match &model.redux {
                Some(r) => (
                    r.net.config.clone(),
                    Manifest::from_store(Component::Clip, r.weights.store()),
                ),
                None => (ReduxConfig::flux(), Manifest::redux()),
            }),
        }
    }

    /// A model of these configurations stored in `dtype` (the built-in tiny family: f32).
    pub fn from_configs(
        name: &str,
        variant: Variant,
        flow: FlowConfig,
        vae: AutoEncoderConfig,
        t5: T5Config,
        clip: ClipConfig,
        dtype: DType,
    ) -> Self {
        let m = |kind, shapes| Manifest::from_shapes(kind, name, shapes, dtype);
        Self {
            name: name.to_string(),
            variant,
            flow_manifest: m(Component::Flow, flow.expected_shapes()),
            vae_manifest: m(Component::Vae, vae.expected_shapes()),
            t5_manifest: m(Component::T5, t5.expected_shapes()),
            clip_manifest: m(Component::Clip, clip.expected_shapes()),
            redux: None,
            flow,
            vae,
            t5,
            clip,
        }
    }

    pub fn manifest(&self, kind: Component) -> &Manifest {
        match kind {
            Component::T5 => &self.t5_manifest,
            Component::Clip => &self.clip_manifest,
            Component::Flow => &self.flow_manifest,
            Component::Vae => &self.vae_manifest,
        }
    }

    /// The stages a component's network asks for, in order (as the pipeline builds them).
    pub fn stages(&self, kind: Component) -> Vec<StageSpec> {
        match kind {
            Component::T5 => T5Encoder::new(self.t5.clone()).stages(),
            Component::Clip => ClipTextModel::new(self.clip.clone()).stages(),
            Component::Flow => Flux::new(self.flow.clone(), None).stages(),
            Component::Vae => {
                let ae = AutoEncoder::new(self.vae.clone(), None);
                let mut s = ae.encoder_stages();
                s.extend(ae.decoder_stages());
                s
            }
        }
    }

    /// Bytes of a component's weights in `dtype`.
    pub fn bytes_as(&self, kind: Component, dtype: DType) -> u64 {
        (self.manifest(kind).params() * dtype.size_in_bytes()) as u64
    }

    /// Per stage: device bytes as held in `dtype` (`packed`: GGUF block tensors at their
    /// stored size), the host staging while it is converted (the largest tensor not stored in
    /// `dtype`, as the residency takes it), and what a packed stage dequantizes into.
    pub fn stage_costs(
        &self,
        kind: Component,
        dtype: DType,
        cpu: bool,
        cp: &ComponentPlan,
        lora_merged: bool,
    ) -> Vec<StageCost> {
        let stages = self.stages(kind);
        stage_costs_of(self.manifest(kind), &stages, dtype, cpu, cp, lora_merged)
    }

    /// Whether any component carries LoRA factors (a merged plan is then worth comparing).
    pub fn has_loras(&self) -> bool {
        Component::ALL.iter().any(|&k| {
            self.manifest(k)
                .entries
                .iter()
                .any(|e| e.name.ends_with(".lora_A.weight"))
        })
    }

    /// This model with its flow and T5 checkpoints stored as `fluxfit quantize --type` would
    /// write them: a prediction for quantized files that need not exist.
    pub fn quantized(&self, spec: &QuantSpec) -> Self {
        Self {
            name: format!("{} ({})", self.name, gguf::type_name(spec.target)),
            flow_manifest: self
                .flow_manifest
                .quantized(quantize::Component::Flow, spec),
            t5_manifest: self.t5_manifest.quantized(quantize::Component::T5, spec),
            ..self.clone()
        }
    }

    /// Whether any weight of `kind` is stored in a GGUF block type (a `+packed` plan helps).
    pub fn packable(&self, kind: Component) -> bool {
        self.manifest(kind).entries.iter().any(Entry::packable)
    }
}

/// Per stage of `stages`: the costs [`ModelSpec::stage_costs`] describes, from manifest `m`.
fn stage_costs_of(
    m: &Manifest,
    stages: &[StageSpec],
    dtype: DType,
    cpu: bool,
    cp: &ComponentPlan,
    lora_merged: bool,
) -> Vec<StageCost> {
    let packed = cp.packed || cp.qmatmul;
    // Weights a `+qmatmul` plan multiplies as they are: never dequantized.
    let by_qmm = |e: &Entry| {
        cp.qmatmul
            && cpu
            && e.ggml.is_some_and(|t| {
                crate::memory::residency::multiplied_quantized(
                    &candle_core::Device::Cpu,
                    &e.name,
                    &e.shape,
                    t,
                )
            })
    };
    stages
        .iter()
        .map(|spec| {
            let mut entries: Vec<_> = m.stage_entries(spec).collect();
            // `lora=merged`: the residency's rule (`model::weights::lora_merges`).
            let mut merges = Vec::new();
            let mut renamed = Vec::new();
            if lora_merged {
                let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
                let is_packed =
                    |k: &str| packed && entries.iter().any(|e| e.name == k && e.packable());
                let layers = lora_merges(&names, is_packed);
                let kept = held_after_merge(&names, &layers);
                let shape = |k: String| {
                    entries
                        .iter()
                        .find(|e| e.name == k)
                        .map(|e| e.shape.clone())
                        .unwrap_or_default()
                };
                for x in &layers {
                    merges.push([
                        shape(format!("{x}.weight")),
                        shape(format!("{x}.lora_A.weight")),
                        shape(format!("{x}.lora_B.weight")),
                    ]);
                    let up_bias = format!("{x}.lora_B.bias");
                    if kept.contains(&up_bias.as_str()) {
                        renamed.push((up_bias, format!("{x}.bias")));
                    }
                }
                let kept: Vec<String> = kept.into_iter().map(String::from).collect();
                entries.retain(|e| kept.contains(&e.name));
            }
            let is_packed = |e: &&Entry| packed && e.packable();
            let dense = |e: &&Entry| e.numel() * dtype.size_in_bytes();
            let held_name = |n: &String| {
                renamed
                    .iter()
                    .find(|(from, _)| from == n)
                    .map_or_else(|| n.clone(), |(_, to)| to.clone())
            };
            StageCost {
                name: spec.name.clone(),
                root: spec.root.clone(),
                merges,
                tensors: entries
                    .iter()
                    .map(|e| (held_name(&e.name), e.shape.clone()))
                    .collect(),
                qmm: entries
                    .iter()
                    .filter(|e| is_packed(e) && by_qmm(e))
                    .map(|e| e.name.clone())
                    .collect(),
                bytes: entries
                    .iter()
                    .map(|e| if is_packed(e) { e.nbytes() } else { dense(e) })
                    .sum(),
                staging: entries
                    .iter()
                    .filter(|e| !is_packed(e))
                    .filter(|e| !cpu || e.dtype != dtype)
                    .map(|e| e.numel() * e.dtype.size_in_bytes())
                    .max()
                    .unwrap_or(0),
                unpacked: entries
                    .iter()
                    .filter(|e| is_packed(e) && !by_qmm(e))
                    .map(dense)
                    .sum(),
            }
        })
        .collect()
}

/// What a run asks of memory and time: the image and text sizes, the steps, any conditioning
/// image. How it runs is the [`Plan`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Workload {
    pub width: usize,
    pub height: usize,
    pub t5_tokens: usize,
    pub steps: usize,
    /// A conditioning image is encoded (fill, canny, depth, kontext; img2img).
    pub image_input: bool,
    /// The conditioning image's own size where it is not the output's (Kontext encodes it at
    /// one of its preferred resolutions).
    pub cond_size: Option<(usize, usize)>,
    /// Redux images: SigLIP runs once per image in the encode phase, and each adds its tokens
    /// (729 with FLUX.1-Redux-dev) to the text sequence of every flow step.
    pub redux_images: usize,
}

impl Workload {
    /// What a request asks of memory (text to image: no image input).
    pub fn of(req: &crate::pipeline::Request) -> Self {
        Self {
            width: req.width,
            height: req.height,
            t5_tokens: req.t5_tokens,
            steps: req.steps,
            image_input: false,
            cond_size: None,
            redux_images: 0,
        }
    }

    /// The reference's defaults for `variant` at `width` × `height` (text to image).
    pub fn new(variant: Variant, width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            t5_tokens: variant.t5_tokens(),
            steps: variant.default_steps(),
            image_input: false,
            cond_size: None,
            redux_images: 0,
        }
    }

    /// The size the conditioning image is encoded at.
    pub fn cond_size(&self) -> (usize, usize) {
        self.cond_size.unwrap_or((self.width, self.height))
    }

    /// Image tokens of the flow model (a kontext conditioning image adds its own).
    pub fn image_tokens(&self, variant: Variant) -> usize {
        let l = crate::sampling::image_seq_len(self.height, self.width);
        if self.image_input && variant == Variant::DevKontext {
            let (w, h) = self.cond_size();
            l + crate::sampling::image_seq_len(h, w)
        } else {
            l
        }
    }
}

/// One phase's prediction. Bytes on the compute device unless said otherwise.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PhasePrediction {
    pub phase: Phase,
    /// The largest total: weights + activations + workspace at the same moment.
    pub total: u64,
    /// Weights held at that moment (resident, this phase's, a stream window in flight).
    pub weights: u64,
    pub activations: u64,
    /// Buffers of kernels (convolution im2col, matmul packing, staging of a conversion).
    pub workspace: u64,
    /// Largest weights held at any moment of the phase.
    pub weights_peak: u64,
    /// Host memory of components computing on the CPU while the device is a GPU.
    pub host: u64,
    pub time_s: f64,
    /// Of which: weights brought over the link before they could be used.
    pub transfer_s: f64,
}

/// A plan's prediction for a request.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Prediction {
    /// Short name (`phase+t5cpu`, `stream 1×2`).
    pub label: String,
    /// The placements in `--plan` syntax.
    pub spec: String,
    #[serde(skip)]
    pub plan: Plan,
    pub phases: Vec<PhasePrediction>,
    /// Largest phase total.
    pub peak: u64,
    /// Largest host memory of cpu-placed components.
    pub host_peak: u64,
    /// One image, loads included.
    pub time_s: f64,
    /// Each further image of a session (resident weights already loaded).
    pub warm_time_s: f64,
}

impl Prediction {
    pub fn phase(&self, phase: Phase) -> Option<&PhasePrediction> {
        self.phases.iter().find(|p| p.phase == phase)
    }
}

/// The dtype a component computes in under `plan` on `device`, as `pipeline::model` decides it:
/// the VAE computes in f32 wherever it runs on the CPU (candle has no half-precision CPU conv).
pub fn effective_dtype(plan: &Plan, kind: Component, device: &DeviceProfile) -> DType {
    let cp = plan.component(kind);
    let on_cpu = device.is_cpu() || cp.placement == Placement::Cpu;
    if kind == Component::Vae && on_cpu {
        DType::F32
    } else {
        cp.compute
    }
}

/// Predicts the peak bytes per phase and the time of `plan` for `req`: the pipeline's phases
/// (`pipeline::run`) and the networks run over meta tensors, with the plan's weights.
pub fn predict(
    model: &ModelSpec,
    req: &Workload,
    plan: &Plan,
    device: &DeviceProfile,
) -> Prediction {
    let passes = 2.min(req.steps.max(1));
    let stats = run_meta(model, req, plan, device, passes).unwrap_or_else(|e| {
        // The networks refuse only shapes the request validation refuses first.
        panic!(
            "planning {} at {}x{}: {e}",
            model.name, req.width, req.height
        )
    });
    let mut phases = Vec::new();
    let (mut time, mut warm) = (0.0, 0.0);
    for st in &stats {
        let (t, transfer, resident_loads) = phase_time(st, req.steps, device, plan, model);
        time += t;
        warm += t - resident_loads;
        phases.push(PhasePrediction {
            phase: st.name,
            total: st.peak,
            weights: st.at_peak[0],
            activations: st.at_peak[1],
            workspace: st.at_peak[2],
            weights_peak: st.weights_peak,
            host: st.host_peak,
            time_s: t,
            transfer_s: transfer,
        });
    }
    Prediction {
        label: label(plan),
        spec: plan.spec(),
        plan: plan.clone(),
        peak: phases.iter().map(|p| p.total).max().unwrap_or(0),
        host_peak: phases.iter().map(|p| p.host).max().unwrap_or(0),
        phases,
        time_s: time,
        warm_time_s: warm,
    }
}

/// One run of the request over meta tensors, `passes` denoising steps: what each phase held.
fn run_meta(
    model: &ModelSpec,
    req: &Workload,
    plan: &Plan,
    device: &DeviceProfile,
    passes: usize,
) -> Result<Vec<PhaseStat>> {
    let heap = Heap::new(device.meta_config());
    // A component's weights under the plan, from its stage costs (dtype, on the CPU, plan).
    let weights_with =
        |kind: Component, costs: &dyn Fn(DType, bool, &ComponentPlan) -> Vec<StageCost>| {
            let dtype = effective_dtype(plan, kind, device);
            let cp = plan.component(kind);
            let cpu = device.is_cpu() || cp.placement == Placement::Cpu;
            let dev = if cp.placement == Placement::Cpu {
                heap.host()
            } else {
                heap.device()
            };
            MetaWeights::new(kind, cp.placement, dtype, dev, costs(dtype, cpu, cp))
        };
    let weights = |kind: Component| {
        weights_with(kind, &|dtype, cpu, cp| {
            model.stage_costs(kind, dtype, cpu, cp, plan.merges_loras(kind))
        })
    };
    let m = MetaModel {
        name: model.name.clone(),
        variant: model.variant,
        heap: heap.clone(),
        device: heap.device(),
        dtype: plan.flow.compute,
        vae_tile: plan.vae_tile,
        flow: (
            Flux::new(model.flow.clone(), plan.attn_chunk),
            weights(Component::Flow),
        ),
        vae: (
            AutoEncoder::new(model.vae.clone(), plan.attn_chunk),
            weights(Component::Vae),
        ),
        t5: (T5Encoder::new(model.t5.clone()), weights(Component::T5)),
        clip: (
            ClipTextModel::new(model.clip.clone()),
            weights(Component::Clip),
        ),
        redux: match (&model.redux, req.redux_images) {
            (_, 0) => None,
            (None, n) => {
                return Err(crate::Error::InvalidRequest(format!(
                    "{} Redux images asked of {}, which has no Redux encoder",
                    n, model.name
                )))
            }
            (Some((config, manifest)), _) => {
                // Redux computes under CLIP's placement (see `pipeline::redux`).
                let net = ReduxEncoder::new(config.clone());
                let stages = net.stages();
                let w = weights_with(Component::Clip, &|dtype, cpu, cp| {
                    stage_costs_of(manifest, &stages, dtype, cpu, cp, false)
                });
                Some((net, w))
            }
        },
    };
    let s = crate::pipeline::Request {
        prompt: String::new(),
        width: req.width,
        height: req.height,
        steps: passes,
        guidance: 3.5,
        seed: 0,
        t5_tokens: req.t5_tokens,
        noise: crate::noise::NoiseKind::TorchF32,
    };
    let on_event = &mut |_| {};
    let host = heap.host();
    // Images arrive as f32 tensors on the host, made in the encode phase.
    let image = |w: usize, h: usize, c: usize| Meta::alloc(&[1, c, h, w], DType::F32, &host);
    let dtype = m.dtype;
    let (w, h) = (req.width, req.height);
    let redux_inputs = || -> Vec<run::ReduxInput<Meta>> {
        let size = model.redux.as_ref().map_or(0, |(c, _)| c.siglip.image_size);
        (0..req.redux_images)
            .map(|_| run::ReduxInput {
                pixels: image(size, size, 3),
                strength: 1.0,
            })
            .collect()
    };
    match (req.image_input, model.variant) {
        _ if req.redux_images > 0 => {
            // Redux: SigLIP beside the text encoders, then text to image (or img2img) with the
            // longer text sequence.
            let cond = || {
                let tokens = run::redux_tokens(&m, &redux_inputs())?;
                let z = if req.image_input {
                    Some(run::encode_image(&m, &image(w, h, 3))?)
                } else {
                    None
                };
                Ok((tokens, z))
            };
            run::conditioned(
                &m,
                &s,
                None,
                on_event,
                cond,
                |txt, vec, (tokens, z), on_event| {
                    let txt = run::append_tokens(txt, tokens)?;
                    let start = match z {
                        Some(z) => Start::Img2Img(z, 1.0),
                        None => Start::Noise,
                    };
                    run::denoise_decode(&m, &s, &txt, vec, start, Cond::None, on_event)
                },
            )?;
        }
        (false, _) => {
            use Component::{Clip, T5};
            let (txt, vec) = run::phase(&m, Phase::Encode, &[T5, Clip], on_event, |_| {
                run::encode_text(&m, "", req.t5_tokens)
            })?;
            run::denoise_decode(&m, &s, &txt, &vec, Start::Noise, Cond::None, on_event)?;
        }
        (true, Variant::DevFill) => {
            let cond = || {
                let mask = image(w, h, 1);
                fill_conditioning(&image(w, h, 3), &mask, dtype, |x| run::encode_image(&m, x))
            };
            run::conditioned(&m, &s, None, on_event, cond, |txt, vec, c, on_event| {
                run::denoise_decode(&m, &s, txt, vec, Start::Noise, Cond::Channels(c), on_event)
            })?;
        }
        (true, Variant::DevCanny | Variant::DevDepth) => {
            let cond = || run::control_latent(&m, &image(w, h, 3));
            run::conditioned(&m, &s, None, on_event, cond, |txt, vec, c, on_event| {
                run::denoise_decode(&m, &s, txt, vec, Start::Noise, Cond::Channels(c), on_event)
            })?;
        }
        (true, Variant::DevKontext) => {
            let (cw, ch) = req.cond_size();
            let cond = || run::kontext_tokens(&m, &image(cw, ch, 3));
            run::conditioned(
                &m,
                &s,
                None,
                on_event,
                cond,
                |txt, vec, (t, ids), on_event| {
                    let c = Cond::Tokens(t, ids);
                    run::denoise_decode(&m, &s, txt, vec, Start::Noise, c, on_event)
                },
            )?;
        }
        (true, _) => {
            // img2img from the whole schedule (strength 1 costs what any strength does).
            let cond = || run::encode_image(&m, &image(w, h, 3));
            run::conditioned(&m, &s, None, on_event, cond, |txt, vec, z, on_event| {
                let start = Start::Img2Img(z, 1.0);
                run::denoise_decode(&m, &s, txt, vec, start, Cond::None, on_event)
            })?;
        }
    }
    let mut phases = heap.take_phases();
    if let Some(d) = phases.iter_mut().find(|p| p.name == Phase::Denoise) {
        d.passes = passes;
    }
    Ok(phases)
}

/// (time, of which synchronous transfers, of which loads of resident weights) of a phase.
fn phase_time(
    st: &PhaseStat,
    steps: usize,
    device: &DeviceProfile,
    plan: &Plan,
    model: &ModelSpec,
) -> (f64, f64, f64) {
    let _ = model;
    let seg_time = |s: &Segment| -> (f64, f64, f64) {
        let component = s.owner.map(|i| Component::ALL[i]);
        let (rate, bw, conv) = match (s.host, component) {
            (true, _) => (
                device.host.f32_flops,
                device.host.bandwidth,
                device::CPU_CONV_EFFICIENCY,
            ),
            (false, Some(c)) => (
                device.flops(effective_dtype(plan, c, device)),
                device.bandwidth,
                device.conv_efficiency,
            ),
            (false, None) => (
                device.flops(plan.flow.compute),
                device.bandwidth,
                device.conv_efficiency,
            ),
        };
        let compute =
            (s.flops - s.conv_flops) / rate + s.conv_flops / (rate * conv) + s.traffic / bw;
        let sync = s.sync_bytes / device.link;
        let prefetch = s.async_bytes / device.link;
        let resident = match component {
            Some(c) if plan.component(c).placement == Placement::Resident => sync,
            _ => 0.0,
        };
        let t = if device.copy_overlap {
            sync + compute.max(prefetch)
        } else {
            sync + compute + prefetch
        };
        (
            t,
            sync + if device.copy_overlap { 0.0 } else { prefetch },
            resident,
        )
    };
    // The flow model's segments repeat once per pass; the first pass loads, the last is the
    // steady state that the remaining steps repeat.
    let flow_segs: Vec<&Segment> = st
        .segments
        .iter()
        .filter(|s| s.owner == Some(Component::Flow as usize))
        .collect();
    let other: Vec<&Segment> = st
        .segments
        .iter()
        .filter(|s| s.owner != Some(Component::Flow as usize))
        .collect();
    let (mut t, mut tr, mut res) = (0.0, 0.0, 0.0);
    for s in other {
        let (a, b, c) = seg_time(s);
        t += a;
        tr += b;
        res += c;
    }
    if !flow_segs.is_empty() {
        let passes = st.passes.max(1);
        let per = flow_segs.len() / passes;
        let pass = |i: usize| -> (f64, f64, f64) {
            flow_segs[i * per..(i + 1) * per]
                .iter()
                .map(|s| seg_time(s))
                .fold((0.0, 0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2))
        };
        let first = pass(0);
        let steady = pass(passes - 1);
        let rest = steps.saturating_sub(1) as f64;
        t += first.0 + rest * steady.0;
        tr += first.1 + rest * steady.1;
        res += first.2;
    }
    (t, tr, res)
}

/// A short name for a plan: its placements, the attention chunk and VAE tile when set.
pub fn label(plan: &Plan) -> String {
    let p = |k: Component| plan.component(k).placement;
    use Component::*;
    let all_same = |pl: Placement| Component::ALL.iter().all(|k| p(*k) == pl);
    let mut s = if all_same(Placement::Resident) {
        "resident".to_string()
    } else if all_same(Placement::Phase) {
        "phase".to_string()
    } else {
        let name = |pl: Placement| match pl {
            Placement::Resident => "resident".to_string(),
            Placement::Phase => "phase".to_string(),
            Placement::Stream {
                group,
                window,
                keep: 0,
            } => format!("stream {group}×{window}"),
            Placement::Stream {
                group,
                window,
                keep,
            } => format!("stream {group}×{window}, {keep} kept"),
            Placement::Cpu => "cpu".to_string(),
        };
        let mut parts = vec![format!("flow {}", name(p(Flow)))];
        if p(T5) != Placement::Phase {
            parts.push(format!("t5 {}", name(p(T5))));
        }
        for k in [Clip, Vae] {
            if p(k) != Placement::Phase {
                parts.push(format!("{} {}", k.name(), name(p(k))));
            }
        }
        parts.join(", ")
    };
    match (plan.flow.packed, plan.t5.packed) {
        (true, true) => s += ", flow+t5 packed",
        (true, false) => s += ", flow packed",
        (false, true) => s += ", t5 packed",
        _ => {}
    }
    if let Some(t) = plan.vae_tile {
        s += &format!(", vae tile {t}");
    }
    if plan.lora_merged {
        s += ", lora merged";
    }
    s
}

/// `candidates`, each also with the GGUF block-quantized weights of `model` kept packed on the
/// device (`+packed`), when it has any: the same plans at a fraction of the weights' bytes,
/// for the cost of dequantizing each stage when it is used. With LoRAs attached, each of those
/// also with the LoRAs merged (`lora=merged`): no low-rank term per call, a merge per load,
/// so the planner picks merged or unmerged by predicted time.
pub fn with_packed(candidates: &[Candidate], model: &ModelSpec) -> Vec<Candidate> {
    let (flow, t5) = (
        model.packable(Component::Flow),
        model.packable(Component::T5),
    );
    let mut out = candidates.to_vec();
    if flow || t5 {
        for c in candidates {
            let mut p = c.clone();
            p.plan.flow.packed = flow;
            p.plan.t5.packed = t5;
            out.push(p);
        }
    }
    if model.has_loras() {
        for c in out.clone() {
            let mut p = c;
            p.plan.lora_merged = true;
            out.push(p);
        }
    }
    out
}

/// The VAE tile sides (pixels) the planner considers, largest first.
pub const VAE_TILES: [usize; 3] = [1024, 512, 256];

/// A plan the planner considers, and what it waits for if it cannot run yet.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub plan: Plan,
    /// A feature this plan needs that fluxfit does not have yet (`None`: runnable now).
    pub needs: Option<&'static str>,
}

/// The plans worth considering, fastest first in intent: everything resident; per phase (the
/// reference's `--offload`, improved); T5 on the CPU; the flow model streamed in groups of 4, 2
/// and 1 blocks with the next group prefetched; T5 streamed too; the smallest: synchronous
/// streaming of single blocks with a short attention chunk. `dtype` is the compute dtype (bf16
/// on a GPU, f32 on the CPU); T5 on the CPU computes in f32 there.
pub fn candidates(
    device: &DeviceProfile,
    dtype: DType,
    attn_chunk: Option<usize>,
) -> Vec<Candidate> {
    let base = Plan::resident(dtype, attn_chunk);
    let with = |spec: &str| -> Plan {
        let mut p = base.with_spec(spec).expect("built-in plan specs parse");
        if p.t5.placement == Placement::Cpu {
            p.t5.compute = DType::F32;
        }
        p
    };
    let mut out: Vec<Candidate> = Vec::new();
    let mut add = |p: Plan, needs: Option<&'static str>| {
        if !out.iter().any(|c| c.plan == p) {
            out.push(Candidate { plan: p, needs });
        }
    };
    add(with("resident"), None);
    add(with("phase"), None);
    add(with("phase,flow=resident,vae=resident"), None);
    let cpu_t5 = !device.is_cpu();
    if cpu_t5 {
        add(with("phase,t5=cpu"), None);
    }
    for g in [4, 2, 1] {
        add(with(&format!("phase,flow=stream:{g}:2")), None);
        if cpu_t5 {
            add(with(&format!("phase,flow=stream:{g}:2,t5=cpu")), None);
        }
    }
    add(with("stream:1:2"), None);
    let mut min = with("stream:1:1");
    min.attn_chunk = Some(attn_chunk.map_or(256, |c| c.min(256)));
    add(min.clone(), None);
    // Tiled VAE decoding bounds the decode phase by the tile instead of the image.
    for base in [with("phase"), with("stream:1:2"), min] {
        for tile in VAE_TILES {
            let mut tiled = base.clone();
            tiled.vae_tile = Some(tile);
            add(tiled, None);
        }
    }
    out
}

/// A budget: device bytes available to fluxfit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Budget {
    pub bytes: u64,
}

impl Budget {
    /// Whether a prediction fits, with the device's reserve.
    pub fn fits(&self, p: &Prediction, device: &DeviceProfile) -> bool {
        p.peak + device.reserve <= self.bytes
    }
}

/// Parses `12GB`, `12G`, `12GiB`, `11.5 GB`, `8000MB`, `512MiB`, a plain number of bytes.
/// Sizes are binary (1 GB = 2³⁰ bytes), as cards are sold and `nvidia-smi` counts: a "12 GB"
/// card has 12 GiB.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        Error::InvalidRequest(format!(
            "`{s}` is not a size; write it like 12GB, 11.5GiB, 8000MB or 512MiB"
        ))
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(Error::InvalidRequest(format!(
                "`{s}`: unknown unit `{other}` (use B, KB, MB, GB or TB; all binary)"
            )))
        }
    };
    Ok((value * mult as f64) as u64)
}

/// `bytes` as GiB with one decimal (`11.4 GiB`), or MiB below 1 GiB.
pub fn format_bytes(bytes: u64) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.1} GiB")
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// A duration for people: ms, s or h.
pub fn format_secs(t: f64) -> String {
    if t >= 7200.0 {
        format!("{:.1} h", t / 3600.0)
    } else if t >= 100.0 {
        format!("{t:.0} s")
    } else if t >= 1.0 {
        format!("{t:.1} s")
    } else {
        format!("{:.0} ms", t * 1e3)
    }
}

/// Every candidate's prediction for one request, and the choice for a budget.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlanTable {
    pub model: String,
    pub device: String,
    pub request: Workload,
    pub rows: Vec<Row>,
    /// Time of the all-resident plan (the reference for `relative`).
    pub resident_time_s: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub prediction: Prediction,
    /// Time relative to all-resident.
    pub relative: f64,
    pub needs: Option<&'static str>,
}

impl PlanTable {
    pub fn new(
        model: &ModelSpec,
        req: &Workload,
        device: &DeviceProfile,
        candidates: &[Candidate],
    ) -> Self {
        let preds: Vec<(Prediction, Option<&'static str>)> = candidates
            .iter()
            .map(|c| (predict(model, req, &c.plan, device), c.needs))
            .collect();
        let resident_time_s = preds
            .iter()
            .find(|(p, _)| p.label == "resident")
            .map_or(preds[0].0.time_s, |(p, _)| p.time_s);
        Self {
            model: model.name.clone(),
            device: device.description.clone(),
            request: req.clone(),
            rows: preds
                .into_iter()
                .map(|(prediction, needs)| Row {
                    relative: prediction.time_s / resident_time_s,
                    prediction,
                    needs,
                })
                .collect(),
            resident_time_s,
        }
    }

    /// Partial residency for a budget: for each streaming shape (GROUP×WINDOW), the fastest
    /// plan of that shape that fits `budget` with no flow block kept is extended to keep the
    /// most leading flow blocks that still fit (found by bisection; the peak grows with every
    /// block kept), and added as a row when that is predicted faster. A card that holds part
    /// of the model then streams only the rest, and moves fewer bytes per step.
    pub fn add_partial_residency(
        &mut self,
        model: &ModelSpec,
        req: &Workload,
        device: &DeviceProfile,
        budget: Budget,
    ) {
        let stages = model.stages(Component::Flow).len();
        let mut bases: Vec<((usize, usize), &Row)> = Vec::new();
        for row in &self.rows {
            let p = &row.prediction;
            let Placement::Stream {
                group,
                window,
                keep: 0,
            } = p.plan.flow.placement
            else {
                continue;
            };
            if row.needs.is_some() || !budget.fits(p, device) {
                continue;
            }
            match bases
                .iter_mut()
                .find(|(shape, _)| *shape == (group, window))
            {
                Some((_, best)) if best.prediction.time_s <= p.time_s => {}
                Some((_, best)) => *best = row,
                None => bases.push(((group, window), row)),
            }
        }
        let mut added: Vec<Row> = Vec::new();
        for ((group, window), row) in bases {
            let p = &row.prediction;
            let with_keep = |keep: usize| {
                let mut plan = p.plan.clone();
                plan.flow.placement = Placement::Stream {
                    group,
                    window,
                    keep,
                };
                predict(model, req, &plan, device)
            };
            // Largest `keep` below `stages` whose prediction fits.
            let (mut lo, mut hi, mut best) = (0, stages.saturating_sub(1), None);
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                let pred = with_keep(mid);
                if budget.fits(&pred, device) {
                    lo = mid;
                    best = Some(pred);
                } else {
                    hi = mid - 1;
                }
            }
            if let Some(pred) = best.filter(|b| b.time_s < p.time_s) {
                added.push(Row {
                    relative: pred.time_s / self.resident_time_s,
                    prediction: pred,
                    needs: None,
                });
            }
        }
        self.rows.extend(added);
    }

    /// The fastest runnable plan that fits the budget (and the host's RAM, where known).
    pub fn fastest_fitting(&self, budget: Budget, device: &DeviceProfile) -> Option<&Row> {
        self.rows
            .iter()
            .filter(|r| r.needs.is_none() && budget.fits(&r.prediction, device))
            .filter(|r| {
                device.is_cpu()
                    || device
                        .host
                        .memory
                        .is_none_or(|m| r.prediction.host_peak <= m)
            })
            .min_by(|a, b| {
                a.prediction
                    .time_s
                    .total_cmp(&b.prediction.time_s)
                    .then(
                        a.prediction
                            .warm_time_s
                            .total_cmp(&b.prediction.warm_time_s),
                    )
                    .then(a.prediction.peak.cmp(&b.prediction.peak))
            })
    }

    /// The smallest runnable plan (the faster of equal peaks).
    pub fn smallest(&self) -> Option<&Row> {
        self.rows
            .iter()
            .filter(|r| r.needs.is_none())
            .min_by(|a, b| {
                a.prediction
                    .peak
                    .cmp(&b.prediction.peak)
                    .then(a.prediction.time_s.total_cmp(&b.prediction.time_s))
            })
    }
}

/// Something that would fit when the request as asked does not.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Alternative {
    pub description: String,
    pub peak: u64,
    /// What it waits for, if fluxfit cannot do it yet.
    pub needs: Option<&'static str>,
}

/// The nearest feasible alternatives for a request no runnable plan fits: the largest size of
/// the same aspect ratio that fits, T5 on the CPU, fewer T5 tokens, and the plans that need a
/// feature fluxfit does not have yet (tiled VAE, quantized weights).
pub fn alternatives(
    model: &ModelSpec,
    req: &Workload,
    device: &DeviceProfile,
    cands: &[Candidate],
    budget: Budget,
) -> Vec<Alternative> {
    let mut out = Vec::new();
    let runnable: Vec<&Candidate> = cands.iter().filter(|c| c.needs.is_none()).collect();
    let best = |r: &Workload| -> Option<Prediction> {
        runnable
            .iter()
            .map(|c| predict(model, r, &c.plan, device))
            .filter(|p| budget.fits(p, device))
            .min_by(|a, b| a.time_s.total_cmp(&b.time_s))
    };
    // The largest size of this aspect ratio that fits, sides multiples of 16.
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    let sized = |f: f64| -> Workload {
        let side = |v: usize| (((v as f64 * f) as usize) / 16 * 16).max(64);
        Workload {
            width: side(req.width),
            height: side(req.height),
            ..req.clone()
        }
    };
    if best(&sized(0.0)).is_some() {
        for _ in 0..8 {
            let mid = (lo + hi) / 2.0;
            if best(&sized(mid)).is_some() {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let r = sized(lo);
        if let Some(p) = best(&r) {
            out.push(Alternative {
                description: format!(
                    "{}x{} (the largest of this aspect ratio that fits) with plan `{}`",
                    r.width, r.height, p.label
                ),
                peak: p.peak,
                needs: None,
            });
        }
    }
    if req.t5_tokens > 128 {
        let r = Workload {
            t5_tokens: 128,
            ..req.clone()
        };
        if let Some(p) = best(&r) {
            out.push(Alternative {
                description: format!("--t5-tokens 128 with plan `{}`", p.label),
                peak: p.peak,
                needs: None,
            });
        }
    }
    for c in cands.iter().filter(|c| c.needs.is_some()) {
        let p = predict(model, req, &c.plan, device);
        if budget.fits(&p, device) {
            out.push(Alternative {
                description: format!("plan `{}`", p.label),
                peak: p.peak,
                needs: c.needs,
            });
        }
    }
    // Quantized storage kept packed on the device: the fastest fitting plan with the flow and
    // T5 weights stored as 8-bit, then 4-bit GGUF (what `fluxfit quantize` writes).
    if !model.packable(Component::Flow) {
        let plain: Vec<Candidate> = runnable.iter().map(|c| (*c).clone()).collect();
        for t in [GgmlDType::Q8_0, GgmlDType::Q4K] {
            let q = model.quantized(&QuantSpec::new(t));
            let best = with_packed(&plain, &q)
                .iter()
                .filter(|c| c.plan.flow.packed)
                .map(|c| predict(&q, req, &c.plan, device))
                .filter(|p| budget.fits(p, device))
                .min_by(|a, b| a.time_s.total_cmp(&b.time_s));
            if let Some(p) = best {
                let name = gguf::type_name(t);
                out.push(Alternative {
                    description: format!(
                        "the flow and T5 weights as {name} (`--quant {name}` quantizes them on load, `fluxfit quantize --type {name}` writes the file) with plan `{}`",
                        p.label
                    ),
                    peak: p.peak,
                    needs: None,
                });
                break;
            }
        }
    }
    out
}

/// A plan from placements per component, for callers that build plans by hand.
pub fn plan_of(
    dtype: DType,
    attn_chunk: Option<usize>,
    placements: [(Component, Placement); 4],
) -> Plan {
    let mut p = Plan::resident(dtype, attn_chunk);
    for (k, pl) in placements {
        *p.component_mut(k) = ComponentPlan {
            placement: pl,
            compute: if pl == Placement::Cpu {
                DType::F32
            } else {
                dtype
            },
            packed: false,
            qmatmul: false,
        };
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn gpu() -> DeviceProfile {
        let mut d = DeviceProfile::generic_cuda(Some(24 * GIB));
        d.host = HostProfile {
            f32_flops: 200e9,
            bandwidth: 20e9,
            threads: 8,
            memory: Some(64 * GIB),
        };
        d
    }

    fn plan(spec: &str) -> Plan {
        let mut p = Plan::resident(DType::BF16, Some(1024))
            .with_spec(spec)
            .unwrap();
        if p.t5.placement == Placement::Cpu {
            p.t5.compute = DType::F32;
        }
        p
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_bytes("12GB").unwrap(), 12 * GIB);
        assert_eq!(parse_bytes("12 GiB").unwrap(), 12 * GIB);
        assert_eq!(parse_bytes("11.5G").unwrap(), 23 * GIB / 2);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("twelve").is_err());
        assert!(parse_bytes("12 parsecs").is_err());
    }

    #[test]
    fn resident_holds_every_weight_and_phase_only_its_own() {
        let m = ModelSpec::published(Variant::Dev);
        let req = Workload::new(Variant::Dev, 1024, 1024);
        let d = gpu();
        let all: u64 = Component::ALL
            .iter()
            .map(|k| m.bytes_as(*k, DType::BF16))
            .sum();
        let r = predict(&m, &req, &plan("resident"), &d);
        // The decode phase of a resident run holds everything but the VAE encoder.
        let enc = {
            let ae = AutoEncoder::new(m.vae.clone(), None);
            ae.encoder_stages()
                .iter()
                .map(|s| m.vae_manifest.stage_numel(s) as u64 * 2)
                .sum::<u64>()
        };
        assert_eq!(r.phase(Phase::Decode).unwrap().weights_peak, all - enc);
        assert!(r.peak >= all - enc);
        let p = predict(&m, &req, &plan("phase"), &d);
        let flow = m.bytes_as(Component::Flow, DType::BF16);
        assert_eq!(p.phase(Phase::Denoise).unwrap().weights_peak, flow);
        // 23.80 GB of flow weights plus activations: the reference's offload does not fit 24 GiB.
        assert!(p.peak + d.reserve > 24 * GIB);
    }

    #[test]
    fn a_stream_window_bounds_the_weights_in_flight() {
        let m = ModelSpec::published(Variant::Dev);
        let req = Workload::new(Variant::Dev, 1024, 1024);
        let stages: Vec<u64> = m
            .stages(Component::Flow)
            .iter()
            .map(|s| m.flow_manifest.stage_numel(s) as u64 * 2)
            .collect();
        for (g, w) in [(1, 1), (1, 2), (2, 2), (4, 2), (2, 3)] {
            let p = predict(
                &m,
                &req,
                &plan(&format!("phase,flow=stream:{g}:{w}")),
                &gpu(),
            );
            let groups: Vec<u64> = stages.chunks(g).map(|c| c.iter().sum()).collect();
            let mut sorted = groups.clone();
            sorted.sort_unstable_by(|a, b| b.cmp(a));
            let bound: u64 = sorted.iter().take(w).sum();
            let d = p.phase(Phase::Denoise).unwrap();
            assert!(
                d.weights_peak <= bound,
                "{g}x{w}: {} > {bound}",
                d.weights_peak
            );
            // Two double blocks (340 M parameters each) are in flight with 1×2.
            if (g, w) == (1, 2) {
                assert_eq!(d.weights_peak, 2 * 339_831_296 * 2);
            }
        }
    }

    #[test]
    fn activations_follow_the_spec_scale() {
        let m = ModelSpec::published(Variant::Dev);
        let d = gpu();
        // docs/flux.md §5: the single-block linear1 output alone is 198 MB at 1024² (L = 4608) and
        // 66 MB at 512² (L = 1536); the denoise activations hold it and more.
        for (side, lin1) in [(1024, 198_180_864u64), (512, 66_060_288)] {
            let p = predict(
                &m,
                &Workload::new(Variant::Dev, side, side),
                &plan("phase"),
                &d,
            );
            let a = p.phase(Phase::Denoise).unwrap().activations;
            assert!(a > lin1 && a < 20 * lin1, "{side}: {a}");
        }
        // The CUDA decoder's im2col of the full-resolution 256-channel conv: 9·256·H·W bf16.
        let p = predict(
            &m,
            &Workload::new(Variant::Dev, 1024, 1024),
            &plan("phase"),
            &d,
        );
        let dec = p.phase(Phase::Decode).unwrap();
        assert!(dec.workspace >= 9 * 256 * 1024 * 1024 * 2, "{dec:?}");
        // T5 at 512 tokens: 64 heads of 512² scores in f32 for the softmax.
        let enc = p.phase(Phase::Encode).unwrap();
        assert!(enc.activations > 64 * 512 * 512 * 4);
    }

    #[test]
    fn peaks_grow_with_resolution_under_every_plan() {
        let m = ModelSpec::published(Variant::Schnell);
        let d = gpu();
        for c in candidates(&d, DType::BF16, Some(1024)) {
            let mut last = 0;
            for side in [256, 512, 768, 1024, 1536] {
                let p = predict(
                    &m,
                    &Workload::new(Variant::Schnell, side, side),
                    &c.plan,
                    &d,
                );
                assert!(p.peak >= last, "{}: {side}", p.label);
                last = p.peak;
            }
        }
    }

    #[test]
    fn the_fastest_fitting_plan_follows_the_budget() {
        let m = ModelSpec::published(Variant::Dev);
        let req = Workload::new(Variant::Dev, 1024, 1024);
        let d = gpu();
        let cands = candidates(&d, DType::BF16, Some(1024));
        let table = PlanTable::new(&m, &req, &d, &cands);
        let pick = |gib: u64| {
            table
                .fastest_fitting(Budget { bytes: gib * GIB }, &d)
                .map(|r| r.prediction.clone())
        };
        assert_eq!(pick(80).unwrap().label, "resident");
        let p12 = pick(12).unwrap();
        assert!(p12.peak + d.reserve <= 12 * GIB);
        assert!(matches!(p12.plan.flow.placement, Placement::Stream { .. }));
        // Resident is never slower than another plan.
        for r in &table.rows {
            assert!(
                r.relative >= 0.999,
                "{}: {}",
                r.prediction.label,
                r.relative
            );
        }
        // At 2 GiB only tiled VAE decoding fits (streamed single blocks); at 1 GiB nothing.
        let p2 = pick(2).expect("a tiled plan fits 2 GiB");
        assert!(p2.plan.vae_tile.is_some(), "{}", p2.label);
        let untiled = PlanTable::new(
            &m,
            &req,
            &d,
            &cands
                .iter()
                .filter(|c| c.plan.vae_tile.is_none())
                .cloned()
                .collect::<Vec<_>>(),
        );
        assert!(untiled
            .fastest_fitting(Budget { bytes: 2 * GIB }, &d)
            .is_none());
        assert!(pick(1).is_none());
        let alts = alternatives(&m, &req, &d, &cands, Budget { bytes: 4 * GIB });
        assert!(
            alts.iter()
                .any(|a| a.needs.is_none() && a.description.contains('x')),
            "{alts:?}"
        );
    }

    #[test]
    fn every_published_variant_plans_without_weights() {
        let d = gpu();
        for v in Variant::ALL {
            let m = ModelSpec::published(v);
            let mut req = Workload::new(v, 1024, 1024);
            req.image_input = matches!(
                v,
                Variant::DevFill | Variant::DevCanny | Variant::DevDepth | Variant::DevKontext
            );
            let p = predict(&m, &req, &plan("stream:1:2"), &d);
            assert!(p.peak > 0 && p.time_s > 0.0, "{v}");
        }
        // Kontext with its conditioning image has twice the image tokens.
        let m = ModelSpec::published(Variant::DevKontext);
        let mut req = Workload::new(Variant::DevKontext, 1024, 1024);
        let plain = predict(&m, &req, &plan("phase"), &d);
        req.image_input = true;
        let cond = predict(&m, &req, &plan("phase"), &d);
        assert!(
            cond.phase(Phase::Denoise).unwrap().activations
                > plain.phase(Phase::Denoise).unwrap().activations * 3 / 2
        );
    }

    #[test]
    fn t5_on_the_cpu_leaves_the_device_and_takes_host_ram() {
        let m = ModelSpec::published(Variant::Dev);
        let req = Workload::new(Variant::Dev, 1024, 1024);
        let p = predict(&m, &req, &plan("phase,t5=cpu"), &gpu());
        let enc = p.phase(Phase::Encode).unwrap();
        assert!(enc.total < 300 << 20, "{enc:?}");
        // T5 in f32 on the host (candle's CPU matmul has no bf16): 19 GB.
        assert!(p.host_peak >= m.bytes_as(Component::T5, DType::F32));
    }
}
