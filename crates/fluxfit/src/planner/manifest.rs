//! Manifests: every tensor of a checkpoint with its shape and storage dtype, without the weights.
//!
//! The planner needs sizes, not values. For the published FLUX.1 checkpoints the manifests are
//! built from the networks' own `expected_shapes()` and the storage dtypes of the official files
//! (flow models bf16, `ae.safetensors` f32, the T5-XXL encoder of the FLUX repos'
//! `text_encoder_2/` bf16, CLIP-L bf16), so planning works with no file present. For a local
//! checkpoint they come from its headers ([`Manifest::from_store`]).

use candle_core::DType;

use candle_core::quantized::GgmlDType;

use crate::checkpoint::gguf;
use crate::checkpoint::quantize::{self, QuantSpec};
use crate::checkpoint::store::TensorStore;
use crate::memory::plan::Component;
use crate::model::autoencoder::AutoEncoderConfig;
use crate::model::clip::ClipConfig;
use crate::model::t5::T5Config;
use crate::model::weights::StageSpec;
use crate::variant::Variant;

/// One tensor: canonical name, shape, storage dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    /// What it is read as (F32 for GGUF block types).
    pub dtype: DType,
    /// The GGUF storage type, for a tensor of a GGUF file.
    pub ggml: Option<GgmlDType>,
}

impl Entry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes in storage.
    pub fn nbytes(&self) -> usize {
        match self.ggml {
            Some(t) => gguf::type_bytes(t, self.numel()),
            None => self.numel() * self.dtype.size_in_bytes(),
        }
    }

    /// Whether a `+packed` plan keeps it packed on the device (a GGUF block type).
    pub fn packable(&self) -> bool {
        self.ggml.is_some_and(|t| gguf::dense_dtype(t).is_none())
    }
}

/// The tensors of one component's checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub component: Component,
    /// What it describes: a file, or `flux1-dev.safetensors (built in)`.
    pub origin: String,
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Every shape of `shapes` stored as `dtype`.
    pub fn from_shapes(
        component: Component,
        origin: impl Into<String>,
        shapes: Vec<(String, Vec<usize>)>,
        dtype: DType,
    ) -> Self {
        Self {
            component,
            origin: origin.into(),
            entries: shapes
                .into_iter()
                .map(|(name, shape)| Entry {
                    name,
                    shape,
                    dtype,
                    ggml: None,
                })
                .collect(),
        }
    }

    /// The flow transformer of a published variant (`flux1-*.safetensors`, bf16).
    pub fn flow(variant: Variant) -> Self {
        Self::from_shapes(
            Component::Flow,
            format!("{} (built in)", variant.flow_file()),
            variant.flow_config().expected_shapes(),
            DType::BF16,
        )
    }

    /// `ae.safetensors`, the autoencoder of every variant, stored in f32.
    pub fn vae() -> Self {
        Self::from_shapes(
            Component::Vae,
            "ae.safetensors (built in)",
            AutoEncoderConfig::flux().expected_shapes(),
            DType::F32,
        )
    }

    /// The T5-v1.1-XXL encoder as the FLUX repos ship it (`text_encoder_2/`, bf16).
    pub fn t5_xxl() -> Self {
        Self::from_shapes(
            Component::T5,
            "text_encoder_2 (T5-v1.1-XXL encoder, built in)",
            T5Config::xxl().expected_shapes(),
            DType::BF16,
        )
    }

    /// FLUX.1-Redux-dev's encoder: the SigLIP so400m vision tower (`image_encoder/`) and the
    /// projector (`flux1-redux-dev.safetensors`), both bf16.
    pub fn redux() -> Self {
        Self::from_shapes(
            Component::Clip,
            "FLUX.1-Redux-dev image_encoder + flux1-redux-dev.safetensors (built in)",
            crate::model::redux::ReduxConfig::flux().expected_shapes(),
            DType::BF16,
        )
    }

    /// The CLIP-L text tower (`text_encoder/`, bf16).
    pub fn clip_l() -> Self {
        Self::from_shapes(
            Component::Clip,
            "text_encoder (CLIP ViT-L/14 text, built in)",
            ClipConfig::vit_l_14().expected_shapes(),
            DType::BF16,
        )
    }

    /// The canonical tensors of a checkpoint as its headers describe them.
    pub fn from_store(component: Component, store: &TensorStore) -> Self {
        let entries = store
            .keys()
            .filter_map(|k| {
                let info = store.info(k).ok()?;
                Some(Entry {
                    name: k.clone(),
                    shape: info.shape.clone(),
                    dtype: info.dtype,
                    ggml: info.ggml,
                })
            })
            .collect();
        Self {
            component,
            origin: store.origin().display().to_string(),
            entries,
        }
    }

    /// This manifest as `fluxfit quantize --type` would store it (`component` flow or T5, the
    /// published-style defaults of [`quantize::plan_shapes`]): what a quantized file of a
    /// published model holds, without the file.
    pub fn quantized(&self, component: quantize::Component, spec: &QuantSpec) -> Self {
        let shapes = self
            .entries
            .iter()
            .map(|e| (e.name.clone(), e.shape.clone()));
        let types: std::collections::HashMap<String, GgmlDType> =
            match quantize::plan_shapes(shapes, component, spec) {
                Ok(choices) => choices.into_iter().map(|c| (c.key, c.ggml)).collect(),
                Err(_) => Default::default(),
            };
        Self {
            component: self.component,
            origin: format!("{} as {}", self.origin, gguf::type_name(spec.target)),
            entries: self
                .entries
                .iter()
                .map(|e| match types.get(&e.name) {
                    Some(&t) => Entry {
                        dtype: gguf::dense_dtype(t).unwrap_or(DType::F32),
                        ggml: Some(t),
                        ..e.clone()
                    },
                    None => e.clone(),
                })
                .collect(),
        }
    }

    pub fn params(&self) -> usize {
        self.entries.iter().map(Entry::numel).sum()
    }

    /// Bytes in storage.
    pub fn storage_bytes(&self) -> usize {
        self.entries.iter().map(Entry::nbytes).sum()
    }

    /// The storage dtype most of the bytes are in.
    pub fn storage_dtype(&self) -> DType {
        let mut by: Vec<(DType, usize)> = Vec::new();
        for e in &self.entries {
            match by.iter_mut().find(|(d, _)| *d == e.dtype) {
                Some((_, n)) => *n += e.nbytes(),
                None => by.push((e.dtype, e.nbytes())),
            }
        }
        by.into_iter()
            .max_by_key(|(_, n)| *n)
            .map_or(DType::F32, |(d, _)| d)
    }

    /// The entries a stage owns (the same rule as [`StageSpec::keys`]).
    pub fn stage_entries<'a>(&'a self, spec: &'a StageSpec) -> impl Iterator<Item = &'a Entry> {
        self.entries.iter().filter(move |e| {
            if spec.members.is_empty() {
                e.name.starts_with(&spec.root)
            } else {
                spec.members.iter().any(|m| e.name.starts_with(m.as_str()))
            }
        })
    }

    /// Elements of a stage.
    pub fn stage_numel(&self, spec: &StageSpec) -> usize {
        self.stage_entries(spec).map(Entry::numel).sum()
    }

    /// Elements of the largest tensor of a stage.
    pub fn stage_largest(&self, spec: &StageSpec) -> usize {
        self.stage_entries(spec)
            .map(Entry::numel)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::flow::{FlowConfig, Flux};

    /// The totals of docs/flux.md §1.6, computed there from the module formulas.
    #[test]
    fn published_checkpoints_match_the_spec_totals() {
        let flow = |v| Manifest::flow(v).params();
        assert_eq!(flow(Variant::Dev), 11_901_408_320);
        assert_eq!(flow(Variant::DevKrea), 11_901_408_320);
        assert_eq!(flow(Variant::DevKontext), 11_901_408_320);
        assert_eq!(flow(Variant::Schnell), 11_891_178_560);
        assert_eq!(flow(Variant::DevCanny), 11_901_604_928);
        assert_eq!(flow(Variant::DevDepth), 11_901_604_928);
        assert_eq!(flow(Variant::DevFill), 11_902_391_360);
        // 23.80 GB in bf16.
        assert_eq!(Manifest::flow(Variant::Dev).storage_bytes(), 23_802_816_640);
        assert_eq!(Manifest::vae().params(), 83_819_683);
        assert_eq!(Manifest::vae().storage_bytes(), 335_278_732);
        assert_eq!(Manifest::t5_xxl().params(), 4_762_310_656);
        assert_eq!(Manifest::clip_l().params(), 123_060_480);
        // Key counts: dev 780 tensors, schnell 776.
        assert_eq!(Manifest::flow(Variant::Dev).entries.len(), 780);
        assert_eq!(Manifest::flow(Variant::Schnell).entries.len(), 776);
    }

    #[test]
    fn stages_partition_the_flow_model() {
        let m = Manifest::flow(Variant::Dev);
        let net = Flux::new(FlowConfig::dev(), None);
        let stages = net.stages();
        let total: usize = stages.iter().map(|s| m.stage_numel(s)).sum();
        assert_eq!(total, m.params());
        assert_eq!(m.stage_numel(&stages[1]), 339_831_296);
        assert_eq!(m.stage_numel(&stages[20]), 141_591_808);
        // AE decoder: 49,545,475 parameters over its stages.
        let ae = Manifest::vae();
        let vae = crate::model::autoencoder::AutoEncoder::new(AutoEncoderConfig::flux(), None);
        let dec: usize = vae.decoder_stages().iter().map(|s| ae.stage_numel(s)).sum();
        assert_eq!(dec, 49_545_475);
        let enc: usize = vae.encoder_stages().iter().map(|s| ae.stage_numel(s)).sum();
        assert_eq!(enc, 34_274_208);
    }
}
