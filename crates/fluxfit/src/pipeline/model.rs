//! A FLUX.1 model: flow transformer, autoencoder and the two text encoders with their
//! tokenizers, each component's weights held through the residency seam.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

use crate::checkpoint::layout::{self, ModelPaths};
use crate::checkpoint::store::TensorStore;
use crate::error::{Error, Result};
use crate::memory::residency::{Placement, Residency};
use crate::model::autoencoder::{AutoEncoder, AutoEncoderConfig};
use crate::model::clip::{ClipConfig, ClipTextModel};
use crate::model::flow::{FlowConfig, Flux};
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
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            attn_chunk: Some(crate::model::attention::DEFAULT_CHUNK),
            variant: None,
        }
    }
}

/// Files of every component; built from a model folder and the user's overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSources {
    pub flow: PathBuf,
    pub ae: PathBuf,
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
        let ae = pick(overrides.ae, found.ae);
        let t5 = pick(overrides.t5, found.t5);
        let clip = pick(overrides.clip, found.clip);
        let t5_tokenizer = pick(overrides.t5_tokenizer, found.t5_tokenizer)
            .or_else(|| t5.as_deref().and_then(|p| tokenizer_near(p, "tokenizer_2")));
        let clip_tokenizer = pick(overrides.clip_tokenizer, found.clip_tokenizer)
            .or_else(|| clip.as_deref().and_then(|p| tokenizer_near(p, "tokenizer")));
        let mut missing = Vec::new();
        for (part, value, fix) in [
            (
                "flow transformer",
                &flow,
                "--flow FILE|DIR (flux1-*.safetensors or transformer/)",
            ),
            ("autoencoder", &ae, "--ae FILE|DIR (ae.safetensors or vae/)"),
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
            ae: some(ae),
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

/// One component: its network and its weights under the plan.
pub struct Component<N> {
    pub net: N,
    pub weights: Residency,
}

pub struct Model {
    /// Shown to users and recorded in metadata.
    pub name: String,
    pub variant: Variant,
    pub flow: Component<Flux>,
    pub ae: Component<AutoEncoder>,
    pub t5: Component<T5Encoder>,
    pub clip: Component<ClipTextModel>,
    pub t5_tokenizer: T5Tokenizer,
    pub clip_tokenizer: ClipTokenizer,
    pub options: LoadOptions,
}

/// Checkpoint stores of the four components, before configuration.
pub struct Stores {
    pub flow: TensorStore,
    pub ae: TensorStore,
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
            ae: layout::open_ae(&src.ae)?,
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
        stores: Stores,
        t5_tokenizer: T5Tokenizer,
        clip_tokenizer: ClipTokenizer,
        options: LoadOptions,
    ) -> Result<Self> {
        let flow_cfg = FlowConfig::from_store(&stores.flow)?;
        flow_cfg.validate(&stores.flow)?;
        let variant = Variant::infer(&flow_cfg, flow_hint, options.variant)?;
        let ae_cfg = AutoEncoderConfig::from_store(&stores.ae)?;
        ae_cfg.validate(&stores.ae)?;
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
        let o = &options;
        // candle's CPU backend has no bf16/f16 convolution: the VAE computes in f32 there (it is
        // small; the reference keeps its weights in f32 too).
        let ae_dtype = if o.device.is_cpu() {
            DType::F32
        } else {
            o.dtype
        };
        let resident_as = |store: TensorStore, stages, dtype| {
            Residency::new(
                Arc::new(store),
                stages,
                o.device.clone(),
                dtype,
                Placement::Resident,
            )
        };
        let resident = |store: TensorStore, stages| resident_as(store, stages, o.dtype);
        let flow = Flux::new(flow_cfg, o.attn_chunk);
        let ae = AutoEncoder::new(ae_cfg, o.attn_chunk);
        let t5 = T5Encoder::new(t5_cfg);
        let clip = ClipTextModel::new(clip_cfg);
        let mut ae_stages = ae.encoder_stages();
        ae_stages.extend(ae.decoder_stages());
        Ok(Self {
            name: name.to_string(),
            variant,
            flow: Component {
                weights: resident(stores.flow, flow.stages()),
                net: flow,
            },
            ae: Component {
                weights: resident_as(stores.ae, ae_stages, ae_dtype),
                net: ae,
            },
            t5: Component {
                weights: resident(stores.t5, t5.stages()),
                net: t5,
            },
            clip: Component {
                weights: resident(stores.clip, clip.stages()),
                net: clip,
            },
            t5_tokenizer,
            clip_tokenizer,
            options,
        })
    }

    pub fn device(&self) -> &Device {
        &self.options.device
    }

    pub fn dtype(&self) -> DType {
        self.options.dtype
    }
}
