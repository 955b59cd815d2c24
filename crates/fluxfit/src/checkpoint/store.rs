//! A component's weights under their canonical (BFL / HF-transformers) names, wherever they live.
//!
//! Checkpoints come in several layouts (BFL single files, diffusers folders, shards). Rather than
//! rewriting files, a store maps each canonical key to a recipe over memory-mapped tensors; the
//! recipe runs when a stage is materialised, so the host never holds a converted second copy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::safetensors::SafetensorsFile;
use crate::error::{Error, Result};

/// How to build one canonical tensor.
#[derive(Debug, Clone)]
pub enum Source {
    /// A tensor stored as is.
    File { file: usize, name: String },
    /// Several stored tensors concatenated (diffusers keeps q, k, v apart; BFL fuses them).
    Concat { parts: Vec<Source>, dim: usize },
    /// The two halves of a tensor exchanged (diffusers orders the final modulation scale, shift).
    SwapHalves { inner: Box<Source>, dim: usize },
    /// The same elements viewed in another shape (diffusers' VAE attention is Linear, LDM's is 1×1 conv).
    Reshape {
        inner: Box<Source>,
        shape: Vec<usize>,
    },
}

#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub shape: Vec<usize>,
    /// Storage dtype: what the bytes in the file are.
    pub dtype: DType,
}

impl KeyInfo {
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

#[derive(Debug, Clone)]
pub struct TensorStore {
    /// What the user pointed at (file or folder): named in every error.
    origin: PathBuf,
    files: Vec<Arc<SafetensorsFile>>,
    keys: BTreeMap<String, (Source, KeyInfo)>,
}

impl TensorStore {
    pub fn new(origin: impl Into<PathBuf>) -> Self {
        Self {
            origin: origin.into(),
            files: Vec::new(),
            keys: BTreeMap::new(),
        }
    }

    /// Every tensor of `files` under its stored name, minus the first of `strip` that prefixes it.
    pub fn from_files(
        origin: impl Into<PathBuf>,
        files: Vec<Arc<SafetensorsFile>>,
        strip: &[&str],
    ) -> Self {
        let mut store = Self::new(origin);
        for file in files {
            let idx = store.add_file(file.clone());
            for name in file.tensors().keys() {
                let key = strip
                    .iter()
                    .find_map(|p| name.strip_prefix(p))
                    .unwrap_or(name);
                store
                    .insert(
                        key.to_string(),
                        Source::File {
                            file: idx,
                            name: name.clone(),
                        },
                    )
                    .expect("a stored tensor always resolves");
            }
        }
        store
    }

    pub fn origin(&self) -> &Path {
        &self.origin
    }

    pub fn files(&self) -> &[Arc<SafetensorsFile>] {
        &self.files
    }

    pub fn add_file(&mut self, file: Arc<SafetensorsFile>) -> usize {
        self.files.push(file);
        self.files.len() - 1
    }

    /// Registers a canonical key; its shape and dtype are derived from the recipe now, so that
    /// shape errors surface at load time, not mid-run.
    pub fn insert(&mut self, key: String, source: Source) -> Result<()> {
        let info = self.info_of(&source)?;
        self.keys.insert(key, (source, info));
        Ok(())
    }

    /// The source of a tensor stored under `name` in any of this store's files.
    pub fn stored(&self, name: &str) -> Option<Source> {
        self.files.iter().enumerate().find_map(|(i, f)| {
            f.tensors().contains_key(name).then(|| Source::File {
                file: i,
                name: name.to_string(),
            })
        })
    }

    pub fn remove(&mut self, key: &str) -> Option<Source> {
        self.keys.remove(key).map(|(s, _)| s)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.keys.keys()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys_with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a String> {
        self.keys
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k)
    }

    pub fn info(&self, key: &str) -> Result<&KeyInfo> {
        self.keys
            .get(key)
            .map(|(_, i)| i)
            .ok_or_else(|| self.missing(key))
    }

    pub fn shape(&self, key: &str) -> Result<&[usize]> {
        Ok(&self.info(key)?.shape)
    }

    /// The error for a key the network needs and the checkpoint lacks.
    pub fn missing(&self, key: &str) -> Error {
        Error::MissingKey {
            path: self.origin.clone(),
            key: key.to_string(),
            hint: String::new(),
        }
    }

    /// Checks a key's shape, naming the key and both shapes when they differ.
    pub fn expect_shape(&self, key: &str, expected: &[usize], hint: &str) -> Result<()> {
        let found = self.shape(key)?;
        if found != expected {
            return Err(Error::WrongShape {
                path: self.origin.clone(),
                key: key.to_string(),
                expected: expected.into(),
                found: found.into(),
                hint: hint.to_string(),
            });
        }
        Ok(())
    }

    /// Materialises one canonical tensor on `device` in `dtype`.
    pub fn load(&self, key: &str, device: &Device, dtype: DType) -> Result<Tensor> {
        let (source, _) = self.keys.get(key).ok_or_else(|| self.missing(key))?;
        let t = self.build(source)?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    /// Whether `key` is a stored tensor read as is (no recipe): loading it in its storage dtype
    /// on the CPU makes exactly one buffer.
    pub fn is_direct(&self, key: &str) -> bool {
        matches!(self.keys.get(key), Some((Source::File { .. }, _)))
    }

    fn build(&self, source: &Source) -> Result<Tensor> {
        Ok(match source {
            Source::File { file, name } => self.files[*file].load(name, &Device::Cpu)?,
            Source::Concat { parts, dim } => {
                let parts = parts
                    .iter()
                    .map(|p| self.build(p))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, *dim)?
            }
            Source::SwapHalves { inner, dim } => {
                let t = self.build(inner)?;
                let half = t.dim(*dim)? / 2;
                Tensor::cat(
                    &[t.narrow(*dim, half, half)?, t.narrow(*dim, 0, half)?],
                    *dim,
                )?
            }
            Source::Reshape { inner, shape } => self.build(inner)?.reshape(shape.as_slice())?,
        })
    }

    /// The stored name a recipe reads (its first file tensor), for messages.
    fn source_name(source: &Source) -> String {
        match source {
            Source::File { name, .. } => format!("`{name}`"),
            Source::Concat { parts, .. } => parts
                .first()
                .map_or_else(|| "(nothing)".into(), Self::source_name),
            Source::SwapHalves { inner, .. } | Source::Reshape { inner, .. } => {
                Self::source_name(inner)
            }
        }
    }

    fn info_of(&self, source: &Source) -> Result<KeyInfo> {
        match source {
            Source::File { file, name } => {
                let f = &self.files[*file];
                let t = f.tensors().get(name).ok_or_else(|| Error::MissingKey {
                    path: f.path().to_path_buf(),
                    key: name.clone(),
                    hint: String::new(),
                })?;
                Ok(KeyInfo {
                    shape: t.shape.clone(),
                    dtype: t.dtype,
                })
            }
            Source::Concat { parts, dim } => {
                let infos = parts
                    .iter()
                    .map(|p| self.info_of(p))
                    .collect::<Result<Vec<_>>>()?;
                // Parts must agree in every dimension but `dim`, or the concatenation fails
                // mid-run (or indexes out of bounds here).
                let fits = |i: &KeyInfo| {
                    i.shape.len() == infos[0].shape.len()
                        && *dim < i.shape.len()
                        && (0..i.shape.len()).all(|d| d == *dim || i.shape[d] == infos[0].shape[d])
                };
                if infos.is_empty() || !infos.iter().all(fits) {
                    let parts: Vec<String> = parts
                        .iter()
                        .zip(&infos)
                        .map(|(p, i)| format!("{} {:?}", Self::source_name(p), i.shape))
                        .collect();
                    return Err(Error::Config(format!(
                        "{}: cannot join tensors of these shapes along dimension {dim}: {}",
                        self.origin.display(),
                        parts.join(", ")
                    )));
                }
                let mut shape = infos[0].shape.clone();
                shape[*dim] = infos.iter().map(|i| i.shape[*dim]).sum();
                Ok(KeyInfo {
                    shape,
                    dtype: infos[0].dtype,
                })
            }
            Source::SwapHalves { inner, .. } => self.info_of(inner),
            Source::Reshape { inner, shape } => {
                let info = self.info_of(inner)?;
                if info.shape.iter().product::<usize>() != shape.iter().product::<usize>() {
                    return Err(Error::Config(format!(
                        "{}: cannot view a {:?} tensor as {shape:?}",
                        self.origin.display(),
                        info.shape
                    )));
                }
                Ok(KeyInfo {
                    shape: shape.clone(),
                    dtype: info.dtype,
                })
            }
        }
    }
}
