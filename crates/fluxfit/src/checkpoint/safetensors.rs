//! A memory-mapped safetensors file: the one home of its weights (docs/architecture.md principle 2).
//!
//! We parse the header ourselves so that a truncated or corrupt file is reported with its path
//! and what is wrong, before any tensor is touched.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use crate::error::{Error, Result};

/// Where one tensor lives inside its file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// What the bytes are; `U8` for `F8_E5M2`, which candle has no type for (see `fp8_e5m2`).
    pub dtype: DType,
    /// Stored as fp8 e5m2: read as F16 (an e5m2 byte is the high byte of an f16).
    pub fp8_e5m2: bool,
    pub shape: Vec<usize>,
    /// Byte range relative to the start of the data section.
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }
}

/// The bytes behind a file: a memory map, or a buffer for models made in process (the built-in
/// tiny model), which then is their one home.
#[derive(Debug)]
enum Backing {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Backing,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
    /// Bytes copied out of the map so far (what `load` read), for tests and reports.
    bytes_read: AtomicUsize,
}

fn dtype_from_str(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "F8_E4M3" => DType::F8E4M3,
        "F8_E5M2" => DType::U8,
        _ => return None,
    })
}

impl SafetensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Arc<Self>> {
        let path = path.as_ref().to_path_buf();
        Error::check_regular_file(&path)?;
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only; a checkpoint modified while we run is outside our contract,
        // as for every program that maps model weights.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        Self::parse(path, Backing::Mapped(mmap))
    }

    /// A safetensors image held in memory; `label` stands for the path in messages.
    pub fn from_bytes(label: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Arc<Self>> {
        Self::parse(label.into(), Backing::Owned(bytes))
    }

    fn parse(path: PathBuf, mmap: Backing) -> Result<Arc<Self>> {
        let corrupt = |reason: String| Error::CorruptCheckpoint {
            path: path.clone(),
            reason,
        };
        if mmap.len() < 8 {
            return Err(corrupt(format!("only {} bytes long", mmap.len())));
        }
        let header_len = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes")) as usize;
        if header_len > mmap.len() - 8 || header_len > 100 << 20 {
            return Err(corrupt(format!(
                "header claims {header_len} bytes but the file has {}",
                mmap.len()
            )));
        }
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&mmap[8..8 + header_len])
                .map_err(|e| corrupt(format!("header is not valid JSON: {e}")))?;
        let data_start = 8 + header_len;
        let data_len = mmap.len() - data_start;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, value) in header {
            if name == "__metadata__" {
                if let Some(map) = value.as_object() {
                    for (k, v) in map {
                        metadata.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                    }
                }
                continue;
            }
            let entry: RawEntry = serde_json::from_value(value)
                .map_err(|e| corrupt(format!("entry `{name}`: {e}")))?;
            let dtype = dtype_from_str(&entry.dtype).ok_or_else(|| Error::UnsupportedDtype {
                path: path.clone(),
                key: name.clone(),
                dtype: entry.dtype.clone(),
            })?;
            let [start, end] = entry.data_offsets;
            // Checked: a header's numbers are untrusted, and a wrapped product could pass.
            let bytes = entry
                .shape
                .iter()
                .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d));
            if end < start || end > data_len {
                return Err(corrupt(format!(
                    "tensor `{name}` ends at byte {end} but the data section has {data_len} bytes (file truncated?)"
                )));
            }
            if bytes != Some(end - start) {
                let need = bytes.map_or("more than 2^64".to_string(), |b| b.to_string());
                return Err(corrupt(format!(
                    "tensor `{name}` of shape {:?} and dtype {} should take {need} bytes, takes {}",
                    entry.shape,
                    entry.dtype,
                    end - start
                )));
            }
            tensors.insert(
                name,
                TensorInfo {
                    dtype,
                    fp8_e5m2: entry.dtype == "F8_E5M2",
                    shape: entry.shape,
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
            metadata,
            bytes_read: AtomicUsize::new(0),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Bytes copied out of the map by [`SafetensorsFile::load`] since the file was opened.
    pub fn bytes_read(&self) -> usize {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// The raw bytes of a tensor, straight from the map (no copy).
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[self.data_start + info.start..self.data_start + info.end]
    }

    /// Materialise one tensor on `device`: the only place bytes leave the map. fp8 tensors come
    /// out widened (e4m3 to F32, e5m2 to F16), as candle cannot compute in fp8 on the CPU.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let info = self.tensors.get(name).ok_or_else(|| Error::MissingKey {
            path: self.path.clone(),
            key: name.to_string(),
            hint: String::new(),
        })?;
        self.bytes_read.fetch_add(info.nbytes(), Ordering::Relaxed);
        if info.fp8_e5m2 {
            let halves: Vec<half::f16> = self
                .bytes(info)
                .iter()
                .map(|b| half::f16::from_bits(u16::from(*b) << 8))
                .collect();
            return Ok(Tensor::from_vec(halves, info.shape.as_slice(), device)?);
        }
        if info.dtype == DType::F8E4M3 {
            // Decoded through a table (candle's own decode of each byte): element-wise
            // conversion is several times slower, and this runs for every streamed stage.
            let lut = e4m3_table();
            let values: Vec<f32> = self.bytes(info).iter().map(|b| lut[*b as usize]).collect();
            return Ok(Tensor::from_vec(values, info.shape.as_slice(), device)?);
        }
        Ok(Tensor::from_raw_buffer(
            self.bytes(info),
            info.dtype,
            &info.shape,
            device,
        )?)
    }
}

/// The f32 value of every fp8 e4m3fn byte, as candle decodes it.
fn e4m3_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let bytes: Vec<u8> = (0..=255).collect();
        let values = Tensor::from_raw_buffer(&bytes, DType::F8E4M3, &[256], &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .expect("decoding 256 fp8 values on the CPU");
        let mut table = [0f32; 256];
        table.copy_from_slice(&values);
        table
    })
}

#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// The header (length prefix included) of a safetensors image of f32 tensors stored in order.
fn f32_header<'a>(tensors: impl Iterator<Item = (&'a str, &'a [usize])>) -> (Vec<u8>, usize) {
    header(tensors, "F32", 4)
}

/// A safetensors header for tensors of one dtype (`F32`, `BF16`) stored in order.
fn header<'a>(
    tensors: impl Iterator<Item = (&'a str, &'a [usize])>,
    dtype: &str,
    size: usize,
) -> (Vec<u8>, usize) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, shape) in tensors {
        let len = shape.iter().product::<usize>() * size;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut head = serde_json::Value::Object(header).to_string().into_bytes();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len());
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    (out, offset)
}

/// Serialises f32 tensors `(name, shape, values)` as a safetensors image.
pub fn serialize_f32(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let (mut out, data) = f32_header(tensors.iter().map(|(n, s, _)| (n.as_str(), s.as_slice())));
    out.reserve(data);
    for (_, _, values) in tensors {
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Writes f32 tensors to a safetensors file one at a time, asking `values` for each: the
/// process never holds more than one tensor (for models made in process and then mapped).
/// Written under a temporary name and then linked into place: never replaces a file, never
/// leaves a partial one.
pub fn write_f32(
    path: &Path,
    shapes: &[(String, Vec<usize>)],
    mut values: impl FnMut(&str, &[usize]) -> Vec<f32>,
) -> Result<()> {
    use std::io::Write;
    if path.symlink_metadata().is_ok() {
        return Err(Error::Output {
            path: path.to_path_buf(),
            message: "exists; fluxfit never replaces a file: remove it or choose another folder"
                .into(),
        });
    }
    let tmp = super::quantize::partial_path(path);
    let written = (|| -> Result<()> {
        let io = |e| Error::io(&tmp, e);
        let (head, _) = f32_header(shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())));
        let mut f = std::io::BufWriter::new(File::create(&tmp).map_err(io)?);
        f.write_all(&head).map_err(io)?;
        for (name, shape) in shapes {
            let v = values(name, shape);
            if v.len() != shape.iter().product::<usize>() {
                return Err(Error::Config(format!(
                    "{}: {} values for `{name}` of shape {shape:?}",
                    path.display(),
                    v.len()
                )));
            }
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            f.write_all(&bytes).map_err(io)?;
        }
        f.into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?
            .sync_all()
            .map_err(io)
    })();
    let out = written.and_then(|()| super::quantize::publish(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    out
}

/// Writes bf16 tensors to `path` tensor by tensor, `fill` giving each one's values as bf16 bits:
/// a full-size checkpoint (24 GB) never has to be in memory at once. Written to a temporary name
/// and renamed, so a file at `path` is always whole.
pub fn write_bf16(
    path: &Path,
    shapes: &[(String, Vec<usize>)],
    mut fill: impl FnMut(&str, &[usize], &mut [u16]),
) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("safetensors.partial");
    let io = |e| Error::io(&tmp, e);
    let (head, _) = header(
        shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())),
        "BF16",
        2,
    );
    let mut f = std::io::BufWriter::with_capacity(8 << 20, File::create(&tmp).map_err(io)?);
    f.write_all(&head).map_err(io)?;
    let mut values = Vec::new();
    let mut bytes = Vec::new();
    for (name, shape) in shapes {
        values.clear();
        values.resize(shape.iter().product::<usize>(), 0u16);
        fill(name, shape, &mut values);
        bytes.clear();
        bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        f.write_all(&bytes).map_err(io)?;
    }
    f.into_inner()
        .map_err(|e| Error::io(&tmp, e.into_error()))?
        .sync_all()
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
