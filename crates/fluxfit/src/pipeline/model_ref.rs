//! What a model argument names: the built-in tiny model, a local folder, or a Hugging Face
//! repository (a variant name stands for its official repository). Front ends parse it here so
//! that they all mean the same thing by it; fetching a repository is the hub client's business.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::variant::Variant;

/// A model reference (`--model`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// The built-in tiny model: weights generated in process.
    Tiny,
    /// A local folder in either layout (BFL files, a diffusers snapshot).
    Folder(PathBuf),
    /// A Hugging Face repository and the BFL flow file to fetch from it.
    Hub { repo: String, flow_file: String },
}

impl ModelRef {
    /// Reads `m`: `tiny`, a folder, a variant name (`flux-dev`, ...) or a repo id (`org/name`;
    /// `variant` names its flow file where the repo is not an official one).
    pub fn parse(m: &str, variant: Option<Variant>) -> Result<Self> {
        if m == "tiny" {
            return Ok(Self::Tiny);
        }
        let path = Path::new(m);
        if path.is_dir() {
            return Ok(Self::Folder(path.to_path_buf()));
        }
        if path.is_file() {
            return Err(Error::InvalidRequest(format!(
                "--model {m} is a file; pass a flow checkpoint with --flow FILE (and --vae, --t5, --clip)"
            )));
        }
        match Variant::from_name(m) {
            Ok(v) => Ok(Self::Hub {
                repo: v.repo_id().to_string(),
                flow_file: v.flow_file().to_string(),
            }),
            Err(_) if m.contains('/') && !m.starts_with('.') && !path.is_absolute() => {
                Ok(Self::Hub {
                    repo: m.to_string(),
                    flow_file: guess_flow_file(m, variant.unwrap_or(Variant::Dev)),
                })
            }
            Err(_) => Err(Error::InvalidRequest(format!(
                "--model {m}: no such folder, and not a variant name ({}) or a Hugging Face repo id (org/name)",
                Variant::ALL.map(|v| v.name()).join(", ")
            ))),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_tiny_variants_repos_and_refuses_the_rest() {
        assert_eq!(ModelRef::parse("tiny", None).unwrap(), ModelRef::Tiny);
        let dev = ModelRef::parse("flux-dev", None).unwrap();
        assert!(matches!(dev, ModelRef::Hub { ref repo, .. } if repo == Variant::Dev.repo_id()));
        let other = ModelRef::parse("someone/my-flux", Some(Variant::Schnell)).unwrap();
        assert_eq!(
            other,
            ModelRef::Hub {
                repo: "someone/my-flux".into(),
                flow_file: Variant::Schnell.flow_file().into()
            }
        );
        assert!(ModelRef::parse("no-such-thing", None).is_err());
        let dir = std::env::temp_dir();
        assert_eq!(
            ModelRef::parse(dir.to_str().unwrap(), None).unwrap(),
            ModelRef::Folder(dir)
        );
    }
}
