//! `--model` and the part overrides → a loaded model.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use fluxfit::checkpoint::layout::ModelPaths;
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
    /// A LoRA in BFL's layout attached to the flow model, e.g. FLUX.1-Canny-dev-lora's
    /// `flux1-canny-dev-lora.safetensors` on FLUX.1-dev (which makes it a Canny model; the
    /// file name tells canny from depth, else pass --variant).
    #[arg(long, value_name = "FILE")]
    pub lora: Option<PathBuf>,
    /// Strength of the --lora update.
    #[arg(long, default_value_t = LoraSpec::DEFAULT_SCALE, requires = "lora")]
    pub lora_scale: f64,
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
            || self.lora.is_some();
        if parts || self.model == "tiny" || Path::new(&self.model).exists() {
            return None;
        }
        Variant::from_name(&self.model).ok().or_else(|| {
            Variant::ALL
                .into_iter()
                .find(|v| v.repo_id().eq_ignore_ascii_case(&self.model))
        })
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
            lora: self.lora.as_ref().map(|path| LoraSpec {
                path: path.clone(),
                scale: self.lora_scale,
            }),
            ..options
        };
        if let Some(lora) = &self.lora {
            if !lora.is_file() {
                bail!("--lora {}: no such file", lora.display());
            }
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

#[cfg(feature = "hub")]
fn hub_snapshot(repo: &str, flow_file: &str) -> Result<PathBuf> {
    fluxfit_hub::snapshot(repo, None, &fluxfit_hub::Wanted::flux(flow_file))
}

#[cfg(not(feature = "hub"))]
fn hub_snapshot(repo: &str, _flow_file: &str) -> Result<PathBuf> {
    bail!("--model {repo}: this fluxfit was built without the `hub` feature; download the repository yourself and pass its folder")
}
