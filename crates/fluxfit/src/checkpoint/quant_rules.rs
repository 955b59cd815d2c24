//! Which storage type each tensor of a flow model or T5 encoder gets when it is quantized, and
//! the quantization of one tensor: pure rules, shared by the GGUF writer (`quantize.rs`), the
//! store's quantize-on-load and the planner's predictions for files that need not exist.
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

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::gguf;
pub use crate::component::Component;
use crate::error::{Error, Result};

/// Which components `fluxfit quantize` writes: the flow model (architecture `flux`, BFL
/// names) and the T5 encoder (`t5encoder`, llama.cpp names, as the published T5 GGUFs).
impl Component {
    /// From the canonical keys of a store (`has`: whether it holds a key).
    pub fn detect(has: impl Fn(&str) -> bool) -> Option<Self> {
        if has("img_in.weight") {
            Some(Self::Flow)
        } else if has("shared.weight") || has("encoder.embed_tokens.weight") {
            Some(Self::T5)
        } else {
            None
        }
    }

    /// The GGUF architecture a quantized file of this component declares.
    pub fn architecture(self) -> &'static str {
        match self {
            Self::Flow => "flux",
            Self::T5 => "t5encoder",
            Self::Clip => "clip",
            Self::Vae => "vae",
        }
    }

    /// The name a canonical key is written under; none for the components that are not
    /// quantized (CLIP, the VAE).
    pub fn gguf_name(self, key: &str) -> Option<String> {
        match self {
            Self::Flow => Some(key.to_string()),
            Self::T5 => gguf::t5_llama(key),
            Self::Clip | Self::Vae => None,
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
            Self::Clip | Self::Vae => true,
        }
    }
}

/// Relative L2 error of the flow model's output against f32 weights, per storage type, as
/// `fluxfit bench-quant` measured it (flow model of hidden size 512 with random weights, 320
/// tokens; docs/quantization.md "Error and speed"). bf16 is the published checkpoints' storage. A guide to
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
pub(crate) fn fallback(t: GgmlDType) -> GgmlDType {
    match t {
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F32,
    }
}

/// The type of each tensor over canonical names and shapes alone (a manifest: file sizes without weights).
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
