//! A FLUX.1 model: flow transformer, autoencoder and the two text encoders with their
//! tokenizers, each component's weights held through the residency seam.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};

use super::watch::Watch;
use crate::checkpoint::layout::{self, ModelPaths};
use crate::checkpoint::lora;
use crate::checkpoint::quantize::QuantSpec;
use crate::checkpoint::safetensors::SafetensorsFile;
use crate::checkpoint::store::TensorStore;
use crate::error::{Error, Result};
use crate::memory::ledger::Ledger;
use crate::memory::plan::{Component, Placement, Plan};
use crate::memory::residency::{Residency, StageSpec};
use crate::model::autoencoder::{AutoEncoder, AutoEncoderConfig};
use crate::model::clip::{ClipConfig, ClipTextModel};
use crate::model::flow::{FlowConfig, Flux};
use crate::model::redux::ReduxEncoder;
use crate::model::t5::{T5Config, T5Encoder};
use crate::tokenizer::{ClipTokenizer, T5Tokenizer};
use crate::variant::Variant;

/// How to run: where and in what precision.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype: weights are converted to it stage by stage.
    pub dtype: DType,
    /// Attention query-chunk length (None: unchunked).
    pub attn_chunk: Option<usize>,
    /// Forces the variant where shapes cannot tell (dev vs krea vs kontext).
    pub variant: Option<Variant>,
    /// LoRAs attached in order (style LoRAs, a control LoRA on the dev base), stacked.
    pub loras: Vec<LoraSpec>,
    /// Quantize the flow and T5 weights to this type when a `+packed` plan stages them (as
    /// `fluxfit quantize` would store them), for dense files; GGUF files are left as stored.
    pub quantize: Option<GgmlDType>,
}

/// A LoRA file and the scale of its update.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    /// The user's strength, which multiplies the file's own `alpha / rank` where its layout has
    /// one; `None`: 0.85 for BFL's control LoRAs (the reference CLI's `lora_scale`), else 1.
    pub scale: Option<f64>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            attn_chunk: Some(crate::model::attention::DEFAULT_CHUNK),
            variant: None,
            loras: Vec::new(),
            quantize: None,
        }
    }
}

/// Files of every component; built from a model folder and the user's overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSources {
    pub flow: PathBuf,
    pub vae: PathBuf,
    pub t5: PathBuf,
    pub clip: PathBuf,
    pub t5_tokenizer: PathBuf,
    pub clip_tokenizer: PathBuf,
}

impl ModelSources {
    /// Combines a model folder (optional) with explicit parts; names every part still missing
    /// and the flag that supplies it.
    pub fn resolve(dir: Option<&Path>, overrides: ModelPaths) -> Result<Self> {
        let found = match dir {
            Some(d) => ModelPaths::from_dir(d)?,
            None => ModelPaths::default(),
        };
        let pick = |o: Option<PathBuf>, f: Option<PathBuf>| o.or(f);
        let flow = pick(overrides.flow, found.flow);
        let ae = pick(overrides.vae, found.vae);
        let t5 = pick(overrides.t5, found.t5);
        let clip = pick(overrides.clip, found.clip);
        let t5_tokenizer = pick(overrides.t5_tokenizer, found.t5_tokenizer)
            .or_else(|| t5.as_deref().and_then(|p| tokenizer_near(p, "tokenizer_2")));
        let clip_tokenizer = pick(overrides.clip_tokenizer, found.clip_tokenizer)
            .or_else(|| clip.as_deref().and_then(|p| tokenizer_near(p, "tokenizer")));
        let mut missing = Vec::new();
        let several = (flow.is_none() && !found.flow_choices.is_empty()).then(|| {
            let names: Vec<String> = found
                .flow_choices
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect();
            format!(
                "--flow FILE: the folder holds several flow models ({})",
                names.join(", ")
            )
        });
        for (part, value, fix) in [
            (
                "flow transformer",
                &flow,
                "--flow FILE|DIR (flux1-*.safetensors or transformer/)",
            ),
            (
                "autoencoder",
                &ae,
                "--vae FILE|DIR (ae.safetensors or vae/)",
            ),
            ("T5 encoder", &t5, "--t5 DIR (text_encoder_2/)"),
            ("CLIP encoder", &clip, "--clip DIR (text_encoder/)"),
            (
                "T5 tokenizer",
                &t5_tokenizer,
                "a tokenizer_2/ folder beside the T5 folder, or tokenizer.json inside it",
            ),
            (
                "CLIP tokenizer",
                &clip_tokenizer,
                "a tokenizer/ folder beside the CLIP folder, or vocab.json + merges.txt inside it",
            ),
        ] {
            if value.is_none() {
                let fix = match (&several, part) {
                    (Some(s), "flow transformer") => s.as_str(),
                    _ => fix,
                };
                missing.push(format!("{part}: {fix}"));
            }
        }
        if !missing.is_empty() {
            let place = dir.map_or("no --model folder".to_string(), |d| d.display().to_string());
            return Err(Error::Layout {
                path: place.into(),
                message: format!("missing model parts:\n  {}", missing.join("\n  ")),
            });
        }
        let some = |p: Option<PathBuf>| p.expect("checked above");
        Ok(Self {
            flow: some(flow),
            vae: some(ae),
            t5: some(t5),
            clip: some(clip),
            t5_tokenizer: some(t5_tokenizer),
            clip_tokenizer: some(clip_tokenizer),
        })
    }
}

/// A tokenizer folder inside `encoder_dir` or beside it as `sibling`.
fn tokenizer_near(encoder_dir: &Path, sibling: &str) -> Option<PathBuf> {
    let has_files = |d: &Path| d.join("tokenizer.json").is_file() || d.join("vocab.json").is_file();
    if encoder_dir.is_dir() && has_files(encoder_dir) {
        return Some(encoder_dir.to_path_buf());
    }
    let s = encoder_dir.parent()?.join(sibling);
    s.is_dir().then_some(s)
}

/// One part of a model: a component's network and its weights under the plan.
pub struct Part<N> {
    pub net: N,
    pub weights: Residency,
}

pub struct Model {
    /// Shown to users and recorded in metadata.
    pub name: String,
    pub variant: Variant,
    pub flow: Part<Flux>,
    pub vae: Part<AutoEncoder>,
    pub t5: Part<T5Encoder>,
    pub clip: Part<ClipTextModel>,
    /// Redux's image encoder, once attached (see [`Model::attach_redux`]).
    pub redux: Option<Part<ReduxEncoder>>,
    pub t5_tokenizer: T5Tokenizer,
    pub clip_tokenizer: ClipTokenizer,
    pub options: LoadOptions,
    /// What each of `options.loras` adapts.
    pub loras: Vec<lora::LoraSummary>,
    /// Where each component's weights live; see [`Model::set_plan`].
    plan: Plan,
    /// Device bytes by owner, shared by the four residencies.
    ledger: Arc<Ledger>,
    /// Cancellation and previews of the run in progress, when someone watches it.
    watch: Option<Arc<Watch>>,
}

/// Checkpoint stores of the four components, before configuration.
pub struct Stores {
    pub flow: TensorStore,
    pub vae: TensorStore,
    pub t5: TensorStore,
    pub clip: TensorStore,
    /// `config.json` of each text encoder, where the folder has one.
    pub t5_config: Option<PathBuf>,
    pub clip_config: Option<PathBuf>,
    /// Configurations known up front (the built-in tiny model), overriding the above.
    pub t5_known: Option<T5Config>,
    pub clip_known: Option<ClipConfig>,
}

impl Model {
    /// Opens every part (memory-mapped; no weights are read yet) and checks every shape.
    pub fn load(src: &ModelSources, name: &str, options: LoadOptions) -> Result<Self> {
        let stores = Stores {
            flow: layout::open_flow(&src.flow)?,
            vae: layout::open_vae(&src.vae)?,
            t5: layout::open_t5(&src.t5)?,
            clip: layout::open_clip(&src.clip)?,
            t5_config: layout::config_json(&src.t5),
            clip_config: layout::config_json(&src.clip),
            t5_known: None,
            clip_known: None,
        };
        let t5_tok = T5Tokenizer::from_dir(&src.t5_tokenizer)?;
        let clip_tok = ClipTokenizer::from_dir(&src.clip_tokenizer)?;
        let hint = src.flow.to_string_lossy().to_string();
        Self::from_stores(name, &hint, stores, t5_tok, clip_tok, options)
    }

    pub fn from_stores(
        name: &str,
        flow_hint: &str,
        mut stores: Stores,
        t5_tokenizer: T5Tokenizer,
        clip_tokenizer: ClipTokenizer,
        options: LoadOptions,
    ) -> Result<Self> {
        let mut flow_hint = flow_hint.to_string();
        let files = options
            .loras
            .iter()
            .map(|l| {
                Ok(lora::LoraFile {
                    file: SafetensorsFile::open(&l.path)?,
                    scale: l.scale,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let loras = if files.is_empty() {
            Vec::new()
        } else {
            let targets = lora::LoraTargets {
                flow: &mut stores.flow,
                clip: Some(&mut stores.clip),
                t5: Some(&mut stores.t5),
            };
            let mut found = lora::attach(targets, &files)?;
            for s in &mut found {
                s.hash = lora::short_hash(&s.path)?;
            }
            found
        };
        for l in &options.loras {
            // A LoRA's name tells canny from depth (both widen img_in to 128).
            flow_hint = format!("{flow_hint} {}", l.path.to_string_lossy());
        }
        let flow_hint = flow_hint.as_str();
        if let Some(t) = options.quantize {
            let spec = QuantSpec::new(t);
            stores.flow.quantize_on_load(Component::Flow, &spec)?;
            stores.t5.quantize_on_load(Component::T5, &spec)?;
        }
        let flow_cfg = FlowConfig::from_store(&stores.flow)?;
        flow_cfg.validate(&stores.flow)?;
        let variant = Variant::infer(&flow_cfg, flow_hint, options.variant)?;
        let ae_cfg = AutoEncoderConfig::from_store(&stores.vae)?;
        ae_cfg.validate(&stores.vae)?;
        let t5_cfg = match stores.t5_known {
            Some(c) => c,
            None => T5Config::from_store(&stores.t5, stores.t5_config.as_deref())?,
        };
        let clip_cfg = match stores.clip_known {
            Some(c) => c,
            None => ClipConfig::from_store(&stores.clip, stores.clip_config.as_deref())?,
        };
        if t5_cfg.d_model != flow_cfg.context_in_dim {
            return Err(Error::Config(format!(
                "the T5 encoder ({}) outputs {} features but the flow model ({}) takes {} (txt_in.weight)",
                stores.t5.origin().display(),
                t5_cfg.d_model,
                stores.flow.origin().display(),
                flow_cfg.context_in_dim
            )));
        }
        if clip_cfg.hidden_size != flow_cfg.vec_in_dim {
            return Err(Error::Config(format!(
                "the CLIP encoder ({}) outputs {} features but the flow model ({}) takes {} (vector_in.in_layer.weight)",
                stores.clip.origin().display(),
                clip_cfg.hidden_size,
                stores.flow.origin().display(),
                flow_cfg.vec_in_dim
            )));
        }
        let plan = Plan::resident(options.dtype, options.attn_chunk);
        let ledger = Ledger::new(options.device.clone());
        let flow = Flux::new(flow_cfg, options.attn_chunk);
        let ae = AutoEncoder::new(ae_cfg, options.attn_chunk);
        let t5 = T5Encoder::new(t5_cfg);
        let clip = ClipTextModel::new(clip_cfg);
        let mut ae_stages = ae.encoder_stages();
        ae_stages.extend(ae.decoder_stages());
        let weights = |kind, store: TensorStore, stages| {
            residency(
                &ledger,
                &options.device,
                &plan,
                kind,
                Arc::new(store),
                stages,
            )
        };
        Ok(Self {
            name: name.to_string(),
            variant,
            flow: Part {
                weights: weights(Component::Flow, stores.flow, flow.stages()),
                net: flow,
            },
            vae: Part {
                weights: weights(Component::Vae, stores.vae, ae_stages),
                net: ae,
            },
            t5: Part {
                weights: weights(Component::T5, stores.t5, t5.stages()),
                net: t5,
            },
            clip: Part {
                weights: weights(Component::Clip, stores.clip, clip.stages()),
                net: clip,
            },
            redux: None,
            t5_tokenizer,
            clip_tokenizer,
            options,
            loras,
            plan,
            ledger,
            watch: None,
        })
    }

    /// Watches the next runs (cancellation, previews) until replaced or cleared.
    pub fn set_watch(&mut self, watch: Option<Arc<Watch>>) {
        self.watch = watch;
    }

    pub(crate) fn watch(&self) -> Option<&Watch> {
        self.watch.as_deref()
    }

    /// The plan the next run executes.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Quantizes the flow and T5 weights to `t` when a `+packed` plan stages them, as
    /// [`LoadOptions::quantize`] does at load (the planner decided after the headers were read).
    /// Weights already held are dropped.
    pub fn quantize_on_load(&mut self, t: GgmlDType) -> Result<()> {
        let spec = QuantSpec::new(t);
        for kind in [Component::Flow, Component::T5] {
            let mut store = (*self.weights(kind).store_arc()).clone();
            store.quantize_on_load(kind, &spec)?;
            let (stages, w) = match kind {
                Component::Flow => (self.flow.net.stages(), &mut self.flow.weights),
                _ => (self.t5.net.stages(), &mut self.t5.weights),
            };
            *w = residency(
                &self.ledger,
                &self.options.device,
                &self.plan,
                kind,
                Arc::new(store),
                stages,
            );
        }
        self.options.quantize = Some(t);
        Ok(())
    }

    /// Runs under `plan` from now on. Every weight held under the previous plan is dropped;
    /// nothing is loaded until a network asks for it.
    pub fn set_plan(&mut self, plan: Plan) {
        self.flow.net.attn_chunk = plan.attn_chunk;
        self.vae.net.attn_chunk = plan.attn_chunk;
        let dev = self.options.device.clone();
        let mut ae_stages = self.vae.net.encoder_stages();
        ae_stages.extend(self.vae.net.decoder_stages());
        let l = &self.ledger;
        self.flow.weights = residency(
            l,
            &dev,
            &plan,
            Component::Flow,
            self.flow.weights.store_arc(),
            self.flow.net.stages(),
        );
        self.vae.weights = residency(
            l,
            &dev,
            &plan,
            Component::Vae,
            self.vae.weights.store_arc(),
            ae_stages,
        );
        self.t5.weights = residency(
            l,
            &dev,
            &plan,
            Component::T5,
            self.t5.weights.store_arc(),
            self.t5.net.stages(),
        );
        self.clip.weights = residency(
            l,
            &dev,
            &plan,
            Component::Clip,
            self.clip.weights.store_arc(),
            self.clip.net.stages(),
        );
        if let Some(r) = &mut self.redux {
            r.weights = redux_residency(l, &dev, &plan, r.weights.store_arc(), r.net.stages());
        }
        self.plan = plan;
    }

    /// The ledger every component's weights are accounted in; its last report describes the
    /// last run.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// A component's weights.
    pub fn weights(&self, kind: Component) -> &Residency {
        match kind {
            Component::T5 => &self.t5.weights,
            Component::Clip => &self.clip.weights,
            Component::Flow => &self.flow.weights,
            Component::Vae => &self.vae.weights,
        }
    }

    pub fn device(&self) -> &Device {
        &self.options.device
    }

    pub fn dtype(&self) -> DType {
        self.options.dtype
    }
}

/// Redux's residency: it computes beside CLIP in the encode phase, so it takes CLIP's
/// placement and precision, and is accounted in the ledger under its own name.
pub(crate) fn redux_residency(
    ledger: &Arc<Ledger>,
    device: &Device,
    plan: &Plan,
    store: Arc<TensorStore>,
    stages: Vec<StageSpec>,
) -> Residency {
    let cp = plan.component(Component::Clip);
    Residency::in_ledger(
        ledger.clone(),
        "redux",
        store,
        stages,
        device.clone(),
        cp.compute,
        cp.placement,
    )
}

/// A component's residency under `plan`. A `Cpu` placement computes on the CPU; candle's CPU
/// backend has no bf16/f16 convolution, so a VAE computing on the CPU does so in f32 (it is
/// small; the reference keeps its weights in f32 too).
fn residency(
    ledger: &Arc<Ledger>,
    device: &Device,
    plan: &Plan,
    kind: Component,
    store: Arc<TensorStore>,
    stages: Vec<StageSpec>,
) -> Residency {
    let cp = plan.component(kind);
    let on_cpu = device.is_cpu() || cp.placement == Placement::Cpu;
    let dtype = if kind == Component::Vae && on_cpu {
        DType::F32
    } else {
        cp.compute
    };
    Residency::in_ledger(
        ledger.clone(),
        kind.name(),
        store,
        stages,
        device.clone(),
        dtype,
        cp.placement,
    )
    .with_packed(cp.packed)
    .with_qmatmul(cp.qmatmul)
    .with_lora_merged(plan.merges_loras(kind))
}
