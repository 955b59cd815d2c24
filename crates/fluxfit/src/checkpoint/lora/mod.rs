//! LoRA files in every common FLUX.1 layout, several at once, attached to the model's stores
//! without merging.
//!
//! The reference wraps every Linear as `base(x) + scale·B(A(x))` (docs/flux.md §1.2, §2.1). We
//! do the same at run time: a LoRA's factors become keys of the store next to the weights they
//! adapt, so every residency plan stages them with their block and `Stage::linear` adds the
//! low-rank term. All the updates of one layer become one pair of higher rank: A stacks the
//! down-projections, B places each up-projection (times its scale) in its own columns and in
//! the rows it adapts, zeros elsewhere. So stacked LoRAs, q/k/v LoRAs on a fused `qkv` and
//! diffusers' swapped final modulation cost one extra pair of matmuls per layer, and nothing
//! downstream knows about layouts or scales. Merging instead would cost 2·r·in·out flops per
//! weight each time a streamed block is staged.
//!
//! `keys` sorts a file's tensors into modules and tells its layout (or the architecture it
//! really is for); `targets` maps module names onto canonical layers.

pub mod keys;
mod targets;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use keys::Layout;
use keys::Module;
use targets::{Base, Span, Target};

use super::safetensors::SafetensorsFile;
use super::store::{Source, TensorStore};
use crate::component::Component;
use crate::error::{Error, Result};

/// A LoRA file and the strength of its update.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub file: Arc<SafetensorsFile>,
    /// The user's scale (the reference's `lora_scale`), which multiplies the file's own
    /// `alpha / rank`; `None`: [`CONTROL_SCALE`] for a BFL control LoRA, else 1.
    pub scale: Option<f64>,
}

/// The reference CLI's `lora_scale` for BFL's control LoRAs.
pub const CONTROL_SCALE: f64 = 0.85;

/// The stores a LoRA may adapt: the flow model always, CLIP and T5 when a file has
/// text-encoder layers (kohya's `lora_te1_` for CLIP and `lora_te3_`/`lora_te2_` for T5, diffusers' `text_encoder.`).
pub struct LoraTargets<'a> {
    pub flow: &'a mut TensorStore,
    pub clip: Option<&'a mut TensorStore>,
    pub t5: Option<&'a mut TensorStore>,
}

/// What attaching one LoRA file changed.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSummary {
    pub path: PathBuf,
    pub layout: Layout,
    /// The user's scale it was attached at.
    pub scale: f64,
    /// [`short_hash`] of the file, when the caller computed it (empty otherwise).
    pub hash: String,
    /// Linear layers that gained a low-rank term (a q/k/v slice counts once).
    pub layers: usize,
    /// Largest rank among them.
    pub rank: usize,
    /// Components adapted, in the order of `Component::ALL`.
    pub components: Vec<Component>,
    /// Base weights widened with zeros to the LoRA's input width (`img_in` of a control LoRA).
    pub padded: Vec<String>,
    /// Base tensors the file replaces outright (the QK-norm scales of a control LoRA).
    pub replaced: Vec<String>,
}

/// One module's update, checked against the base.
#[derive(Debug, Clone)]
struct Update {
    file: usize,
    target: Target,
    down: String,
    up: String,
    down_bias: Option<String>,
    up_bias: Option<String>,
    rank: usize,
    /// Input width of `down` (wider than the base's only for a control LoRA's `img_in`).
    inputs: usize,
    scale: f64,
}

/// How many unknown module names an error lists before counting the rest.
const LISTED: usize = 12;

/// Attaches `loras` to the stores, in order. Fails, naming the file and tensor, on a file for
/// another architecture or adapter type, modules no layer of the base matches (all listed),
/// shapes that do not fit (the LoRA's and the base's), a scale or alpha that is not a finite
/// number, or two files replacing the same tensor.
pub fn attach(targets: LoraTargets<'_>, loras: &[LoraFile]) -> Result<Vec<LoraSummary>> {
    let LoraTargets { flow, clip, t5 } = targets;
    let mut updates = Vec::new();
    let mut replaced: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let mut summaries = Vec::new();
    {
        let base = Base::new(&*flow, clip.as_deref(), t5.as_deref());
        for (i, lora) in loras.iter().enumerate() {
            let (summary, mut found) = read_file(&base, i, lora, &mut replaced)?;
            summaries.push(summary);
            updates.append(&mut found);
        }
    }
    let stores = [
        (Component::Flow, Some(flow)),
        (Component::Clip, clip),
        (Component::T5, t5),
    ];
    for (component, store) in stores {
        let Some(store) = store else {
            continue;
        };
        // Each file goes into a store once, when any of its tensors goes there.
        let mut index: BTreeMap<usize, usize> = BTreeMap::new();
        let mut layers: Vec<&str> = Vec::new();
        for u in updates.iter().filter(|u| u.target.component == component) {
            if !layers.contains(&u.target.layer.as_str()) {
                layers.push(&u.target.layer);
            }
            index.entry(u.file).or_insert(usize::MAX);
        }
        if component == Component::Flow {
            for (file, _) in replaced.values() {
                index.entry(*file).or_insert(usize::MAX);
            }
        }
        for (file, slot) in index.iter_mut() {
            *slot = store.add_file(loras[*file].file.clone());
        }
        let src = |file: usize, name: &str| Source::File {
            file: index[&file],
            name: name.to_string(),
        };
        for layer in layers {
            let group: Vec<&Update> = updates
                .iter()
                .filter(|u| u.target.component == component && u.target.layer == layer)
                .collect();
            for (key, source) in layer_sources(store, layer, &group, &src)? {
                store.insert(key, source)?;
            }
            let wide = group.iter().map(|u| u.inputs).max().unwrap_or(0);
            let weight = format!("{layer}.weight");
            let shape = store.shape(&weight)?.to_vec();
            if wide > shape[1] {
                let inner = store.source(&weight)?.clone();
                store.insert(
                    weight.clone(),
                    Source::ZeroPad {
                        inner: Box::new(inner),
                        shape: vec![shape[0], wide],
                    },
                )?;
                for u in &group {
                    if u.inputs == wide && !summaries[u.file].padded.contains(&weight) {
                        summaries[u.file].padded.push(weight.clone());
                    }
                }
            }
        }
        if component == Component::Flow {
            for (key, (file, name)) in &replaced {
                store.insert(key.clone(), src(*file, name))?;
            }
        }
    }
    Ok(summaries)
}

/// The factor keys of one layer: A stacks every update's down-projection (zero-padded to the
/// widest input), B places each scaled up-projection in its rows and its own columns.
fn layer_sources(
    store: &TensorStore,
    layer: &str,
    group: &[&Update],
    src: &impl Fn(usize, &str) -> Source,
) -> Result<Vec<(String, Source)>> {
    let out = store.shape(&format!("{layer}.weight"))?[0];
    let wide = group.iter().map(|u| u.inputs).max().unwrap_or(0);
    let mut downs = Vec::new();
    let mut ups = Vec::new();
    let mut down_biases = Vec::new();
    let mut up_biases = Vec::new();
    for u in group {
        let mut down = src(u.file, &u.down);
        if u.inputs < wide {
            down = Source::ZeroPad {
                inner: Box::new(down),
                shape: vec![u.rank, wide],
            };
        }
        downs.push(down);
        let up = Source::Times {
            inner: Box::new(src(u.file, &u.up)),
            factor: u.scale,
        };
        ups.push(place(up, u.target.rows, out, Some(u.rank)));
        down_biases.push(match &u.down_bias {
            Some(b) => src(u.file, b),
            None => Source::Zeros {
                shape: vec![u.rank],
            },
        });
        if let Some(b) = &u.up_bias {
            let b = Source::Times {
                inner: Box::new(src(u.file, b)),
                factor: u.scale,
            };
            up_biases.push(place(b, u.target.rows, out, None));
        }
    }
    let joined = |mut parts: Vec<Source>, dim: usize| {
        if parts.len() == 1 {
            parts.remove(0)
        } else {
            Source::Concat { parts, dim }
        }
    };
    let mut keys = vec![
        (format!("{layer}.lora_A.weight"), joined(downs, 0)),
        (format!("{layer}.lora_B.weight"), joined(ups, 1)),
    ];
    if group.iter().any(|u| u.down_bias.is_some()) {
        keys.push((format!("{layer}.lora_A.bias"), joined(down_biases, 0)));
    }
    if !up_biases.is_empty() {
        let sum = if up_biases.len() == 1 {
            up_biases.remove(0)
        } else {
            Source::Sum { parts: up_biases }
        };
        keys.push((format!("{layer}.lora_B.bias"), sum));
    }
    Ok(keys)
}

/// An up-projection (`rank` columns) or its bias (`None`) in the rows `span` of a layer with
/// `out` output rows, zeros in the others.
fn place(x: Source, span: Span, out: usize, rank: Option<usize>) -> Source {
    let zeros = |rows: usize| Source::Zeros {
        shape: match rank {
            Some(r) => vec![rows, r],
            None => vec![rows],
        },
    };
    match span {
        Span::All => x,
        Span::SwappedHalves => Source::SwapHalves {
            inner: Box::new(x),
            dim: 0,
        },
        Span::Rows { offset, len } => {
            let mut parts = Vec::new();
            if offset > 0 {
                parts.push(zeros(offset));
            }
            parts.push(x);
            if offset + len < out {
                parts.push(zeros(out - offset - len));
            }
            if parts.len() == 1 {
                parts.remove(0)
            } else {
                Source::Concat { parts, dim: 0 }
            }
        }
    }
}

/// Reads one file: its layout, its modules checked against the base, its replacements.
fn read_file(
    base: &Base<'_>,
    index: usize,
    lora: &LoraFile,
    replaced: &mut BTreeMap<String, (usize, String)>,
) -> Result<(LoraSummary, Vec<Update>)> {
    let file = &lora.file;
    let path = file.path().to_path_buf();
    let bad = |message: String| Error::Layout {
        path: path.clone(),
        message,
    };
    let names: Vec<String> = file.tensors().keys().cloned().collect();
    if let Some(why) = keys::refusal(&names) {
        return Err(bad(why));
    }
    let parsed = keys::parse(&names);
    let control = parsed.layout == Layout::Bfl && !parsed.others.is_empty();
    let scale = match lora.scale {
        Some(s) if !s.is_finite() => {
            return Err(bad(format!(
                "the LoRA scale {s} is not a finite number; give one like 0.8 (`FILE:0.8`)"
            )))
        }
        Some(s) => s,
        None if control => CONTROL_SCALE,
        None => 1.0,
    };
    let alphas = AdapterAlphas::from_metadata(file)?;
    let mut summary = LoraSummary {
        path: path.clone(),
        layout: parsed.layout,
        scale,
        hash: String::new(),
        layers: 0,
        rank: 0,
        components: Vec::new(),
        padded: Vec::new(),
        replaced: Vec::new(),
    };
    let mut updates = Vec::new();
    let mut unknown = Vec::new();
    for m in &parsed.modules {
        let Some(target) = base.target(parsed.layout, &m.name) else {
            unknown.push(m.down.clone().or(m.up.clone()).unwrap_or(m.name.clone()));
            continue;
        };
        let u = check_module(base, index, file, scale, parsed.layout, m, target, &alphas)?;
        summary.rank = summary.rank.max(u.rank);
        if !summary.components.contains(&u.target.component) {
            summary.components.push(u.target.component);
        }
        updates.push(u);
    }
    summary.layers = {
        let mut layers: Vec<(Component, &str)> = updates
            .iter()
            .map(|u| (u.target.component, u.target.layer.as_str()))
            .collect();
        layers.sort();
        layers.dedup();
        layers.len()
    };
    summary
        .components
        .sort_by_key(|c| Component::ALL.iter().position(|a| a == c));
    for (key, name) in &parsed.others {
        let found = &file.tensors()[name].shape;
        match base.flow.shape(key) {
            Ok(s) if s == found.as_slice() && parsed.layout == Layout::Bfl => {
                if let Some((other, _)) = replaced.get(key) {
                    return Err(bad(format!(
                        "`{name}` replaces `{key}`, which LoRA number {} in the list also replaces; stack only one of them",
                        other + 1
                    )));
                }
                replaced.insert(key.clone(), (index, name.clone()));
                summary.replaced.push(key.clone());
            }
            Ok(s) => {
                return Err(bad(format!(
                    "LoRA tensor `{name}` {found:?} does not fit the base's `{key}` {s:?}: is this LoRA for another model?"
                )))
            }
            Err(_) => unknown.push(name.clone()),
        }
    }
    if !unknown.is_empty() {
        let more = unknown.len().saturating_sub(LISTED);
        let list: Vec<String> = unknown
            .iter()
            .take(LISTED)
            .map(|k| format!("`{k}`"))
            .collect();
        return Err(bad(format!(
            "{} key(s) of this {} LoRA match no layer of the base model: {}{}; is this LoRA for another model or model size?",
            unknown.len(),
            parsed.layout,
            list.join(", "),
            if more > 0 { format!(" and {more} more") } else { String::new() },
        )));
    }
    if updates.is_empty() && summary.replaced.is_empty() {
        return Err(bad(
            "no LoRA pairs (`….lora_A.weight` with `….lora_B.weight`, or `lora_down`/`lora_up`) in this file"
                .into(),
        ));
    }
    Ok((summary, updates))
}

/// Checks one module's tensors against the layer it adapts and works out its scale.
#[allow(clippy::too_many_arguments)]
fn check_module(
    base: &Base<'_>,
    index: usize,
    file: &SafetensorsFile,
    scale: f64,
    layout: Layout,
    m: &Module,
    target: Target,
    alphas: &AdapterAlphas,
) -> Result<Update> {
    let bad = |message: String| Error::Layout {
        path: file.path().to_path_buf(),
        message,
    };
    let shape = |name: &str| file.tensors()[name].shape.clone();
    let (down, up) = match (&m.down, &m.up) {
        (Some(d), Some(u)) => (d.clone(), u.clone()),
        (Some(d), None) => return Err(bad(format!("`{d}` has no up-projection beside it"))),
        (None, Some(u)) => return Err(bad(format!("`{u}` has no down-projection beside it"))),
        (None, None) => {
            let what = m
                .alpha
                .clone()
                .or(m.up_bias.clone())
                .or(m.down_bias.clone());
            return Err(bad(format!(
                "`{}` has no LoRA pair (down and up projections) beside it",
                what.unwrap_or(m.name.clone())
            )));
        }
    };
    let (a, b) = (shape(&down), shape(&up));
    let store = base.store(target.component).expect("target's store exists");
    let weight = format!("{}.weight", target.layer);
    let w = store.shape(&weight)?.to_vec();
    if a.len() != 2 || b.len() != 2 || a[0] != b[1] {
        return Err(bad(format!(
            "`{down}` {a:?} and `{up}` {b:?} do not make a low-rank pair (down is [rank, in], up is [out, rank])"
        )));
    }
    let rows = match target.rows {
        Span::All | Span::SwappedHalves => w[0],
        Span::Rows { len, .. } => len,
    };
    let part = match target.rows {
        Span::Rows { offset, len } => format!(" (rows {offset}..{} of it)", offset + len),
        _ => String::new(),
    };
    let widen = layout == Layout::Bfl && a[1] > w[1];
    if b[0] != rows || (a[1] != w[1] && !widen) {
        return Err(bad(format!(
            "`{down}` {a:?} and `{up}` {b:?} make a [{}, {}] update, but they adapt `{weight}` {w:?}{part}: is this LoRA for another model?",
            b[0], a[1]
        )));
    }
    let rank = a[0];
    for (bias, len) in [(&m.down_bias, rank), (&m.up_bias, b[0])] {
        if let Some(name) = bias {
            if shape(name) != [len] {
                return Err(bad(format!(
                    "`{name}` {:?} is not a bias of length {len} for its pair",
                    shape(name)
                )));
            }
        }
    }
    let alpha = match &m.alpha {
        Some(name) => Some(read_alpha(file, name)?),
        None => alphas.alpha(&m.name),
    };
    let own = match alpha {
        None => 1.0,
        Some(alpha) if alphas.rslora => alpha / (rank as f64).sqrt(),
        Some(alpha) => alpha / rank as f64,
    };
    Ok(Update {
        file: index,
        target,
        down,
        up,
        down_bias: m.down_bias.clone(),
        up_bias: m.up_bias.clone(),
        rank,
        inputs: a[1],
        scale: scale * own,
    })
}

/// A module's `alpha`: one finite number.
fn read_alpha(file: &SafetensorsFile, name: &str) -> Result<f64> {
    let bad = |message: String| Error::Layout {
        path: file.path().to_path_buf(),
        message,
    };
    let t = file.load(name, &candle_core::Device::Cpu)?;
    if t.elem_count() != 1 {
        return Err(bad(format!(
            "`{name}` {:?} should hold one number, the LoRA's alpha",
            t.dims()
        )));
    }
    let v = t
        .to_dtype(candle_core::DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?[0];
    if !v.is_finite() {
        return Err(bad(format!("`{name}` is {v}, not a finite alpha")));
    }
    Ok(v)
}

/// PEFT's alpha settings, as diffusers stores them in the safetensors metadata
/// (`lora_adapter_metadata`): `lora_alpha`, per-module `alpha_pattern`, `use_rslora`.
#[derive(Debug, Clone, Default)]
struct AdapterAlphas {
    alpha: Option<f64>,
    patterns: Vec<(String, f64)>,
    rslora: bool,
}

impl AdapterAlphas {
    fn from_metadata(file: &SafetensorsFile) -> Result<Self> {
        let Some(raw) = file.metadata().get("lora_adapter_metadata") else {
            return Ok(Self::default());
        };
        let bad = |message: String| Error::Layout {
            path: file.path().to_path_buf(),
            message: format!("metadata `lora_adapter_metadata`: {message}"),
        };
        let json: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| bad(format!("not JSON: {e}")))?;
        let get = |key: &str| {
            json.get(key)
                .or_else(|| json.get(format!("transformer.{key}")))
                .cloned()
        };
        let number = |key: &str, v: &serde_json::Value| {
            v.as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| bad(format!("`{key}` is {v}, not a finite number")))
        };
        let mut out = Self::default();
        if let Some(v) = get("lora_alpha") {
            out.alpha = Some(number("lora_alpha", &v)?);
        }
        out.rslora = get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
        if let Some(serde_json::Value::Object(map)) = get("alpha_pattern") {
            for (k, v) in map {
                // PEFT matches these as regular expressions; fluxfit matches module names.
                if k.chars().any(|c| "*+?[](){}|^$\\".contains(c)) {
                    return Err(bad(format!(
                        "`alpha_pattern` key `{k}` is a regular expression; fluxfit reads literal module names"
                    )));
                }
                out.patterns.push((k.clone(), number(&k, &v)?));
            }
        }
        Ok(out)
    }

    /// The alpha of `module` (its name without the wrapper prefix), if the metadata sets one.
    fn alpha(&self, module: &str) -> Option<f64> {
        self.patterns
            .iter()
            .find(|(k, _)| module == k || module.ends_with(&format!(".{k}")))
            .map(|(_, a)| *a)
            .or(self.alpha)
    }
}

/// The first 12 hex digits of the file's SHA-256: the short hash A1111 and ComfyUI users match
/// LoRAs by (`Lora hashes`).
pub fn short_hash(path: &Path) -> Result<String> {
    use sha2::Digest;
    let io = |error: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let digest = hasher.finalize();
    Ok(digest.iter().take(6).map(|b| format!("{b:02x}")).collect())
}
