//! GGUF checkpoints: memory-mapped, each tensor dequantized when its stage is materialised.
//!
//! The header is parsed with candle's reader (`gguf_file::Content`, which reads the metadata and
//! the tensor table, not the data); the file itself is memory-mapped, so a tensor's bytes leave
//! the map only when a stage asks for it (docs/architecture.md principle 2), and become a dense tensor there
//! through candle's dequantisation (`QTensor::dequantize`).
//!
//! GGUF lists dimensions innermost first (ggml's `ne[0]` is the row length); candle's reader
//! reverses them, so every shape here is in PyTorch order (`[out, in]` for a Linear weight).
//!
//! Two naming schemes are published: FLUX flow models keep the BFL names (city96's
//! `flux1-dev-Q8_0.gguf`, architecture `flux`), and T5 encoders use llama.cpp's
//! (`enc.blk.3.attn_q.weight`, architecture `t5encoder`). [`t5_canonical`] maps the latter to
//! transformers' names and [`t5_llama`] back, for the files we write.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use crate::error::{Error, Result};

/// Data alignment we write, and GGUF's default.
pub const ALIGNMENT: usize = 32;

/// Where one tensor lives inside a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub ggml: GgmlDType,
    /// Shape in PyTorch order, as the network reads it.
    pub shape: Vec<usize>,
    /// Shape in PyTorch order as stored (differs from `shape` only where the file records an
    /// original shape, `comfy.gguf.orig_shape.<name>`, for tensors of more than 4 dimensions).
    pub stored_shape: Vec<usize>,
    /// Byte range relative to the start of the data section.
    pub start: usize,
    pub end: usize,
}

impl GgufTensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }
    /// The dense dtype this tensor is read as: its own for F32/F16/BF16, F32 for block types.
    pub fn dtype(&self) -> DType {
        dense_dtype(self.ggml).unwrap_or(DType::F32)
    }
}

/// F32, F16 and BF16 are stored plainly; every other type is a block quantisation.
pub fn dense_dtype(t: GgmlDType) -> Option<DType> {
    match t {
        GgmlDType::F32 => Some(DType::F32),
        GgmlDType::F16 => Some(DType::F16),
        GgmlDType::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// The product of `dims`, or `None` past `usize`.
fn checked_product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Bytes of `numel` elements in `t` (`numel` a multiple of the block size).
pub fn type_bytes(t: GgmlDType, numel: usize) -> usize {
    numel / t.block_size() * t.type_size()
}

/// The type's number in the GGUF file (ggml's `enum ggml_type`).
pub fn type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// The storage types fluxfit reads and writes, by their usual names.
pub const TYPES: &[(&str, GgmlDType)] = &[
    ("f32", GgmlDType::F32),
    ("f16", GgmlDType::F16),
    ("bf16", GgmlDType::BF16),
    ("q8_0", GgmlDType::Q8_0),
    ("q6_k", GgmlDType::Q6K),
    ("q5_k", GgmlDType::Q5K),
    ("q5_1", GgmlDType::Q5_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q4_k", GgmlDType::Q4K),
    ("q4_1", GgmlDType::Q4_1),
    ("q4_0", GgmlDType::Q4_0),
    ("q3_k", GgmlDType::Q3K),
    ("q2_k", GgmlDType::Q2K),
];

/// `q4_k`, `Q4_K`, `q4k` → Q4K.
pub fn parse_type(s: &str) -> Result<GgmlDType> {
    let norm = |s: &str| s.to_ascii_lowercase().replace('_', "");
    TYPES
        .iter()
        .find(|(n, _)| norm(n) == norm(s))
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            Error::Config(format!(
                "unknown storage type `{s}`; one of: {}",
                TYPES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ))
        })
}

/// The usual name of a type (`q4_k`).
pub fn type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q8K => "q8_k",
        _ => TYPES
            .iter()
            .find(|(_, x)| *x == t)
            .map(|(n, _)| *n)
            .expect("every other type is listed"),
    }
}

/// Bits per weight of a type (block scales included).
pub fn bits_per_weight(t: GgmlDType) -> f64 {
    8.0 * t.type_size() as f64 / t.block_size() as f64
}

/// A memory-mapped GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: BTreeMap<String, GgufTensorInfo>,
    metadata: HashMap<String, Value>,
    bytes_read: AtomicUsize,
}

/// Whether `path` is a GGUF file (by its magic, whatever its name).
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let named = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    // A `.gguf` file is read as one, so a bad magic is reported as a bad GGUF.
    path.is_file()
        && (named
            || File::open(path)
                .and_then(|mut f| f.read_exact(&mut magic))
                .is_ok()
                && &magic == b"GGUF")
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Arc<Self>> {
        let path = path.as_ref().to_path_buf();
        let corrupt = |reason: String| Error::CorruptGguf {
            path: path.clone(),
            reason,
        };
        Error::check_regular_file(&path)?;
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let content =
            Content::read(&mut BufReader::new(&file)).map_err(|e| corrupt(e.to_string()))?;
        // SAFETY: read-only map; a checkpoint modified while we run is outside our contract.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let data_start = content.tensor_data_offset as usize;
        let data_len = mmap.len().saturating_sub(data_start);
        let mut tensors = BTreeMap::new();
        for (name, info) in &content.tensor_infos {
            let stored_shape = info.shape.dims().to_vec();
            // Checked: a header's numbers are untrusted, and a wrapped product could pass.
            let too_big = || {
                corrupt(format!(
                    "tensor `{name}` of shape {stored_shape:?} would take more than 2^64 bytes"
                ))
            };
            let numel = checked_product(&stored_shape).ok_or_else(too_big)?;
            let block = info.ggml_dtype.block_size();
            if !numel.is_multiple_of(block) {
                return Err(corrupt(format!(
                    "tensor `{name}` of shape {stored_shape:?} is not a whole number of {block}-element blocks"
                )));
            }
            let start = info.offset as usize;
            let end = (numel / block)
                .checked_mul(info.ggml_dtype.type_size())
                .and_then(|b| b.checked_add(start))
                .ok_or_else(too_big)?;
            if end > data_len {
                return Err(corrupt(format!(
                    "tensor `{name}` ends at byte {end} but the data section has {data_len} bytes (file truncated?)"
                )));
            }
            let shape = match orig_shape(&content.metadata, name) {
                Some(s) if checked_product(&s) == Some(numel) => s,
                Some(s) => {
                    return Err(corrupt(format!(
                        "tensor `{name}` records original shape {s:?} but holds {numel} elements"
                    )))
                }
                None => stored_shape.clone(),
            };
            tensors.insert(
                name.clone(),
                GgufTensorInfo {
                    ggml: info.ggml_dtype,
                    shape,
                    stored_shape,
                    start,
                    end,
                },
            );
        }
        Ok(Arc::new(Self {
            path,
            mmap,
            data_start,
            tensors,
            metadata: content.metadata,
            bytes_read: AtomicUsize::new(0),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &BTreeMap<String, GgufTensorInfo> {
        &self.tensors
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.metadata
    }

    /// `general.architecture`, if the file says.
    pub fn architecture(&self) -> Option<&str> {
        match self.metadata.get("general.architecture") {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// Bytes copied out of the map since the file was opened.
    pub fn bytes_read(&self) -> usize {
        self.bytes_read.load(Ordering::Relaxed)
    }

    fn info(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensors.get(name).ok_or_else(|| Error::MissingKey {
            path: self.path.clone(),
            key: name.to_string(),
            hint: String::new(),
        })
    }

    /// The stored bytes of a tensor, straight from the map.
    pub fn raw(&self, name: &str) -> Result<(&GgufTensorInfo, &[u8])> {
        let info = self.info(name)?;
        let bytes = &self.mmap[self.data_start + info.start..self.data_start + info.end];
        Ok((info, bytes))
    }

    /// The tensor as candle's quantized tensor on `device` (stored shape).
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        let (info, bytes) = self.raw(name)?;
        self.bytes_read.fetch_add(bytes.len(), Ordering::Relaxed);
        let storage = with_aligned(bytes, |b| {
            QStorage::from_data(Cow::Borrowed(b), device, info.ggml)
        })?;
        Ok(QTensor::new(storage, info.stored_shape.as_slice())?)
    }

    /// Materialises one tensor on the CPU: F32/F16/BF16 as stored, block types dequantized to
    /// F32. The only place bytes leave the map.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let (info, bytes) = self.raw(name)?;
        let t = match dense_dtype(info.ggml) {
            Some(dtype) => {
                self.bytes_read.fetch_add(bytes.len(), Ordering::Relaxed);
                Tensor::from_raw_buffer(bytes, dtype, &info.stored_shape, &Device::Cpu)?
            }
            None => self.qtensor(name, &Device::Cpu)?.dequantize(&Device::Cpu)?,
        };
        Ok(if info.shape != info.stored_shape {
            t.reshape(info.shape.as_slice())?
        } else {
            t
        })
    }
}

/// Calls `f` on `bytes`, copied to an 8-byte aligned buffer first if the map does not give
/// that (candle reads blocks in place; files written with GGUF's default alignment always do).
fn with_aligned<T>(bytes: &[u8], f: impl FnOnce(&[u8]) -> candle_core::Result<T>) -> Result<T> {
    if (bytes.as_ptr() as usize).is_multiple_of(8) {
        return Ok(f(bytes)?);
    }
    let mut buf = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: a u64 buffer viewed as bytes, within its length.
    let view = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, bytes.len()) };
    view.copy_from_slice(bytes);
    Ok(f(view)?)
}

/// `comfy.gguf.orig_shape.<name>`: the PyTorch shape of a tensor stored flattened.
fn orig_shape(metadata: &HashMap<String, Value>, name: &str) -> Option<Vec<usize>> {
    let Value::Array(values) = metadata.get(&format!("comfy.gguf.orig_shape.{name}"))? else {
        return None;
    };
    values
        .iter()
        .map(|v| v.to_i64().ok().or(v.to_i32().ok().map(i64::from)))
        .map(|v| v.and_then(|v| usize::try_from(v).ok()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// T5 names

/// llama.cpp's per-block T5 encoder names → transformers' (inside `encoder.block.N.`).
const T5_BLOCK: &[(&str, &str)] = &[
    ("attn_q", "layer.0.SelfAttention.q"),
    ("attn_k", "layer.0.SelfAttention.k"),
    ("attn_v", "layer.0.SelfAttention.v"),
    ("attn_o", "layer.0.SelfAttention.o"),
    (
        "attn_rel_b",
        "layer.0.SelfAttention.relative_attention_bias",
    ),
    ("attn_norm", "layer.0.layer_norm"),
    ("ffn_gate", "layer.1.DenseReluDense.wi_0"),
    ("ffn_up", "layer.1.DenseReluDense.wi_1"),
    ("ffn_down", "layer.1.DenseReluDense.wo"),
    ("ffn_norm", "layer.1.layer_norm"),
];

/// The transformers name of a llama.cpp T5 encoder tensor (`enc.blk.3.attn_q.weight` →
/// `encoder.block.3.layer.0.SelfAttention.q.weight`); `gated` says whether the encoder has
/// `ffn_gate` (v1.1), which decides whether `ffn_up` is `wi_1` or the original T5's `wi`.
/// `None` for names outside the encoder (a decoder, `output.weight`).
pub fn t5_canonical(name: &str, gated: bool) -> Option<String> {
    let (stem, suffix) = name.rsplit_once('.')?;
    match stem {
        "token_embd" => return Some(format!("shared.{suffix}")),
        "enc.output_norm" => return Some(format!("encoder.final_layer_norm.{suffix}")),
        _ => {}
    }
    let rest = stem.strip_prefix("enc.blk.")?;
    let (idx, part) = rest.split_once('.')?;
    let idx: usize = idx.parse().ok()?;
    let to = match (part, gated) {
        ("ffn_up", false) => "layer.1.DenseReluDense.wi",
        _ => T5_BLOCK.iter().find(|(from, _)| *from == part)?.1,
    };
    Some(format!("encoder.block.{idx}.{to}.{suffix}"))
}

/// The llama.cpp name of a transformers T5 encoder tensor, the inverse of [`t5_canonical`].
pub fn t5_llama(name: &str) -> Option<String> {
    let (stem, suffix) = name.rsplit_once('.')?;
    match stem {
        "shared" | "encoder.embed_tokens" => return Some(format!("token_embd.{suffix}")),
        "encoder.final_layer_norm" => return Some(format!("enc.output_norm.{suffix}")),
        _ => {}
    }
    let rest = stem.strip_prefix("encoder.block.")?;
    let (idx, part) = rest.split_once('.')?;
    let idx: usize = idx.parse().ok()?;
    let to = match part {
        "layer.1.DenseReluDense.wi" => "ffn_up",
        _ => T5_BLOCK.iter().find(|(_, hf)| *hf == part)?.0,
    };
    Some(format!("enc.blk.{idx}.{to}.{suffix}"))
}

// ---------------------------------------------------------------------------------------------
// Writing

/// One tensor of a GGUF file being written: its name, PyTorch shape and storage type.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub ggml: GgmlDType,
}

impl TensorEntry {
    pub fn nbytes(&self) -> usize {
        type_bytes(self.ggml, self.shape.iter().product())
    }
}

/// A metadata value we write.
#[derive(Debug, Clone)]
pub enum Meta {
    String(String),
    U32(u32),
}

/// Writes a GGUF (version 3) file tensor by tensor: the header, with every tensor's type, shape
/// and offset, goes first, then each tensor's data as [`GgufWriter::tensor`] receives it, so no
/// more than one tensor is ever held. Tensors must come in the order they were declared.
pub struct GgufWriter<W: Write + Seek> {
    out: W,
    entries: Vec<TensorEntry>,
    next: usize,
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn pad(w: &mut impl Write, len: u64) -> std::io::Result<()> {
    let rem = (len as usize) % ALIGNMENT;
    if rem != 0 {
        w.write_all(&[0u8; ALIGNMENT][..ALIGNMENT - rem])?;
    }
    Ok(())
}

impl<W: Write + Seek> GgufWriter<W> {
    pub fn new(
        mut out: W,
        metadata: &[(&str, Meta)],
        entries: Vec<TensorEntry>,
    ) -> std::io::Result<Self> {
        out.write_all(b"GGUF")?;
        out.write_all(&3u32.to_le_bytes())?;
        out.write_all(&(entries.len() as u64).to_le_bytes())?;
        out.write_all(&(metadata.len() as u64).to_le_bytes())?;
        for (key, value) in metadata {
            put_str(&mut out, key)?;
            match value {
                Meta::U32(v) => {
                    out.write_all(&4u32.to_le_bytes())?;
                    out.write_all(&v.to_le_bytes())?;
                }
                Meta::String(s) => {
                    out.write_all(&8u32.to_le_bytes())?;
                    put_str(&mut out, s)?;
                }
            }
        }
        let mut offset = 0u64;
        for e in &entries {
            put_str(&mut out, &e.name)?;
            out.write_all(&(e.shape.len() as u32).to_le_bytes())?;
            for d in e.shape.iter().rev() {
                out.write_all(&(*d as u64).to_le_bytes())?;
            }
            out.write_all(&type_id(e.ggml).to_le_bytes())?;
            out.write_all(&offset.to_le_bytes())?;
            offset += (e.nbytes() as u64).div_ceil(ALIGNMENT as u64) * ALIGNMENT as u64;
        }
        let pos = out.stream_position()?;
        pad(&mut out, pos)?;
        Ok(Self {
            out,
            entries,
            next: 0,
        })
    }

    /// The next tensor's stored bytes (its type's encoding, e.g. `QTensor::data`).
    pub fn tensor(&mut self, data: &[u8]) -> std::io::Result<()> {
        let e = self.entries.get(self.next).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "more tensors than declared",
            )
        })?;
        if data.len() != e.nbytes() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "tensor `{}` ({} {:?}) takes {} bytes, got {}",
                    e.name,
                    type_name(e.ggml),
                    e.shape,
                    e.nbytes(),
                    data.len()
                ),
            ));
        }
        self.out.write_all(data)?;
        pad(&mut self.out, data.len() as u64)?;
        self.next += 1;
        Ok(())
    }

    /// Checks every declared tensor was written and returns the writer, flushed.
    pub fn finish(mut self) -> std::io::Result<W> {
        if self.next != self.entries.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} of {} tensors written", self.next, self.entries.len()),
            ));
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t5_names_round_trip() {
        for (llama, hf) in [
            ("token_embd.weight", "shared.weight"),
            (
                "enc.blk.0.attn_rel_b.weight",
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            ),
            (
                "enc.blk.23.ffn_up.weight",
                "encoder.block.23.layer.1.DenseReluDense.wi_1.weight",
            ),
            (
                "enc.blk.2.ffn_norm.weight",
                "encoder.block.2.layer.1.layer_norm.weight",
            ),
            ("enc.output_norm.weight", "encoder.final_layer_norm.weight"),
        ] {
            assert_eq!(t5_canonical(llama, true).as_deref(), Some(hf));
            assert_eq!(t5_llama(hf).as_deref(), Some(llama));
        }
        assert_eq!(
            t5_canonical("enc.blk.1.ffn_up.weight", false).as_deref(),
            Some("encoder.block.1.layer.1.DenseReluDense.wi.weight")
        );
        assert_eq!(
            t5_llama("encoder.block.1.layer.1.DenseReluDense.wi.weight").as_deref(),
            Some("enc.blk.1.ffn_up.weight")
        );
        assert!(t5_canonical("dec.blk.0.attn_q.weight", true).is_none());
        assert!(t5_canonical("output.weight", true).is_none());
    }

    #[test]
    fn type_names() {
        assert_eq!(parse_type("Q4_K").unwrap(), GgmlDType::Q4K);
        assert_eq!(parse_type("q4k").unwrap(), GgmlDType::Q4K);
        assert_eq!(parse_type("bf16").unwrap(), GgmlDType::BF16);
        assert!(parse_type("q4_k_m").is_err());
        for (n, t) in TYPES {
            assert_eq!(type_name(*t), *n);
        }
        assert_eq!(bits_per_weight(GgmlDType::Q8_0), 8.5);
        assert_eq!(bits_per_weight(GgmlDType::Q4K), 4.5);
    }
}
