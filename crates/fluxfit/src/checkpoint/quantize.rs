//! Writing a flow model or T5 encoder as GGUF in a quantized storage type, tensor by tensor.
//!
//! The input is any [`TensorStore`] (safetensors in either layout, fp8, or GGUF), so canonical
//! names come out whatever went in. One tensor at a time is materialised in F32, quantized
//! (rows split over the CPU's threads) and appended to the file; memory stays bounded by the
//! largest tensor, never the model.
//!
//! Which type each tensor gets follows the published FLUX GGUFs (city96's convert script) and
//! llama.cpp for T5:
//! 1. the first `--keep PATTERN=TYPE` whose glob matches the canonical name;
//! 2. 1-D tensors (norms, biases, QK-norm scales) in F32: they are tiny, and bf16 → f32 is
//!    lossless;
//! 3. the flow model's embedders and final layer (`img_in`, `txt_in`, `time_in`, `vector_in`,
//!    `guidance_in`, `final_layer`) and T5's relative attention bias in F32, unless the target
//!    is itself a dense type (f32/f16/bf16);
//! 4. otherwise the target type. A block type needs rows (the last dimension) that are a
//!    multiple of its block: 256 for the K-quants, 32 for the others. Where they are not, the
//!    tensor falls back as llama.cpp does (Q2_K/Q3_K → Q4_0, Q4_K → Q5_0, Q5_K → Q5_1,
//!    Q6_K → Q8_0), then to F32, and the choice records why.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::gguf::{self, GgufWriter, Meta, TensorEntry};
use super::store::TensorStore;
use crate::error::{Error, Result};

/// What a checkpoint holds, which decides the GGUF architecture and names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// FLUX flow transformer: architecture `flux`, BFL names.
    Flow,
    /// T5 encoder: architecture `t5encoder`, llama.cpp names (as the published T5 GGUFs).
    T5,
}

impl Component {
    /// From the canonical keys of a store.
    pub fn detect(store: &TensorStore) -> Option<Self> {
        if store.contains("img_in.weight") {
            Some(Self::Flow)
        } else if store.contains("shared.weight") || store.contains("encoder.embed_tokens.weight") {
            Some(Self::T5)
        } else {
            None
        }
    }

    pub fn architecture(self) -> &'static str {
        match self {
            Self::Flow => "flux",
            Self::T5 => "t5encoder",
        }
    }

    /// The name a canonical key is written under.
    pub fn gguf_name(self, key: &str) -> Option<String> {
        match self {
            Self::Flow => Some(key.to_string()),
            Self::T5 => gguf::t5_llama(key),
        }
    }

    /// Tensors kept in F32 whatever the target block type (rule 3).
    fn high_precision(self, key: &str) -> bool {
        match self {
            Self::Flow => [
                "img_in.",
                "txt_in.",
                "time_in.",
                "vector_in.",
                "guidance_in.",
                "final_layer.",
            ]
            .iter()
            .any(|p| key.starts_with(p)),
            Self::T5 => key.contains("relative_attention_bias"),
        }
    }
}

/// Relative L2 error of the flow model's output against f32 weights, per storage type, as
/// `fluxfit bench-quant` measured it (flow model of hidden size 512 with random weights, 320
/// tokens; README "Error and speed"). bf16 is the published checkpoints' storage. A guide to
/// what a type costs in quality, not a promise for real weights.
pub const MEASURED_ERROR: [(&str, f64); 10] = [
    ("bf16", 4.2e-3),
    ("f16", 5.3e-4),
    ("q8_0", 7.2e-3),
    ("q6_k", 2.4e-2),
    ("q5_k", 4.6e-2),
    ("q4_k", 9.8e-2),
    ("q4_0", 1.1e-1),
    ("q3_k", 1.9e-1),
    ("q2_k", 3.8e-1),
    ("fp8", 6.7e-2),
];

/// The measured error of a storage type named as in [`MEASURED_ERROR`].
pub fn measured_error(name: &str) -> Option<f64> {
    MEASURED_ERROR
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, e)| *e)
}

/// The storage types asked for.
#[derive(Debug, Clone)]
pub struct QuantSpec {
    /// The target type of the model's matrices.
    pub target: GgmlDType,
    /// `(glob, type)` overrides, first match wins (`*` any run of characters, `?` one).
    pub keep: Vec<(String, GgmlDType)>,
}

impl QuantSpec {
    pub fn new(target: GgmlDType) -> Self {
        Self {
            target,
            keep: Vec::new(),
        }
    }

    /// Parses `PATTERN=TYPE`.
    pub fn parse_keep(s: &str) -> Result<(String, GgmlDType)> {
        let (pattern, t) = s.rsplit_once('=').ok_or_else(|| {
            Error::Config(format!(
                "--keep {s}: expected PATTERN=TYPE, e.g. 'double_blocks.*.img_attn.*=q8_0'"
            ))
        })?;
        Ok((pattern.to_string(), gguf::parse_type(t)?))
    }
}

/// Why a tensor got its type.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    Target,
    Keep(String),
    OneDim,
    HighPrecision,
    /// The wanted type's block does not divide the rows.
    Fallback {
        wanted: GgmlDType,
        row: usize,
    },
}

/// One tensor of the output.
#[derive(Debug, Clone)]
pub struct Choice {
    /// Canonical key in the input store.
    pub key: String,
    /// Name in the GGUF file.
    pub name: String,
    pub shape: Vec<usize>,
    pub ggml: GgmlDType,
    pub reason: Reason,
}

impl Choice {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        gguf::type_bytes(self.ggml, self.numel())
    }
}

/// `*` matches any run of characters (dots included), `?` any one.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

fn is_dense(t: GgmlDType) -> bool {
    gguf::dense_dtype(t).is_some()
}

/// llama.cpp's fallback for rows its type's block does not divide.
fn fallback(t: GgmlDType) -> GgmlDType {
    match t {
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F32,
    }
}

/// The type of every tensor of `store` (rules in the module doc), in key order.
pub fn plan(store: &TensorStore, component: Component, spec: &QuantSpec) -> Result<Vec<Choice>> {
    let shapes = store
        .keys()
        .map(|k| Ok((k.clone(), store.shape(k)?.to_vec())))
        .collect::<Result<Vec<_>>>()?;
    plan_shapes(shapes, component, spec).map_err(|key| {
        Error::Config(format!(
            "{}: `{key}` has no GGUF name for a {} file",
            store.origin().display(),
            component.architecture()
        ))
    })
}

/// [`plan`] over canonical names and shapes alone (a manifest: file sizes without weights).
/// The error is a key with no GGUF name.
pub fn plan_shapes(
    shapes: impl IntoIterator<Item = (String, Vec<usize>)>,
    component: Component,
    spec: &QuantSpec,
) -> std::result::Result<Vec<Choice>, String> {
    let mut out = Vec::new();
    for (key, shape) in shapes {
        let Some(name) = component.gguf_name(&key) else {
            return Err(key);
        };
        let keep = spec.keep.iter().find(|(p, _)| glob_match(p, &key));
        let (wanted, reason) = if let Some((p, t)) = keep {
            (*t, Reason::Keep(p.clone()))
        } else if shape.len() <= 1 {
            (GgmlDType::F32, Reason::OneDim)
        } else if component.high_precision(&key) && !is_dense(spec.target) {
            (GgmlDType::F32, Reason::HighPrecision)
        } else {
            (spec.target, Reason::Target)
        };
        let row = shape.last().copied().unwrap_or(1);
        let mut ggml = wanted;
        while !row.is_multiple_of(ggml.block_size()) {
            ggml = fallback(ggml);
        }
        let reason = if ggml != wanted {
            Reason::Fallback { wanted, row }
        } else {
            reason
        };
        out.push(Choice {
            key,
            name,
            shape,
            ggml,
            reason,
        });
    }
    Ok(out)
}

/// llama.cpp's `general.file_type` for a file mostly of `t`.
fn file_type(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 14,
        GgmlDType::Q5K => 16,
        GgmlDType::Q6K => 18,
        GgmlDType::BF16 => 32,
        GgmlDType::Q8_1 | GgmlDType::Q8K => 0,
    }
}

/// The stored bytes of `t` in `ggml`: rows are quantized in parallel chunks (blocks never
/// straddle rows, so the chunks' bytes simply follow each other).
pub fn quantize_tensor(t: &Tensor, ggml: GgmlDType) -> Result<Vec<u8>> {
    let cols = t.dims().last().copied().unwrap_or(1).max(1);
    let rows = t.elem_count() / cols;
    // A plain buffer: candle's `QTensor::quantize` reads its source's whole storage, whatever
    // the layout says, so every chunk must be a tensor of its own.
    let data = t
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Chunks of at least ~1 M elements: smaller ones cost more in threads than they save.
    let per = rows.div_ceil(threads).max((1 << 20) / cols).max(1);
    let quantize = |start: usize| -> Result<Vec<u8>> {
        let len = per.min(rows - start);
        let chunk = Tensor::from_slice(
            &data[start * cols..(start + len) * cols],
            (len, cols),
            &Device::Cpu,
        )?;
        Ok(QTensor::quantize(&chunk, ggml)?.data()?.into_owned())
    };
    if per >= rows {
        return quantize(0);
    }
    let parts: Vec<Result<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..rows)
            .step_by(per)
            .map(|start| s.spawn(move || quantize(start)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Config("quantizer thread panicked".into())))
            })
            .collect()
    });
    let mut out = Vec::with_capacity(gguf::type_bytes(ggml, rows * cols));
    for p in parts {
        out.extend_from_slice(&p?);
    }
    Ok(out)
}

/// What [`write()`] did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub tensors: usize,
    pub params: usize,
    /// Bytes of the input tensors in storage.
    pub bytes_in: usize,
    /// Bytes of the output file.
    pub bytes_out: usize,
}

/// Writes `choices` (from [`plan`]) of `store` to a new GGUF at `path`: the data goes to a
/// temporary file beside it, which becomes `path` only when complete, and an existing `path` is
/// never replaced. `progress` is called after each tensor with its index.
pub fn write(
    store: &TensorStore,
    component: Component,
    choices: &[Choice],
    path: &Path,
    name: &str,
    mut progress: impl FnMut(usize, &Choice),
) -> Result<Summary> {
    if path.exists() {
        return Err(Error::Output {
            path: path.to_path_buf(),
            message: "exists; fluxfit never replaces a file: remove it or choose another --out"
                .into(),
        });
    }
    let tmp = partial_path(path);
    let result = write_to(store, component, choices, &tmp, name, &mut progress).and_then(|s| {
        publish(&tmp, path)?;
        Ok(s)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn partial_path(path: &Path) -> PathBuf {
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out.gguf".into());
    path.with_file_name(format!(".{file}.partial-{}", std::process::id()))
}

/// Moves the finished file into place without replacing anything there.
fn publish(tmp: &Path, path: &Path) -> Result<()> {
    match std::fs::hard_link(tmp, path) {
        Ok(()) => {
            let _ = std::fs::remove_file(tmp);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::Output {
            path: path.to_path_buf(),
            message: "appeared while quantizing; not replaced".into(),
        }),
        // File systems without hard links: a plain rename, checked first.
        Err(_) if !path.exists() => std::fs::rename(tmp, path).map_err(|e| Error::io(path, e)),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn write_to(
    store: &TensorStore,
    component: Component,
    choices: &[Choice],
    path: &Path,
    name: &str,
    progress: &mut impl FnMut(usize, &Choice),
) -> Result<Summary> {
    let io = |e| Error::io(path, e);
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io)?;
    let main = most_bytes(choices);
    let metadata = [
        (
            "general.architecture",
            Meta::String(component.architecture().into()),
        ),
        ("general.name", Meta::String(name.into())),
        ("general.quantization_version", Meta::U32(2)),
        ("general.file_type", Meta::U32(file_type(main))),
        (
            "general.quantized_by",
            Meta::String(format!("fluxfit {}", crate::version())),
        ),
    ];
    let entries = choices
        .iter()
        .map(|c| TensorEntry {
            name: c.name.clone(),
            shape: c.shape.clone(),
            ggml: c.ggml,
        })
        .collect();
    let mut w = GgufWriter::new(BufWriter::new(file), &metadata, entries).map_err(io)?;
    let mut summary = Summary::default();
    for (i, c) in choices.iter().enumerate() {
        let info = store.info(&c.key)?;
        summary.bytes_in += info.stored_bytes();
        summary.params += c.numel();
        match store.gguf_raw(&c.key) {
            // Already in the wanted type: copied bit for bit.
            Some((t, bytes)) if t == c.ggml => w.tensor(bytes).map_err(io)?,
            _ => {
                let t = store.load(&c.key, &Device::Cpu, DType::F32)?;
                w.tensor(&quantize_tensor(&t, c.ggml)?).map_err(io)?;
            }
        }
        progress(i, c);
    }
    let mut f = w.finish().map_err(io)?;
    std::io::Write::flush(&mut f).map_err(io)?;
    let file = f.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    summary.tensors = choices.len();
    summary.bytes_out = std::fs::metadata(path).map_err(io)?.len() as usize;
    Ok(summary)
}

/// The type most bytes are written in.
fn most_bytes(choices: &[Choice]) -> GgmlDType {
    let mut by: Vec<(GgmlDType, usize)> = Vec::new();
    for c in choices {
        match by.iter_mut().find(|(t, _)| *t == c.ggml) {
            Some((_, n)) => *n += c.nbytes(),
            None => by.push((c.ggml, c.nbytes())),
        }
    }
    by.into_iter()
        .max_by_key(|(_, n)| *n)
        .map_or(GgmlDType::F32, |(t, _)| t)
}

/// Plans and writes in one go, with no progress report: for tests and benchmarks.
pub fn quantize_store(
    store: &TensorStore,
    spec: &QuantSpec,
    path: &Path,
) -> Result<(Vec<Choice>, Summary)> {
    let component = Component::detect(store).ok_or_else(|| {
        Error::Config(format!(
            "{}: neither a FLUX flow model nor a T5 encoder",
            store.origin().display()
        ))
    })?;
    let choices = plan(store, component, spec)?;
    let summary = write(store, component, &choices, path, "fluxfit", |_, _| {})?;
    Ok((choices, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(
            "double_blocks.*",
            "double_blocks.3.img_attn.qkv.weight"
        ));
        assert!(glob_match(
            "*.img_attn.*",
            "double_blocks.3.img_attn.qkv.weight"
        ));
        assert!(glob_match(
            "double_blocks.?.img_mlp.0.weight",
            "double_blocks.7.img_mlp.0.weight"
        ));
        assert!(!glob_match(
            "double_blocks.?.img_mlp.0.weight",
            "double_blocks.17.img_mlp.0.weight"
        ));
        assert!(glob_match("*", ""));
        assert!(!glob_match("single_blocks.*", "double_blocks.0.x"));
        assert!(glob_match("*weight", "a.weight"));
        assert!(!glob_match("*weight", "a.bias"));
    }

    /// Large tensors are quantized in row chunks on several threads: the bytes must be those
    /// of one whole-tensor quantization (also for a source that is a view into a larger one).
    #[test]
    fn chunked_quantization_is_whole_tensor_quantization() {
        let n: usize = 3 * 1024 * 512;
        let values: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        let big = Tensor::from_vec(values, (3 * 1024, 512), &Device::Cpu).unwrap();
        // A view starting 1024 rows in: 2 M elements, over the 1 M chunk minimum.
        let view = big.narrow(0, 1024, 2048).unwrap();
        let fresh = Tensor::from_vec(
            view.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (2048, 512),
            &Device::Cpu,
        )
        .unwrap();
        for t in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::F16] {
            let whole = QTensor::quantize(&fresh, t)
                .unwrap()
                .data()
                .unwrap()
                .into_owned();
            assert!(quantize_tensor(&view, t).unwrap() == whole, "{t:?}");
        }
    }

    #[test]
    fn fallbacks_follow_llama_cpp() {
        assert_eq!(fallback(GgmlDType::Q4K), GgmlDType::Q5_0);
        assert_eq!(fallback(GgmlDType::Q6K), GgmlDType::Q8_0);
        assert_eq!(fallback(GgmlDType::Q8_0), GgmlDType::F32);
    }

    #[test]
    fn keep_parses() {
        let (p, t) = QuantSpec::parse_keep("double_blocks.*=q8_0").unwrap();
        assert_eq!((p.as_str(), t), ("double_blocks.*", GgmlDType::Q8_0));
        assert!(QuantSpec::parse_keep("double_blocks.*").is_err());
        assert!(QuantSpec::parse_keep("x=q9").is_err());
    }
}
