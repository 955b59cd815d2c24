//! Writing a flow model or T5 encoder as GGUF in a quantized storage type, tensor by tensor.
//!
//! The input is any [`TensorStore`] (safetensors in either layout, fp8, or GGUF), so canonical
//! names come out whatever went in. One tensor at a time is materialised in F32, quantized
//! (rows split over the CPU's threads) and appended to the file; memory stays bounded by the
//! largest tensor, never the model.
//!
//! Which type each tensor gets: [`super::quant_rules`].

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};

use super::gguf::{GgufWriter, Meta, TensorEntry};
pub use super::quant_rules::*;
use super::store::TensorStore;
use crate::error::{Error, Result};

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

pub(crate) fn partial_path(path: &Path) -> PathBuf {
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out.gguf".into());
    path.with_file_name(format!(".{file}.partial-{}", std::process::id()))
}

/// Moves the finished file into place without replacing anything there.
pub(crate) fn publish(tmp: &Path, path: &Path) -> Result<()> {
    match std::fs::hard_link(tmp, path) {
        Ok(()) => {
            let _ = std::fs::remove_file(tmp);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::Output {
            path: path.to_path_buf(),
            message: "exists (or appeared while writing); fluxfit never replaces a file".into(),
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
    let component = Component::detect(|k| store.contains(k)).ok_or_else(|| {
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
    use crate::checkpoint::quant_rules::fallback;
    use candle_core::quantized::QTensor;
    use candle_core::Tensor;

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
