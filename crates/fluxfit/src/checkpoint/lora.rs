//! LoRA files in BFL's layout (FLUX.1-Canny-dev-lora, FLUX.1-Depth-dev-lora), attached to a
//! flow store without merging.
//!
//! The reference wraps every Linear as `base(x) + scale·B(A(x))` and loads the LoRA tensors
//! beside the base weights (docs/flux.md §1.2, §2.1). We do the same at run time: the LoRA tensors
//! become keys of the store next to the weights they adapt, so every residency plan stages
//! them with their block and `linear` adds the low-rank term. Merging instead would cost
//! 2·r·in·out flops per weight each time a streamed block is staged. The scale is folded into
//! B (and its bias) by a recipe, so nothing else needs to know it.

use std::sync::Arc;

use super::safetensors::SafetensorsFile;
use super::store::{Source, TensorStore};
use crate::error::{Error, Result};

/// Suffixes of a LoRA pair's tensors, after the adapted layer's name.
const A_WEIGHT: &str = ".lora_A.weight";
const A_BIAS: &str = ".lora_A.bias";
const B_WEIGHT: &str = ".lora_B.weight";
const B_BIAS: &str = ".lora_B.bias";

/// What attaching a LoRA changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoraSummary {
    /// Linear layers that gained a low-rank term.
    pub layers: usize,
    /// Largest rank among them.
    pub rank: usize,
    /// Base weights widened with zeros to the LoRA's input width (`img_in` of a control LoRA).
    pub padded: Vec<String>,
    /// Base tensors the file replaces outright (the QK-norm scales of a control LoRA).
    pub replaced: Vec<String>,
}

/// The canonical key a LoRA tensor adapts or replaces, with the file's own prefixes removed.
fn canonical(name: &str) -> &str {
    ["model.diffusion_model.", "diffusion_model."]
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .unwrap_or(name)
}

/// Attaches the LoRA in `file` to `store` at `scale` (the reference's `lora_scale`, 0.85 in its
/// CLI). Each adapted layer `X` gains `X.lora_A.weight` (and bias, if any) and
/// `X.lora_B.weight`/`X.lora_B.bias` pre-multiplied by `scale`; a base weight narrower than
/// the LoRA's input is zero-padded; any other tensor replaces the base's tensor of that name
/// and shape. Fails, naming the tensor, on keys of another layout or shapes that do not fit.
pub fn attach(
    store: &mut TensorStore,
    file: Arc<SafetensorsFile>,
    scale: f64,
) -> Result<LoraSummary> {
    let path = file.path().to_path_buf();
    let names: Vec<String> = file.tensors().keys().cloned().collect();
    let idx = store.add_file(file.clone());
    let src = |name: &str| Source::File {
        file: idx,
        name: name.to_string(),
    };
    let shape = |name: &str| file.tensors()[name].shape.clone();
    let bad = |key: &str, message: String| Error::Layout {
        path: path.clone(),
        message: format!("LoRA tensor `{key}`: {message}"),
    };
    if names
        .iter()
        .any(|n| n.starts_with("transformer.") || n.contains(".lora_down."))
    {
        return Err(Error::Layout {
            path: path.clone(),
            message: "this LoRA uses diffusers or kohya names (`transformer.…`, `lora_down`); \
                      fluxfit reads BFL-layout LoRAs (`double_blocks.0.img_attn.qkv.lora_A.weight`), \
                      as black-forest-labs/FLUX.1-Canny-dev-lora and FLUX.1-Depth-dev-lora ship them"
                .into(),
        });
    }
    let mut summary = LoraSummary::default();
    for name in &names {
        let key = canonical(name);
        if let Some(layer) = key.strip_suffix(A_WEIGHT) {
            let base = format!("{layer}.weight");
            let a = shape(name);
            let b_name = names
                .iter()
                .find(|n| canonical(n) == format!("{layer}{B_WEIGHT}"))
                .ok_or_else(|| bad(key, format!("no `{layer}{B_WEIGHT}` beside it")))?;
            let b = shape(b_name);
            let base_shape = store
                .shape(&base)
                .map_err(|_| bad(key, format!("the base model has no `{base}` to adapt")))?
                .to_vec();
            if a.len() != 2 || b.len() != 2 || a[0] != b[1] || base_shape.len() != 2 {
                return Err(bad(
                    key,
                    format!(
                        "A {a:?} and B {b:?} do not make a low-rank update of `{base}` {base_shape:?}"
                    ),
                ));
            }
            if b[0] != base_shape[0] || a[1] < base_shape[1] {
                return Err(bad(
                    key,
                    format!(
                        "the update is [{}, {}] but `{base}` is {base_shape:?}: is this LoRA for another model?",
                        b[0], a[1]
                    ),
                ));
            }
            if a[1] > base_shape[1] {
                let inner = store.source(&base)?.clone();
                store.insert(
                    base.clone(),
                    Source::ZeroPad {
                        inner: Box::new(inner),
                        shape: vec![base_shape[0], a[1]],
                    },
                )?;
                summary.padded.push(base);
            }
            store.insert(format!("{layer}{A_WEIGHT}"), src(name))?;
            store.insert(
                format!("{layer}{B_WEIGHT}"),
                Source::Times {
                    inner: Box::new(src(b_name)),
                    factor: scale,
                },
            )?;
            summary.layers += 1;
            summary.rank = summary.rank.max(a[0]);
        } else if let Some(layer) = key.strip_suffix(B_BIAS) {
            store.insert(
                format!("{layer}{B_BIAS}"),
                Source::Times {
                    inner: Box::new(src(name)),
                    factor: scale,
                },
            )?;
        } else if let Some(layer) = key.strip_suffix(A_BIAS) {
            store.insert(format!("{layer}{A_BIAS}"), src(name))?;
        } else if key.ends_with(B_WEIGHT) {
            // Attached with its A.
        } else {
            let found = shape(name);
            match store.shape(key) {
                Ok(s) if s == found.as_slice() => {
                    store.insert(key.to_string(), src(name))?;
                    summary.replaced.push(key.to_string());
                }
                Ok(s) => {
                    return Err(bad(
                        key,
                        format!("shape {found:?} does not fit the base's {s:?}"),
                    ))
                }
                Err(_) => {
                    return Err(bad(
                        key,
                        "neither a LoRA pair (`….lora_A.weight` / `….lora_B.weight`) nor a tensor of the base model".into(),
                    ))
                }
            }
        }
    }
    // A bias without its pair would be silently ignored by `linear`.
    for key in store.keys().cloned().collect::<Vec<_>>() {
        for suffix in [A_BIAS, B_BIAS] {
            if let Some(layer) = key.strip_suffix(suffix) {
                if !store.contains(&format!("{layer}{A_WEIGHT}")) {
                    return Err(bad(&key, format!("no `{layer}{A_WEIGHT}` beside it")));
                }
            }
        }
    }
    if summary.layers == 0 {
        return Err(Error::Layout {
            path,
            message: "no LoRA pairs (`….lora_A.weight` with `….lora_B.weight`) in this file".into(),
        });
    }
    Ok(summary)
}
