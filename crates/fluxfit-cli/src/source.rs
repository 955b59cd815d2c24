//! `--model` and the part overrides → a loaded model.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use fluxfit::checkpoint::layout::ModelPaths;
use fluxfit::pipeline::{tiny, LoadOptions, LoraSpec, Model, ModelSources};
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
    /// Autoencoder: `ae.safetensors` or a diffusers `vae/` folder.
    #[arg(long)]
    pub ae: Option<PathBuf>,
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
    fn overrides(&self) -> ModelPaths {
        ModelPaths {
            flow: self.flow.clone(),
            ae: self.ae.clone(),
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
        let has_parts = self.flow.is_some() || self.ae.is_some();
        if self.model == "tiny" && !has_parts {
            return Ok(tiny::load(options)?);
        }
        let dir = self.model_dir()?;
        let sources = ModelSources::resolve(dir.as_deref(), self.overrides())?;
        let name = dir
            .as_deref()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| sources.flow.display().to_string());
        Model::load(&sources, &name, options).with_context(|| format!("loading {name}"))
    }

    /// The local folder `--model` stands for, downloading a hub snapshot when needed.
    fn model_dir(&self) -> Result<Option<PathBuf>> {
        let m = self.model.as_str();
        if m == "tiny" {
            return Ok(None);
        }
        let path = Path::new(m);
        if path.is_dir() {
            return Ok(Some(path.to_path_buf()));
        }
        if path.is_file() {
            bail!("--model {m} is a file; pass a flow checkpoint with --flow FILE (and --ae, --t5, --clip)");
        }
        let (repo, flow_file) = match Variant::from_name(m) {
            Ok(v) => (v.repo_id().to_string(), v.flow_file().to_string()),
            Err(_) if m.contains('/') && !m.starts_with('.') && !path.is_absolute() => {
                let v = self.variant()?.unwrap_or(Variant::Dev);
                (m.to_string(), guess_flow_file(m, v))
            }
            Err(_) => bail!(
                "--model {m}: no such folder, and not a variant name ({}) or a Hugging Face repo id (org/name)",
                Variant::ALL.map(|v| v.name()).join(", ")
            ),
        };
        hub_snapshot(&repo, &flow_file).map(Some)
    }
}

/// The BFL file name in a repo: the official repos name it after the variant.
fn guess_flow_file(repo: &str, fallback: Variant) -> String {
    Variant::ALL
        .into_iter()
        .find(|v| v.repo_id().eq_ignore_ascii_case(repo))
        .unwrap_or(fallback)
        .flow_file()
        .to_string()
}

#[cfg(feature = "hub")]
fn hub_snapshot(repo: &str, flow_file: &str) -> Result<PathBuf> {
    crate::hub::snapshot(repo, None, &crate::hub::Wanted::flux(flow_file))
}

#[cfg(not(feature = "hub"))]
fn hub_snapshot(repo: &str, _flow_file: &str) -> Result<PathBuf> {
    bail!("--model {repo}: this fluxfit was built without the `hub` feature; download the repository yourself and pass its folder")
}
