//! `--model` and the part overrides → a loaded model.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use fluxfit::checkpoint::layout::{ModelPaths, ReduxPaths};
use fluxfit::pipeline::{tiny, LoadOptions, LoraSpec, Model, ModelRef, ModelSources};
use fluxfit::variant::Variant;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// `tiny` (built in, no download), a local folder (BFL files or a diffusers snapshot), a
    /// variant name (`flux-schnell`, `flux-dev`, ...) or a Hugging Face repo id.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Flow transformer: a BFL `flux1-*.safetensors` file (bf16, f16, fp8) or a diffusers
    /// `transformer/` folder, or a GGUF (`fluxfit quantize`, city96's `flux1-*-Q*.gguf`).
    #[arg(long)]
    pub flow: Option<PathBuf>,
    /// Autoencoder (VAE): `ae.safetensors` or a diffusers `vae/` folder (`--ae` is accepted too).
    #[arg(long, alias = "ae")]
    pub vae: Option<PathBuf>,
    /// T5 encoder folder (`text_encoder_2/`) or GGUF file; its tokenizer is read from the folder
    /// or `../tokenizer_2/`.
    #[arg(long)]
    pub t5: Option<PathBuf>,
    /// CLIP text encoder folder (`text_encoder/`); its tokenizer from the folder or `../tokenizer/`.
    #[arg(long)]
    pub clip: Option<PathBuf>,
    /// Variant, where the weights' shapes cannot tell (dev, krea and kontext look alike).
    #[arg(long)]
    pub variant: Option<String>,
    /// A LoRA, optionally with its strength after a colon (`style.safetensors:0.7`);
    /// repeat to stack several. kohya/sd-scripts, diffusers/PEFT, ai-toolkit/ComfyUI, XLabs
    /// and BFL layouts are read; text-encoder layers (kohya `lora_te1_`) too. A BFL control
    /// LoRA (`flux1-canny-dev-lora.safetensors` on FLUX.1-dev) makes a Canny or Depth model;
    /// its file name tells which, else pass --variant.
    #[arg(long, value_name = "FILE[:SCALE]", value_parser = parse_lora)]
    pub lora: Vec<LoraArg>,
    /// Strength of every --lora given without its own: default 1, or 0.85 (the reference's)
    /// for a BFL control LoRA.
    #[arg(long, requires = "lora", value_parser = finite_scale)]
    pub lora_scale: Option<f64>,
}

/// One `--lora FILE[:SCALE]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraArg {
    pub path: PathBuf,
    pub scale: Option<f64>,
}

/// `FILE` or `FILE:SCALE`; a path that exists as given wins over a colon inside it.
fn parse_lora(s: &str) -> Result<LoraArg, String> {
    if let Some((path, scale)) = s.rsplit_once(':') {
        if !Path::new(s).exists() && !scale.contains(['/', '\\']) {
            let scale = finite_scale(scale).map_err(|e| format!("{s}: {e}"))?;
            return Ok(LoraArg {
                path: path.into(),
                scale: Some(scale),
            });
        }
    }
    Ok(LoraArg {
        path: s.into(),
        scale: None,
    })
}

/// The largest LoRA strength accepted: trained strengths are around 1, and past this the
/// update overflows bf16 (and f32 long before 1e39) into a black image.
const MAX_LORA_SCALE: f64 = 100.0;

/// A LoRA strength: a finite number (negative ones invert the update, as in ComfyUI) of at
/// most [`MAX_LORA_SCALE`] in size.
fn finite_scale(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v.abs() > MAX_LORA_SCALE => Err(format!(
            "the LoRA scale {v} is beyond ±{MAX_LORA_SCALE}; trained strengths are around 1"
        )),
        Ok(v) if v.is_finite() => Ok(v),
        Ok(v) => Err(format!(
            "the LoRA scale {v} is not a finite number; give one like 0.8"
        )),
        Err(_) => Err(format!(
            "`{s}` is not a LoRA scale; give a number like 0.8 after the colon"
        )),
    }
}

impl ModelArgs {
    /// The published variant `--model` names (a variant name or its official repo id), when no
    /// local folder or part overrides it: planned from built-in manifests, nothing downloaded.
    /// A LoRA's tensors are only known from its file, so `--lora` plans from headers.
    pub fn published_variant(&self) -> Option<Variant> {
        let parts = self.flow.is_some()
            || self.vae.is_some()
            || self.t5.is_some()
            || self.clip.is_some()
            || !self.lora.is_empty();
        if parts || self.model == "tiny" || Path::new(&self.model).exists() {
            return None;
        }
        Variant::from_name(&self.model).ok().or_else(|| {
            Variant::ALL
                .into_iter()
                .find(|v| v.repo_id().eq_ignore_ascii_case(&self.model))
        })
    }

    /// The --lora files with their scales (`--lora-scale` for those given without one).
    pub fn loras(&self) -> Vec<LoraSpec> {
        self.lora
            .iter()
            .map(|l| LoraSpec {
                path: l.path.clone(),
                scale: l.scale.or(self.lora_scale),
            })
            .collect()
    }

    fn overrides(&self) -> ModelPaths {
        ModelPaths {
            flow: self.flow.clone(),
            vae: self.vae.clone(),
            t5: self.t5.clone(),
            clip: self.clip.clone(),
            ..Default::default()
        }
    }

    pub fn variant(&self) -> Result<Option<Variant>> {
        self.variant
            .as_deref()
            .map(Variant::from_name)
            .transpose()
            .map_err(Into::into)
    }

    /// Opens the model (memory-mapped; weights are read when first used).
    pub fn load(&self, options: LoadOptions) -> Result<Model> {
        let options = LoadOptions {
            variant: self.variant()?,
            loras: self.loras(),
            ..options
        };
        for lora in &self.lora {
            fluxfit::Error::check_regular_file(&lora.path)
                .with_context(|| format!("--lora {}", lora.path.display()))?;
        }
        let has_parts = self.flow.is_some() || self.vae.is_some();
        let dir = match ModelRef::parse(&self.model, self.variant()?)? {
            ModelRef::Tiny if !has_parts => return Ok(tiny::load(options)?),
            ModelRef::Tiny => None,
            ModelRef::Folder(dir) => Some(dir),
            ModelRef::Hub { repo, flow_file } => Some(hub_snapshot(&repo, &flow_file)?),
        };
        let sources = ModelSources::resolve(dir.as_deref(), self.overrides())?;
        let name = dir
            .as_deref()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| sources.flow.display().to_string());
        Model::load(&sources, &name, options).with_context(|| format!("loading {name}"))
    }
}

/// FLUX.1-Redux-dev on the hub: the projector and SigLIP tower Redux reads.
const REDUX_REPO: &str = "black-forest-labs/FLUX.1-Redux-dev";

/// Where Redux's encoder is: `--redux` (and `--siglip`) when given; else, for a published
/// dev or schnell model, FLUX.1-Redux-dev from the hub (its gated licence applies).
pub fn redux_paths(
    model: &ModelArgs,
    redux: Option<&Path>,
    siglip: Option<&Path>,
) -> Result<ReduxPaths> {
    let dir = match redux {
        Some(p) => {
            if !p.exists() {
                bail!("--redux {}: no such file or folder", p.display());
            }
            p.to_path_buf()
        }
        None => match model.published_variant() {
            Some(Variant::Dev | Variant::Schnell | Variant::DevKrea) => redux_snapshot()?,
            _ => bail!(
                "Redux needs its encoder: --redux DIR (FLUX.1-Redux-dev's folder) or --redux \
                 FILE (flux1-redux-dev.safetensors with image_encoder/ beside it, or --siglip)"
            ),
        },
    };
    if let Some(s) = siglip.filter(|s| !s.exists()) {
        bail!("--siglip {}: no such file or folder", s.display());
    }
    ReduxPaths::resolve(&dir, siglip).with_context(|| format!("--redux {}", dir.display()))
}

#[cfg(feature = "hub")]
fn redux_snapshot() -> Result<PathBuf> {
    fluxfit_hub::snapshot(REDUX_REPO, None, &fluxfit_hub::Wanted::redux())
}

#[cfg(not(feature = "hub"))]
fn redux_snapshot() -> Result<PathBuf> {
    bail!("Redux: this fluxfit was built without the `hub` feature; download {REDUX_REPO} yourself and pass its folder with --redux")
}

#[cfg(feature = "hub")]
fn hub_snapshot(repo: &str, flow_file: &str) -> Result<PathBuf> {
    fluxfit_hub::snapshot(repo, None, &fluxfit_hub::Wanted::flux(flow_file))
}

#[cfg(not(feature = "hub"))]
fn hub_snapshot(repo: &str, _flow_file: &str) -> Result<PathBuf> {
    bail!("--model {repo}: this fluxfit was built without the `hub` feature; download the repository yourself and pass its folder")
}
