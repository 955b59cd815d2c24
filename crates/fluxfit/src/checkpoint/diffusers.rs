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

/// 1:1 renames of flow tensors (without the `.weight`/`.bias` suffix).
fn flow_rename(name: &str) -> Option<String> {
    const TOP: &[(&str, &str)] = &[
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
    const DOUBLE: &[(&str, &str)] = &[
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
    const SINGLE: &[(&str, &str)] = &[
        ("norm.linear", "modulation.lin"),
        ("attn.norm_q", "norm.query_norm"),
        ("attn.norm_k", "norm.key_norm"),
        ("proj_out", "linear2"),
    ];
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
    let block = |prefix: &str, table: &[(&str, &str)], out: &str| -> Option<String> {
        let rest = stem.strip_prefix(prefix)?;
        let (idx, inner) = rest.split_once('.')?;
        let (_, to) = table.iter().find(|(from, _)| *from == inner)?;
        Some(format!("{out}.{idx}.{to}.{suffix}"))
    };
    if let Some(k) = block("transformer_blocks.", DOUBLE, "double_blocks") {
        return Some(k);
    }
    if let Some(k) = block("single_transformer_blocks.", SINGLE, "single_blocks") {
        return Some(k);
    }
    TOP.iter()
        .find(|(from, _)| *from == stem)
        .map(|(_, to)| format!("{to}.{suffix}"))
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
    for i in 0..count("transformer_blocks") {
        let p = format!("transformer_blocks.{i}.attn");
        for s in ["weight", "bias"] {
            let img = ["to_q", "to_k", "to_v"]
                .map(|n| format!("{p}.{n}.{s}"))
                .to_vec();
            concat(
                &mut store,
                format!("double_blocks.{i}.img_attn.qkv.{s}"),
                img,
            )?;
            let txt = ["add_q_proj", "add_k_proj", "add_v_proj"]
                .map(|n| format!("{p}.{n}.{s}"))
                .to_vec();
            concat(
                &mut store,
                format!("double_blocks.{i}.txt_attn.qkv.{s}"),
                txt,
            )?;
        }
    }
    for i in 0..count("single_transformer_blocks") {
        let p = format!("single_transformer_blocks.{i}");
        for s in ["weight", "bias"] {
            let parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
                .map(|n| format!("{p}.{n}.{s}"))
                .to_vec();
            concat(&mut store, format!("single_blocks.{i}.linear1.{s}"), parts)?;
        }
    }
    for s in ["weight", "bias"] {
        if let Some(src) = store.stored(&format!("norm_out.linear.{s}")) {
            store.insert(
                format!("final_layer.adaLN_modulation.1.{s}"),
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
