//! A component's weights under their canonical (BFL / HF-transformers) names, wherever they live.
//!
//! Checkpoints come in several layouts (BFL single files, diffusers folders, shards). Rather than
//! rewriting files, a store maps each canonical key to a recipe over memory-mapped tensors; the
//! recipe runs when a stage is materialised, so the host never holds a converted second copy.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::gguf::{self, GgufFile};
use super::safetensors::SafetensorsFile;
use crate::error::{Error, Result};

/// A stored tensor's bytes in the memory map ([`TensorStore::direct_bytes`]).
#[derive(Debug)]
pub struct DirectBytes<'a> {
    pub bytes: &'a [u8],
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// How to build one canonical tensor.
#[derive(Debug, Clone)]
pub enum Source {
    /// A tensor stored as is.
    File { file: usize, name: String },
    /// A tensor of a GGUF file (index into [`TensorStore::gguf_files`]), dequantized to F32
    /// unless stored as F32/F16/BF16.
    Gguf { file: usize, name: String },
    /// A low-precision tensor times its scale (fp8 checkpoints with per-tensor or per-channel
    /// scales: `weight.float() * scale`, broadcast), computed in F32.
    Scaled {
        inner: Box<Source>,
        scale: Box<Source>,
    },
    /// Several stored tensors concatenated (diffusers keeps q, k, v apart; BFL fuses them).
    Concat { parts: Vec<Source>, dim: usize },
    /// The two halves of a tensor exchanged (diffusers orders the final modulation scale, shift).
    SwapHalves { inner: Box<Source>, dim: usize },
    /// The same elements viewed in another shape (diffusers' VAE attention is Linear, LDM's is 1×1 conv).
    Reshape {
        inner: Box<Source>,
        shape: Vec<usize>,
    },
    /// A tensor grown to `shape` with zeros after its elements (a control LoRA widens the
    /// dev base's `img_in` from 64 to 128 input features).
    ZeroPad {
        inner: Box<Source>,
        shape: Vec<usize>,
    },
    /// A tensor times a constant, in F32 (a LoRA's up-projection carries its scale).
    Times { inner: Box<Source>, factor: f64 },
    /// Zeros of `shape`, in F32 (the rows a LoRA of one slice of a fused weight leaves alone).
    Zeros { shape: Vec<usize> },
    /// The element-wise sum of tensors of one shape, in F32 (the biases of stacked LoRAs).
    Sum { parts: Vec<Source> },
}

#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub shape: Vec<usize>,
    /// Storage dtype: what the bytes in the file are (`U8` for fp8 e5m2, which candle has no
    /// type for); for GGUF block types (see `ggml`), F32, what they are read as.
    pub dtype: DType,
    /// The GGUF storage type of a tensor from a GGUF file, or the type a dense tensor is
    /// quantized to when a `+packed` plan stages it ([`TensorStore::quantize_on_load`]).
    pub ggml: Option<GgmlDType>,
    /// The dtype the tensor is in when read, before conversion to the compute dtype: `dtype`,
    /// but F32 for fp8 e4m3, scaled fp8 and GGUF block types, F16 for fp8 e5m2.
    pub read: DType,
}

impl KeyInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the tensor as read (in `read`), before conversion to the compute dtype: the
    /// host buffer a stage's conversion goes through.
    pub fn nbytes(&self) -> usize {
        self.numel() * self.read.size_in_bytes()
    }

    /// Bytes the tensor takes in its file, or packed after quantizing on load.
    pub fn stored_bytes(&self) -> usize {
        match self.ggml {
            Some(t) => gguf::type_bytes(t, self.numel()),
            None => self.numel() * self.dtype.size_in_bytes(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorStore {
    /// What the user pointed at (file or folder): named in every error.
    origin: PathBuf,
    files: Vec<Arc<SafetensorsFile>>,
    ggufs: Vec<Arc<GgufFile>>,
    keys: BTreeMap<String, (Source, KeyInfo)>,
    /// Keys quantized when a `+packed` plan stages them (`--quant TYPE` on a dense file), and
    /// to what type: the packed copy on the device is made from the dense source on the way.
    quantize_on_load: BTreeMap<String, GgmlDType>,
    /// Their quantized bytes, kept in host memory once made: a streamed plan stages a block
    /// every step, and quantizing costs far more than copying.
    quantized: Arc<Mutex<HashMap<String, Arc<Vec<u8>>>>>,
}

impl TensorStore {
    pub fn new(origin: impl Into<PathBuf>) -> Self {
        Self {
            origin: origin.into(),
            files: Vec::new(),
            ggufs: Vec::new(),
            keys: BTreeMap::new(),
            quantize_on_load: BTreeMap::new(),
            quantized: Arc::default(),
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

    /// Every tensor of a GGUF file whose name `rename` maps to a canonical key.
    pub fn from_gguf(
        origin: impl Into<PathBuf>,
        file: Arc<GgufFile>,
        rename: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let mut store = Self::new(origin);
        let idx = store.add_gguf(file.clone());
        for name in file.tensors().keys() {
            if let Some(key) = rename(name) {
                store.insert(
                    key,
                    Source::Gguf {
                        file: idx,
                        name: name.clone(),
                    },
                )?;
            }
        }
        Ok(store)
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

    pub fn gguf_files(&self) -> &[Arc<GgufFile>] {
        &self.ggufs
    }

    pub fn add_gguf(&mut self, file: Arc<GgufFile>) -> usize {
        self.ggufs.push(file);
        self.ggufs.len() - 1
    }

    /// The source of a key (its recipe).
    pub fn source(&self, key: &str) -> Result<&Source> {
        self.keys
            .get(key)
            .map(|(s, _)| s)
            .ok_or_else(|| self.missing(key))
    }

    /// The stored GGUF tensor a key reads as is (type and bytes, straight from the map), if
    /// it is one: lets a re-quantisation to the same type copy it bit for bit.
    pub fn gguf_raw(&self, key: &str) -> Option<(GgmlDType, &[u8])> {
        match self.keys.get(key) {
            Some((Source::Gguf { file, name }, info)) => {
                let (t, bytes) = self.ggufs[*file].raw(name).ok()?;
                (t.shape == info.shape).then_some((t.ggml, bytes))
            }
            _ => None,
        }
    }

    /// Quantizes this store's dense weights to `spec` (the types `fluxfit quantize` would write,
    /// `component` naming the rules) when a `+packed` plan stages them; plans that do not pack
    /// keep reading them dense. Tensors already block-quantized are left as they are. Their
    /// `KeyInfo::ggml` becomes the planned type, so manifests and the planner see the packed
    /// size. Returns how many tensors will be quantized.
    pub fn quantize_on_load(
        &mut self,
        component: super::quant_rules::Component,
        spec: &super::quant_rules::QuantSpec,
    ) -> Result<usize> {
        // A LoRA's factors stay dense: they are small, and their rank is rarely a block's width.
        let shapes = self
            .keys
            .iter()
            .filter(|(k, _)| !self.is_packable(k) && !k.contains(".lora_"))
            .map(|(k, (_, i))| (k.clone(), i.shape.clone()));
        let choices = super::quant_rules::plan_shapes(shapes, component, spec).map_err(|key| {
            Error::Config(format!(
                "{}: `{key}` has no GGUF name for a {} file",
                self.origin.display(),
                component.architecture()
            ))
        })?;
        for c in choices {
            if gguf::dense_dtype(c.ggml).is_none() {
                if let Some((_, info)) = self.keys.get_mut(&c.key) {
                    info.ggml = Some(c.ggml);
                }
                self.quantize_on_load.insert(c.key, c.ggml);
            }
        }
        Ok(self.quantize_on_load.len())
    }

    /// The key as candle's block-quantized tensor on `device`, when it is a GGUF tensor of a
    /// block type stored in its canonical shape, or a dense one to quantize on load: kept packed
    /// on the device and dequantized per stage (`+packed` plans), it takes its stored bytes
    /// there instead of the compute dtype's.
    pub fn packed(&self, key: &str, device: &Device) -> Result<Option<QTensor>> {
        if let Some(&t) = self.quantize_on_load.get(key) {
            let (source, info) = self.keys.get(key).ok_or_else(|| self.missing(key))?;
            let cached = self
                .quantized
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(key)
                .cloned();
            let bytes = match cached {
                Some(b) => b,
                None => {
                    let b = Arc::new(super::quant_rules::quantize_tensor(
                        &self.build(source)?,
                        t,
                    )?);
                    self.quantized
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key.to_string(), b.clone());
                    b
                }
            };
            return Ok(Some(candle_core::quantized::ggml_file::qtensor_from_ggml(
                t,
                &bytes,
                info.shape.clone(),
                device,
            )?));
        }
        let Some((t, _)) = self.gguf_raw(key) else {
            return Ok(None);
        };
        if gguf::dense_dtype(t).is_some() {
            return Ok(None);
        }
        match self.keys.get(key) {
            Some((Source::Gguf { file, name }, _)) => {
                Ok(Some(self.ggufs[*file].qtensor(name, device)?))
            }
            _ => Ok(None),
        }
    }

    /// Whether [`TensorStore::packed`] gives `key` packed.
    pub fn is_packable(&self, key: &str) -> bool {
        self.quantize_on_load.contains_key(key)
            || self
                .gguf_raw(key)
                .is_some_and(|(t, _)| gguf::dense_dtype(t).is_none())
    }

    /// Attaches fp8 scales: every stored fp8 `X.weight` with a companion scale tensor
    /// (`X.scale_weight`, ComfyUI's scaled-fp8 checkpoints; `X.weight_scale`, ComfyUI's newer
    /// quantized layout and compressed-tensors/ModelOpt exports) is read as `weight × scale`,
    /// and the scales and other quantisation side tensors (`scale_input`, `input_scale`,
    /// `comfy_quant`, the `scaled_fp8` marker) are dropped from the keys. Works through any
    /// recipe (diffusers' joined q/k/v are scaled part by part).
    pub fn attach_fp8_scales(&mut self) -> Result<()> {
        let keys: Vec<String> = self.keys.keys().cloned().collect();
        for key in keys {
            let (src, _) = &self.keys[&key];
            let scaled = self.with_scales(src.clone());
            if let Some(scaled) = scaled {
                self.insert(key, scaled)?;
            }
        }
        const SIDE: &[&str] = &[
            ".scale_weight",
            ".weight_scale",
            ".scale_input",
            ".input_scale",
            ".comfy_quant",
        ];
        self.keys
            .retain(|k, _| k != "scaled_fp8" && !SIDE.iter().any(|s| k.ends_with(s)));
        Ok(())
    }

    /// `src` with scales attached to its fp8 leaves; `None` if it has none.
    fn with_scales(&self, src: Source) -> Option<Source> {
        match src {
            Source::File { file, ref name } => {
                let f = &self.files[file];
                let info = f.tensors().get(name)?;
                let fp8 = info.dtype == DType::F8E4M3 || info.fp8_e5m2;
                let stem = name.strip_suffix(".weight")?;
                let scale = ["scale_weight", "weight_scale"]
                    .iter()
                    .map(|s| format!("{stem}.{s}"))
                    .find(|s| f.tensors().contains_key(s))?;
                fp8.then(|| Source::Scaled {
                    inner: Box::new(src.clone()),
                    scale: Box::new(Source::File { file, name: scale }),
                })
            }
            Source::Concat { parts, dim } => {
                let scaled: Vec<Option<Source>> =
                    parts.iter().map(|p| self.with_scales(p.clone())).collect();
                scaled.iter().any(Option::is_some).then(|| Source::Concat {
                    parts: scaled
                        .into_iter()
                        .zip(parts)
                        .map(|(s, p)| s.unwrap_or(p))
                        .collect(),
                    dim,
                })
            }
            Source::SwapHalves { inner, dim } => {
                self.with_scales(*inner).map(|i| Source::SwapHalves {
                    inner: Box::new(i),
                    dim,
                })
            }
            Source::Reshape { inner, shape } => self.with_scales(*inner).map(|i| Source::Reshape {
                inner: Box::new(i),
                shape,
            }),
            Source::Gguf { .. }
            | Source::Scaled { .. }
            | Source::ZeroPad { .. }
            | Source::Times { .. }
            | Source::Zeros { .. }
            | Source::Sum { .. } => None,
        }
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

    /// A stored tensor read as is, as its bytes in the memory map, their dtype and the shape;
    /// `None` for recipes, GGUF tensors and fp8 (whose bytes candle cannot take as they are).
    /// The GPU's upload copies these straight into its staging memory.
    pub fn direct_bytes(&self, key: &str) -> Result<Option<DirectBytes<'_>>> {
        let (source, _) = self.keys.get(key).ok_or_else(|| self.missing(key))?;
        let Source::File { file, name } = source else {
            return Ok(None);
        };
        let f = &self.files[*file];
        let Some(info) = f.tensors().get(name) else {
            return Ok(None);
        };
        if info.fp8_e5m2 || !matches!(info.dtype, DType::BF16 | DType::F16 | DType::F32) {
            return Ok(None);
        }
        Ok(Some(DirectBytes {
            bytes: f.bytes(info),
            dtype: info.dtype,
            shape: info.shape.clone(),
        }))
    }

    /// Whether `key` is a stored tensor read as is (no recipe): loading it in its storage dtype
    /// on the CPU makes exactly one buffer.
    pub fn is_direct(&self, key: &str) -> bool {
        matches!(self.keys.get(key), Some((Source::File { .. }, _)))
    }

    fn build(&self, source: &Source) -> Result<Tensor> {
        Ok(match source {
            Source::File { file, name } => self.files[*file].load(name, &Device::Cpu)?,
            Source::Gguf { file, name } => self.ggufs[*file].load(name)?,
            Source::Scaled { inner, scale } => {
                let w = self.build(inner)?.to_dtype(DType::F32)?;
                let s = self.build(scale)?.to_dtype(DType::F32)?;
                scale_weight(&w, &s).map_err(|e| {
                    Error::Config(format!(
                        "{}: cannot apply the scale {} of shape {:?} to {} of shape {:?}: {e}",
                        self.origin.display(),
                        Self::source_name(scale),
                        s.dims(),
                        Self::source_name(inner),
                        w.dims()
                    ))
                })?
            }
            Source::Concat { parts, dim } => {
                let mut parts = parts
                    .iter()
                    .map(|p| self.build(p))
                    .collect::<Result<Vec<_>>>()?;
                // Parts read in different dtypes (some scaled, some not): join in f32.
                if parts.iter().any(|p| p.dtype() != parts[0].dtype()) {
                    parts = parts
                        .iter()
                        .map(|p| p.to_dtype(DType::F32))
                        .collect::<candle_core::Result<_>>()?;
                }
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
            Source::ZeroPad { inner, shape } => {
                let mut t = self.build(inner)?;
                for (d, &want) in shape.iter().enumerate() {
                    let have = t.dim(d)?;
                    if want > have {
                        t = t.pad_with_zeros(d, 0, want - have)?;
                    }
                }
                t
            }
            Source::Times { inner, factor } => self
                .build(inner)?
                .to_dtype(DType::F32)?
                .affine(*factor, 0.0)?,
            Source::Zeros { shape } => Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu)?,
            Source::Sum { parts } => {
                let mut sum: Option<Tensor> = None;
                for p in parts {
                    let t = self.build(p)?.to_dtype(DType::F32)?;
                    sum = Some(match sum {
                        None => t,
                        Some(s) => s.add(&t)?,
                    });
                }
                sum.ok_or_else(|| Error::Config("a sum of no tensors".into()))?
            }
        })
    }

    /// The stored name a recipe reads (its first file tensor), for messages.
    fn source_name(source: &Source) -> String {
        match source {
            Source::File { name, .. } | Source::Gguf { name, .. } => format!("`{name}`"),
            Source::Concat { parts, .. } | Source::Sum { parts } => parts
                .first()
                .map_or_else(|| "(nothing)".into(), Self::source_name),
            Source::Zeros { shape } => format!("zeros {shape:?}"),
            Source::SwapHalves { inner, .. }
            | Source::Reshape { inner, .. }
            | Source::Scaled { inner, .. }
            | Source::ZeroPad { inner, .. }
            | Source::Times { inner, .. } => Self::source_name(inner),
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
                let read = match t.dtype {
                    _ if t.fp8_e5m2 => DType::F16,
                    DType::F8E4M3 => DType::F32,
                    d => d,
                };
                Ok(KeyInfo {
                    shape: t.shape.clone(),
                    dtype: t.dtype,
                    ggml: None,
                    read,
                })
            }
            Source::Gguf { file, name } => {
                let f = &self.ggufs[*file];
                let t = f.tensors().get(name).ok_or_else(|| Error::MissingKey {
                    path: f.path().to_path_buf(),
                    key: name.clone(),
                    hint: String::new(),
                })?;
                Ok(KeyInfo {
                    shape: t.shape.clone(),
                    dtype: t.dtype(),
                    ggml: Some(t.ggml),
                    read: t.dtype(),
                })
            }
            Source::Scaled { inner, .. } => Ok(KeyInfo {
                read: DType::F32,
                ..self.info_of(inner)?
            }),
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
                    ggml: infos[0].ggml,
                    read: if infos.iter().all(|i| i.read == infos[0].read) {
                        infos[0].read
                    } else {
                        DType::F32
                    },
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
                    ..info
                })
            }
            Source::ZeroPad { inner, shape } => {
                let info = self.info_of(inner)?;
                if info.shape.len() != shape.len()
                    || info.shape.iter().zip(shape).any(|(have, want)| have > want)
                {
                    return Err(Error::Config(format!(
                        "{}: cannot zero-pad {} of shape {:?} to {shape:?}",
                        self.origin.display(),
                        Self::source_name(inner),
                        info.shape
                    )));
                }
                Ok(KeyInfo {
                    shape: shape.clone(),
                    ..info
                })
            }
            Source::Times { inner, .. } => Ok(KeyInfo {
                read: DType::F32,
                ..self.info_of(inner)?
            }),
            Source::Zeros { shape } => Ok(KeyInfo {
                shape: shape.clone(),
                dtype: DType::F32,
                ggml: None,
                read: DType::F32,
            }),
            Source::Sum { parts } => {
                let infos = parts
                    .iter()
                    .map(|p| self.info_of(p))
                    .collect::<Result<Vec<_>>>()?;
                match infos.first() {
                    Some(first) if infos.iter().all(|i| i.shape == first.shape) => Ok(KeyInfo {
                        read: DType::F32,
                        ..first.clone()
                    }),
                    _ => Err(Error::Config(format!(
                        "{}: cannot add tensors of shapes {:?}",
                        self.origin.display(),
                        infos.iter().map(|i| i.shape.clone()).collect::<Vec<_>>()
                    ))),
                }
            }
        }
    }
}

/// `w × s` for a per-tensor scale (one element), a per-output-channel scale (`[out]` or
/// `[out, 1]`) or a block scale (`[⌈out/b⌉, ⌈in/b⌉]`, each element covering a b×b tile).
fn scale_weight(w: &Tensor, s: &Tensor) -> candle_core::Result<Tensor> {
    if s.elem_count() == 1 {
        let s = s.flatten_all()?.to_vec1::<f32>()?[0];
        return w.affine(s as f64, 0.0);
    }
    let dims = w.dims();
    if dims.is_empty() {
        candle_core::bail!("a scalar weight with {} scales", s.elem_count());
    }
    let out = dims[0];
    if s.elem_count() == out && (s.rank() == 1 || s.dims()[1..].iter().all(|d| *d == 1)) {
        let mut shape = vec![1; dims.len()];
        shape[0] = out;
        return w.broadcast_mul(&s.reshape(shape)?);
    }
    if dims.len() == 2 && s.rank() == 2 {
        let (rows, cols) = (dims[0], dims[1]);
        let (sr, sc) = (s.dims()[0], s.dims()[1]);
        // Square blocks, 128 the usual size; the scale grid's shape tells which.
        let fits = |b: usize| sr == rows.div_ceil(b) && sc == cols.div_ceil(b);
        if let Some(b) = [128, 64, 256, 32, 512, 16].into_iter().find(|b| fits(*b)) {
            let full = tiles(s, b)?.narrow(0, 0, rows)?.narrow(1, 0, cols)?;
            return w.mul(&full);
        }
    }
    candle_core::bail!("no per-tensor, per-channel or block layout fits")
}

/// Repeats each element of a 2-D tensor into a `b × b` tile.
fn tiles(s: &Tensor, b: usize) -> candle_core::Result<Tensor> {
    let (r, c) = s.dims2()?;
    s.reshape((r, 1, c, 1))?
        .broadcast_as((r, b, c, b))?
        .contiguous()?
        .reshape((r * b, c * b))
}
