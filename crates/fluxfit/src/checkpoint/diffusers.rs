//! diffusers names → canonical (BFL / LDM) names, as recipes over the stored tensors.
//!
//! diffusers splits the fused qkv projections, stores the VAE attention as Linear layers and
//! orders the final modulation (scale, shift) where BFL has (shift, scale). All of that is
//! expressed as [`Source`] recipes, so nothing is converted until a stage is materialised.

use std::path::PathBuf;
use std::sync::Arc;

use super::safetensors::SafetensorsFile;
use super::store::{Source, TensorStore};
use crate::error::{Error, Result};

/// diffusers → BFL layer names that are 1:1, outside the blocks.
const FLOW_TOP: &[(&str, &str)] = &[
    ("x_embedder", "img_in"),
    ("context_embedder", "txt_in"),
    (
        "time_text_embed.timestep_embedder.linear_1",
        "time_in.in_layer",
    ),
    (
        "time_text_embed.timestep_embedder.linear_2",
        "time_in.out_layer",
    ),
    (
        "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.in_layer",
    ),
    (
        "time_text_embed.guidance_embedder.linear_2",
        "guidance_in.out_layer",
    ),
    (
        "time_text_embed.text_embedder.linear_1",
        "vector_in.in_layer",
    ),
    (
        "time_text_embed.text_embedder.linear_2",
        "vector_in.out_layer",
    ),
    ("proj_out", "final_layer.linear"),
];

/// The same inside `transformer_blocks.N` (BFL `double_blocks.N`).
const FLOW_DOUBLE: &[(&str, &str)] = &[
    ("norm1.linear", "img_mod.lin"),
    ("norm1_context.linear", "txt_mod.lin"),
    ("attn.norm_q", "img_attn.norm.query_norm"),
    ("attn.norm_k", "img_attn.norm.key_norm"),
    ("attn.norm_added_q", "txt_attn.norm.query_norm"),
    ("attn.norm_added_k", "txt_attn.norm.key_norm"),
    ("attn.to_out.0", "img_attn.proj"),
    ("attn.to_add_out", "txt_attn.proj"),
    ("ff.net.0.proj", "img_mlp.0"),
    ("ff.net.2", "img_mlp.2"),
    ("ff_context.net.0.proj", "txt_mlp.0"),
    ("ff_context.net.2", "txt_mlp.2"),
];

/// The same inside `single_transformer_blocks.N` (BFL `single_blocks.N`).
const FLOW_SINGLE: &[(&str, &str)] = &[
    ("norm.linear", "modulation.lin"),
    ("attn.norm_q", "norm.query_norm"),
    ("attn.norm_k", "norm.key_norm"),
    ("proj_out", "linear2"),
];

/// diffusers layers joined, in this order along the output rows, into one BFL weight.
const FUSED: &[(&str, &[&str], &str)] = &[
    (
        "transformer_blocks",
        &["attn.to_q", "attn.to_k", "attn.to_v"],
        "img_attn.qkv",
    ),
    (
        "transformer_blocks",
        &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
        "txt_attn.qkv",
    ),
    (
        "single_transformer_blocks",
        &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
        "linear1",
    ),
];

/// diffusers' `norm_out.linear` is BFL's final modulation with its halves exchanged.
const FINAL_MODULATION: (&str, &str) = ("norm_out.linear", "final_layer.adaLN_modulation.1");

/// Where a diffusers flow layer's output rows sit in the BFL weight it maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// All of them, in the same order.
    All,
    /// Part `index` of `of` joined along the rows (`to_k` is part 1 of 3 of `qkv`; in a single
    /// block, `proj_mlp` is part 3 of 4 of `linear1` and the widest).
    Part { index: usize, of: usize },
    /// All of them, the two halves exchanged (`norm_out.linear`).
    SwappedHalves,
}

/// The BFL layer (no `.weight`/`.bias`) a diffusers flow layer maps to, and how its rows sit
/// there. The one table diffusers checkpoints and diffusers-named LoRAs are both read by.
pub fn flow_layer(layer: &str) -> Option<(String, Rows)> {
    if layer == FINAL_MODULATION.0 {
        return Some((FINAL_MODULATION.1.to_string(), Rows::SwappedHalves));
    }
    let in_block = |prefix: &str| -> Option<(&str, &str)> {
        layer
            .strip_prefix(prefix)?
            .strip_prefix('.')?
            .split_once('.')
    };
    for (prefix, table, out) in [
        ("transformer_blocks", FLOW_DOUBLE, "double_blocks"),
        ("single_transformer_blocks", FLOW_SINGLE, "single_blocks"),
    ] {
        let Some((idx, inner)) = in_block(prefix) else {
            continue;
        };
        idx.parse::<usize>().ok()?;
        if let Some((_, to)) = table.iter().find(|(from, _)| *from == inner) {
            return Some((format!("{out}.{idx}.{to}"), Rows::All));
        }
        for (p, parts, to) in FUSED {
            if *p == prefix {
                if let Some(index) = parts.iter().position(|n| *n == inner) {
                    return Some((
                        format!("{out}.{idx}.{to}"),
                        Rows::Part {
                            index,
                            of: parts.len(),
                        },
                    ));
                }
            }
        }
        return None;
    }
    FLOW_TOP
        .iter()
        .find(|(from, _)| *from == layer)
        .map(|(_, to)| (to.to_string(), Rows::All))
}

/// Every diffusers flow layer name of a model with `double` and `single` blocks (norm scales
/// included), for lookups by another spelling of the same names (kohya's underscores).
pub fn flow_layers(double: usize, single: usize) -> Vec<String> {
    let mut out: Vec<String> = FLOW_TOP.iter().map(|(d, _)| d.to_string()).collect();
    out.push(FINAL_MODULATION.0.to_string());
    for (prefix, table, n) in [
        ("transformer_blocks", FLOW_DOUBLE, double),
        ("single_transformer_blocks", FLOW_SINGLE, single),
    ] {
        for i in 0..n {
            let fused = FUSED
                .iter()
                .filter(|(p, _, _)| *p == prefix)
                .flat_map(|(_, parts, _)| parts.iter());
            for inner in table.iter().map(|(d, _)| d).chain(fused) {
                out.push(format!("{prefix}.{i}.{inner}"));
            }
        }
    }
    out
}

/// 1:1 renames of flow tensors (with their `.weight`/`.bias` suffix).
fn flow_rename(name: &str) -> Option<String> {
    let (stem, suffix) = name.rsplit_once('.')?;
    let suffix = if stem.ends_with("norm_q")
        || stem.ends_with("norm_k")
        || stem.ends_with("norm_added_q")
        || stem.ends_with("norm_added_k")
    {
        "scale"
    } else {
        suffix
    };
    match flow_layer(stem)? {
        (to, Rows::All) => Some(format!("{to}.{suffix}")),
        _ => None,
    }
}

/// A flow store with canonical BFL keys over a diffusers `transformer/` checkpoint.
pub fn flow_store(origin: PathBuf, files: Vec<Arc<SafetensorsFile>>) -> Result<TensorStore> {
    let mut store = TensorStore::new(origin);
    for f in &files {
        store.add_file(f.clone());
    }
    let names: Vec<String> = files
        .iter()
        .flat_map(|f| f.tensors().keys().cloned())
        .collect();
    for name in &names {
        if let Some(key) = flow_rename(name) {
            let src = store.stored(name).expect("listed name");
            store.insert(key, src)?;
        }
    }
    let concat = |store: &mut TensorStore, key: String, parts: Vec<String>| -> Result<()> {
        let srcs: Vec<Option<Source>> = parts.iter().map(|p| store.stored(p)).collect();
        if srcs.iter().all(Option::is_none) {
            return Ok(());
        }
        // Some parts but not all: name the stored tensor that is missing, not only `key`.
        if let Some(i) = srcs.iter().position(Option::is_none) {
            return Err(Error::MissingKey {
                path: store.origin().to_path_buf(),
                key: parts[i].clone(),
                hint: format!(" (one of the {} tensors joined into `{key}`)", parts.len()),
            });
        }
        let parts = srcs.into_iter().flatten().collect();
        store.insert(key, Source::Concat { parts, dim: 0 })?;
        Ok(())
    };
    let count = |prefix: &str| {
        (0..)
            .take_while(|i| {
                names
                    .iter()
                    .any(|n| n.starts_with(&format!("{prefix}.{i}.")))
            })
            .count()
    };
    for (prefix, parts, to) in FUSED {
        let out = if *prefix == "transformer_blocks" {
            "double_blocks"
        } else {
            "single_blocks"
        };
        for i in 0..count(prefix) {
            for s in ["weight", "bias"] {
                let names = parts
                    .iter()
                    .map(|n| format!("{prefix}.{i}.{n}.{s}"))
                    .collect();
                concat(&mut store, format!("{out}.{i}.{to}.{s}"), names)?;
            }
        }
    }
    for s in ["weight", "bias"] {
        if let Some(src) = store.stored(&format!("{}.{s}", FINAL_MODULATION.0)) {
            store.insert(
                format!("{}.{s}", FINAL_MODULATION.1),
                Source::SwapHalves {
                    inner: Box::new(src),
                    dim: 0,
                },
            )?;
        }
    }
    if !store.contains("img_in.weight") {
        return Err(Error::Layout {
            path: store.origin().to_path_buf(),
            message: "no `x_embedder.weight`: not a diffusers FLUX transformer".into(),
        });
    }
    Ok(store)
}

/// 1:1 renames inside an encoder/decoder resnet or mid block.
fn vae_inner(part: &str) -> Option<String> {
    const RESNET: &[(&str, &str)] = &[
        ("norm1", "norm1"),
        ("conv1", "conv1"),
        ("norm2", "norm2"),
        ("conv2", "conv2"),
        ("conv_shortcut", "nin_shortcut"),
    ];
    let (layer, suffix) = part.split_once('.')?;
    RESNET
        .iter()
        .find(|(from, _)| *from == layer)
        .map(|(_, to)| format!("{to}.{suffix}"))
}

/// Canonical LDM name of a diffusers VAE tensor; `levels` is the number of resolutions.
fn vae_rename(name: &str, levels: usize) -> Option<(String, bool)> {
    let (side, rest) = name.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let plain = |k: String| Some((format!("{side}.{k}"), false));
    match rest.split_once('.')? {
        ("conv_in", s) => plain(format!("conv_in.{s}")),
        ("conv_out", s) => plain(format!("conv_out.{s}")),
        ("conv_norm_out", s) => plain(format!("norm_out.{s}")),
        ("down_blocks", r) | ("up_blocks", r) => {
            let (idx, r) = r.split_once('.')?;
            let idx: usize = idx.parse().ok()?;
            let (level, group, sampler) = if side == "encoder" {
                (idx, "down", "downsample")
            } else {
                (levels.checked_sub(idx + 1)?, "up", "upsample")
            };
            if let Some(r) = r.strip_prefix("resnets.") {
                let (j, inner) = r.split_once('.')?;
                plain(format!("{group}.{level}.block.{j}.{}", vae_inner(inner)?))
            } else {
                let s = r.strip_prefix(&format!("{sampler}rs.0.conv."))?;
                plain(format!("{group}.{level}.{sampler}.conv.{s}"))
            }
        }
        ("mid_block", r) => {
            if let Some(r) = r.strip_prefix("resnets.") {
                let (j, inner) = r.split_once('.')?;
                let block = if j == "0" { "block_1" } else { "block_2" };
                plain(format!("mid.{block}.{}", vae_inner(inner)?))
            } else {
                let r = r.strip_prefix("attentions.0.")?;
                let (layer, s) = r.rsplit_once('.')?;
                let to = match layer {
                    "group_norm" => return plain(format!("mid.attn_1.norm.{s}")),
                    "to_q" | "query" => "q",
                    "to_k" | "key" => "k",
                    "to_v" | "value" => "v",
                    "to_out.0" | "proj_attn" => "proj_out",
                    _ => return None,
                };
                Some((format!("{side}.mid.attn_1.{to}.{s}"), true))
            }
        }
        _ => None,
    }
}

/// A VAE store with canonical LDM keys over a diffusers `vae/` checkpoint.
pub fn vae_store(origin: PathBuf, files: Vec<Arc<SafetensorsFile>>) -> Result<TensorStore> {
    let mut store = TensorStore::new(origin);
    for f in &files {
        store.add_file(f.clone());
    }
    let names: Vec<String> = files
        .iter()
        .flat_map(|f| f.tensors().keys().cloned())
        .collect();
    let levels = (0..)
        .take_while(|i| {
            names
                .iter()
                .any(|n| n.starts_with(&format!("encoder.down_blocks.{i}.")))
        })
        .count();
    for name in &names {
        let Some((key, linear_as_conv)) = vae_rename(name, levels) else {
            continue;
        };
        let mut src = store.stored(name).expect("listed name");
        let info = store.files()[match &src {
            Source::File { file, .. } => *file,
            _ => unreachable!("stored() returns files"),
        }]
        .tensors()[name]
            .clone();
        if linear_as_conv && info.shape.len() == 2 {
            src = Source::Reshape {
                inner: Box::new(src),
                shape: vec![info.shape[0], info.shape[1], 1, 1],
            };
        }
        store.insert(key, src)?;
    }
    if !store.contains("encoder.conv_in.weight") && !store.contains("decoder.conv_in.weight") {
        return Err(Error::Layout {
            path: store.origin().to_path_buf(),
            message: "no `encoder.conv_in.weight` or `decoder.conv_in.weight`: not an autoencoder"
                .into(),
        });
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_names() {
        assert_eq!(flow_rename("x_embedder.weight").unwrap(), "img_in.weight");
        assert_eq!(
            flow_rename("transformer_blocks.3.attn.norm_added_k.weight").unwrap(),
            "double_blocks.3.txt_attn.norm.key_norm.scale"
        );
        assert_eq!(
            flow_rename("single_transformer_blocks.10.proj_out.bias").unwrap(),
            "single_blocks.10.linear2.bias"
        );
        assert_eq!(
            flow_rename("proj_out.weight").unwrap(),
            "final_layer.linear.weight"
        );
        assert!(flow_rename("transformer_blocks.0.attn.to_q.weight").is_none());
    }

    #[test]
    fn vae_names() {
        let r = |n| vae_rename(n, 4).map(|(k, _)| k);
        assert_eq!(
            r("decoder.up_blocks.0.resnets.2.conv1.weight").unwrap(),
            "decoder.up.3.block.2.conv1.weight"
        );
        assert_eq!(
            r("decoder.up_blocks.2.upsamplers.0.conv.bias").unwrap(),
            "decoder.up.1.upsample.conv.bias"
        );
        assert_eq!(
            r("encoder.down_blocks.1.resnets.0.conv_shortcut.weight").unwrap(),
            "encoder.down.1.block.0.nin_shortcut.weight"
        );
        assert_eq!(
            r("encoder.mid_block.attentions.0.to_out.0.weight").unwrap(),
            "encoder.mid.attn_1.proj_out.weight"
        );
        assert_eq!(
            r("encoder.conv_norm_out.bias").unwrap(),
            "encoder.norm_out.bias"
        );
    }
}
