//! The FLUX.1 model family (docs/flux.md §1.2): what differs between variants, and their defaults.

use crate::error::{Error, Result};
use crate::model::flow::FlowConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Variant {
    Schnell,
    Dev,
    DevKrea,
    DevFill,
    DevCanny,
    DevDepth,
    DevKontext,
}

impl Variant {
    pub const ALL: [Variant; 7] = [
        Variant::Schnell,
        Variant::Dev,
        Variant::DevKrea,
        Variant::DevFill,
        Variant::DevCanny,
        Variant::DevDepth,
        Variant::DevKontext,
    ];

    /// The reference's config name.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Schnell => "flux-schnell",
            Variant::Dev => "flux-dev",
            Variant::DevKrea => "flux-dev-krea",
            Variant::DevFill => "flux-dev-fill",
            Variant::DevCanny => "flux-dev-canny",
            Variant::DevDepth => "flux-dev-depth",
            Variant::DevKontext => "flux-dev-kontext",
        }
    }

    pub fn from_name(name: &str) -> Result<Self> {
        let n = name.trim().to_ascii_lowercase();
        let n = n.strip_prefix("flux-").unwrap_or(&n).to_string();
        // `flux-dev-fill`, `dev-fill` or just `fill`.
        Self::ALL
            .into_iter()
            .find(|v| {
                let short = v.name().strip_prefix("flux-").unwrap_or(v.name());
                short == n || short.strip_prefix("dev-") == Some(n.as_str())
            })
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown variant `{name}`; known: {}",
                    Self::ALL.map(|v| v.name()).join(", ")
                ))
            })
    }

    /// The Hugging Face repository holding the official weights.
    pub fn repo_id(self) -> &'static str {
        match self {
            Variant::Schnell => "black-forest-labs/FLUX.1-schnell",
            Variant::Dev => "black-forest-labs/FLUX.1-dev",
            Variant::DevKrea => "black-forest-labs/FLUX.1-Krea-dev",
            Variant::DevFill => "black-forest-labs/FLUX.1-Fill-dev",
            Variant::DevCanny => "black-forest-labs/FLUX.1-Canny-dev",
            Variant::DevDepth => "black-forest-labs/FLUX.1-Depth-dev",
            Variant::DevKontext => "black-forest-labs/FLUX.1-Kontext-dev",
        }
    }

    /// The BFL single-file flow checkpoint in that repository.
    pub fn flow_file(self) -> &'static str {
        match self {
            Variant::Schnell => "flux1-schnell.safetensors",
            Variant::Dev => "flux1-dev.safetensors",
            Variant::DevKrea => "flux1-krea-dev.safetensors",
            Variant::DevFill => "flux1-fill-dev.safetensors",
            Variant::DevCanny => "flux1-canny-dev.safetensors",
            Variant::DevDepth => "flux1-depth-dev.safetensors",
            Variant::DevKontext => "flux1-kontext-dev.safetensors",
        }
    }

    /// Width of `img_in`: 64 noisy-latent features plus the conditioning ones.
    pub fn in_channels(self) -> usize {
        match self {
            Variant::DevFill => 384,
            Variant::DevCanny | Variant::DevDepth => 128,
            _ => 64,
        }
    }

    pub fn guidance_embed(self) -> bool {
        self != Variant::Schnell
    }

    /// T5 tokens the reference feeds this variant.
    pub fn t5_tokens(self) -> usize {
        match self {
            Variant::Schnell => 256,
            Variant::DevFill => 128,
            _ => 512,
        }
    }

    pub fn default_steps(self) -> usize {
        match self {
            Variant::Schnell => 4,
            Variant::DevKontext => 30,
            _ => 50,
        }
    }

    pub fn default_guidance(self) -> f32 {
        match self {
            Variant::DevFill | Variant::DevCanny => 30.0,
            Variant::DevDepth => 10.0,
            _ => 2.5,
        }
    }

    /// Whether the schedule is shifted towards high noise for larger images (all but schnell).
    pub fn shift_schedule(self) -> bool {
        self != Variant::Schnell
    }

    /// The full-size flow configuration of this variant.
    pub fn flow_config(self) -> FlowConfig {
        FlowConfig {
            in_channels: self.in_channels(),
            guidance_embed: self.guidance_embed(),
            ..FlowConfig::dev()
        }
    }

    /// Variants whose flow model has these input width and guidance embedder.
    pub fn candidates(in_channels: usize, guidance_embed: bool) -> Vec<Variant> {
        Self::ALL
            .into_iter()
            .filter(|v| v.in_channels() == in_channels && v.guidance_embed() == guidance_embed)
            .collect()
    }

    /// Tells the variant from a checkpoint's shapes, with its file name to separate variants of
    /// equal shapes (dev, krea and kontext; canny and depth). An explicit choice wins when it fits.
    pub fn infer(cfg: &FlowConfig, file_hint: &str, explicit: Option<Variant>) -> Result<Variant> {
        let fits = Self::candidates(cfg.in_channels, cfg.guidance_embed);
        if let Some(v) = explicit {
            if fits.contains(&v) {
                return Ok(v);
            }
            return Err(Error::Config(format!(
                "--variant {} needs a flow model with in_channels {} and {} guidance embedder; this one has in_channels {} and {} ({})",
                v.name(),
                v.in_channels(),
                if v.guidance_embed() { "a" } else { "no" },
                cfg.in_channels,
                if cfg.guidance_embed { "a guidance embedder" } else { "no guidance embedder" },
                if fits.is_empty() {
                    "no known variant".to_string()
                } else {
                    format!("fits {}", fits.iter().map(|v| v.name()).collect::<Vec<_>>().join(", "))
                }
            )));
        }
        let hint = file_hint.to_ascii_lowercase();
        let by_name = |needle: &str, v: Variant| hint.contains(needle) && fits.contains(&v);
        for (needle, v) in [
            ("krea", Variant::DevKrea),
            ("kontext", Variant::DevKontext),
            ("depth", Variant::DevDepth),
            ("canny", Variant::DevCanny),
        ] {
            if by_name(needle, v) {
                return Ok(v);
            }
        }
        match fits.as_slice() {
            [] => Err(Error::Config(format!(
                "no FLUX.1 variant has a flow model with in_channels {} {} a guidance embedder",
                cfg.in_channels,
                if cfg.guidance_embed { "and" } else { "without" }
            ))),
            [v, ..] => Ok(*v),
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_reference_table() {
        assert_eq!(Variant::Schnell.t5_tokens(), 256);
        assert_eq!(Variant::DevFill.t5_tokens(), 128);
        assert_eq!(Variant::DevKontext.default_steps(), 30);
        assert_eq!(Variant::DevDepth.default_guidance(), 10.0);
        assert!(!Variant::Schnell.shift_schedule());
        assert_eq!(Variant::from_name("dev-fill").unwrap(), Variant::DevFill);
        assert_eq!(Variant::from_name("kontext").unwrap(), Variant::DevKontext);
        assert_eq!(Variant::from_name("FLUX-DEV").unwrap(), Variant::Dev);
        assert!(Variant::from_name("flux-pro").is_err());
    }

    #[test]
    fn inference_from_shapes_and_names() {
        let dev = FlowConfig::dev();
        assert_eq!(
            Variant::infer(&dev, "flux1-dev.safetensors", None).unwrap(),
            Variant::Dev
        );
        assert_eq!(
            Variant::infer(&dev, "flux1-krea-dev.safetensors", None).unwrap(),
            Variant::DevKrea
        );
        assert_eq!(
            Variant::infer(&FlowConfig::schnell(), "x", None).unwrap(),
            Variant::Schnell
        );
        let fill = Variant::DevFill.flow_config();
        assert_eq!(
            Variant::infer(&fill, "model", None).unwrap(),
            Variant::DevFill
        );
        let err = Variant::infer(&fill, "model", Some(Variant::Dev))
            .unwrap_err()
            .to_string();
        assert!(err.contains("flux-dev-fill"), "{err}");
    }
}
