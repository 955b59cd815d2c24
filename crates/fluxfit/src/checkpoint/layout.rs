//! Finding a model's parts on disk: BFL single files (`flux1-*.safetensors`, `ae.safetensors`)
//! and HF/diffusers snapshots (`model_index.json`, `transformer/`, `vae/`, `text_encoder/`,
//! `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`), sharded or not.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::diffusers;
use super::gguf::{self, GgufFile};
use super::safetensors::SafetensorsFile;
use super::store::{Source, TensorStore};
use crate::error::{Error, Result};

/// Prefixes some single-file distributions put before the canonical names.
const FLOW_PREFIXES: &[&str] = &["model.diffusion_model."];
const AE_PREFIXES: &[&str] = &["first_stage_model.", "vae."];
const CLIP_PREFIXES: &[&str] = &["text_model."];

/// Where each part of a model lives. `None`: not found there (the caller may supply it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelPaths {
    pub flow: Option<PathBuf>,
    pub vae: Option<PathBuf>,
    pub t5: Option<PathBuf>,
    pub clip: Option<PathBuf>,
    pub t5_tokenizer: Option<PathBuf>,
    pub clip_tokenizer: Option<PathBuf>,
    /// BFL flow files found when there is more than one (`flow` is then `None`): which one
    /// is meant cannot be guessed, so `--flow` must say.
    pub flow_choices: Vec<PathBuf>,
}

impl ModelPaths {
    /// Resolves a model folder of either layout (the official FLUX.1 repos hold both).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder"),
            ));
        }
        let sub = |name: &str| Some(dir.join(name)).filter(|p| p.is_dir());
        let mut bfl_flows: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                n.starts_with("flux1-")
                    && (n.ends_with(".safetensors") || n.ends_with(".gguf"))
                    && !n.contains("lora")
            })
            .collect();
        bfl_flows.sort();
        let (bfl_flow, flow_choices) = match bfl_flows.len() {
            0 | 1 => (bfl_flows.pop(), Vec::new()),
            _ => (None, bfl_flows),
        };
        let paths = Self {
            flow_choices,
            flow: bfl_flow.or_else(|| sub("transformer")),
            vae: Some(dir.join("ae.safetensors"))
                .filter(|p| p.is_file())
                .or_else(|| sub("vae")),
            t5: sub("text_encoder_2"),
            clip: sub("text_encoder"),
            t5_tokenizer: sub("tokenizer_2"),
            clip_tokenizer: sub("tokenizer"),
        };
        if paths.flow.is_none() && paths.vae.is_none() && paths.flow_choices.is_empty() {
            return Err(Error::Layout {
                path: dir.to_path_buf(),
                message: "neither a diffusers snapshot (model_index.json, transformer/, vae/, \
                          text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/) nor a BFL folder \
                          (flux1-*.safetensors or flux1-*.gguf, and ae.safetensors)"
                    .into(),
            });
        }
        Ok(paths)
    }
}

/// The safetensors files of a checkpoint given as a file or a folder (a sharded folder is read
/// through its `*.safetensors.index.json`, and every shard it names must be there).
pub fn safetensors_files(path: &Path) -> Result<Vec<Arc<SafetensorsFile>>> {
    if path.is_file() {
        return Ok(vec![SafetensorsFile::open(path)?]);
    }
    if !path.is_dir() {
        if path.exists() {
            Error::check_regular_file(path)?;
        }
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        ));
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    if let Some(index) = entries
        .iter()
        .find(|p| p.to_string_lossy().ends_with(".safetensors.index.json"))
    {
        let text = std::fs::read(index).map_err(|e| Error::io(index, e))?;
        let shards = shard_names(index, &text)?;
        let missing: Vec<&String> = shards.iter().filter(|s| !path.join(s).is_file()).collect();
        if !missing.is_empty() {
            return Err(Error::Layout {
                path: path.to_path_buf(),
                message: format!(
                    "the index {} names shards that are not here: {missing:?} (download incomplete?)",
                    index.display()
                ),
            });
        }
        return shards
            .iter()
            .map(|s| SafetensorsFile::open(path.join(s)))
            .collect();
    }
    let files: Vec<&PathBuf> = entries
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    if files.is_empty() {
        return Err(Error::Layout {
            path: path.to_path_buf(),
            message: "no .safetensors file in this folder".into(),
        });
    }
    files.into_iter().map(SafetensorsFile::open).collect()
}

/// The shard files a `*.safetensors.index.json` names (its `weight_map` values), sorted and
/// deduplicated, each a plain relative name: a file the index names stays in its folder.
pub fn shard_names(index: &Path, text: &[u8]) -> Result<Vec<String>> {
    let json: serde_json::Value = serde_json::from_slice(text).map_err(|e| Error::Layout {
        path: index.to_path_buf(),
        message: format!("not valid JSON: {e}"),
    })?;
    let mut shards: Vec<String> = json["weight_map"]
        .as_object()
        .ok_or_else(|| Error::Layout {
            path: index.to_path_buf(),
            message: "no `weight_map` object".into(),
        })?
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    shards.sort();
    shards.dedup();
    if let Some(bad) = shards.iter().find(|s| !is_plain_relative(s)) {
        return Err(Error::Layout {
            path: index.to_path_buf(),
            message: format!(
                "the index names shard `{bad}`, which leaves the folder (absolute, or with \
                 `..`); shards must be files beside the index"
            ),
        });
    }
    Ok(shards)
}

/// A relative path with no `..`, root or prefix: it cannot name a file outside its folder.
fn is_plain_relative(name: &str) -> bool {
    use std::path::Component;
    !name.is_empty()
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

fn is_diffusers_flow(files: &[Arc<SafetensorsFile>]) -> bool {
    files
        .iter()
        .any(|f| f.tensors().contains_key("x_embedder.weight"))
}

/// A GGUF file's architecture must be one of `allowed` (or unstated).
fn check_arch(file: &GgufFile, allowed: &[&str], what: &str) -> Result<()> {
    match file.architecture() {
        Some(a) if !allowed.contains(&a) => Err(Error::Layout {
            path: file.path().to_path_buf(),
            message: format!(
                "a GGUF of architecture `{a}`, not {what} (general.architecture {})",
                allowed.join(" or ")
            ),
        }),
        _ => Ok(()),
    }
}

/// A FLUX flow model in GGUF (BFL names, as city96's `flux1-*-Q*.gguf`).
fn gguf_flow(path: &Path) -> Result<TensorStore> {
    let file = GgufFile::open(path)?;
    check_arch(&file, &["flux"], "a FLUX flow model")?;
    let store = TensorStore::from_gguf(path, file, |name| {
        let key = FLOW_PREFIXES
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .unwrap_or(name);
        Some(key.to_string())
    })?;
    if !store.contains("img_in.weight") {
        return Err(Error::Layout {
            path: path.to_path_buf(),
            message: "no `img_in.weight`: not a FLUX flow model in BFL names".into(),
        });
    }
    Ok(store)
}

/// The flow transformer's weights under canonical BFL names, whatever the layout (BFL or
/// diffusers safetensors, bf16/f16/f32/fp8 with or without scales, or GGUF).
pub fn open_flow(path: &Path) -> Result<TensorStore> {
    if gguf::is_gguf(path) {
        return gguf_flow(path);
    }
    let path = if path.join("transformer").is_dir() {
        path.join("transformer")
    } else {
        path.to_path_buf()
    };
    let files = safetensors_files(&path)?;
    let mut store = if is_diffusers_flow(&files) {
        diffusers::flow_store(path, files)?
    } else {
        let store = TensorStore::from_files(path.clone(), files, FLOW_PREFIXES);
        if !store.contains("img_in.weight") {
            return Err(Error::Layout {
                path,
                message: "no `img_in.weight` (BFL) or `x_embedder.weight` (diffusers): not a FLUX flow model".into(),
            });
        }
        store
    };
    store.attach_fp8_scales()?;
    Ok(store)
}

/// The autoencoder's weights under canonical LDM names.
pub fn open_vae(path: &Path) -> Result<TensorStore> {
    let path = if path.join("vae").is_dir() {
        path.join("vae")
    } else {
        path.to_path_buf()
    };
    let files = safetensors_files(&path)?;
    let diffusers_names = files.iter().any(|f| {
        f.tensors()
            .keys()
            .any(|k| k.contains("down_blocks") || k.contains("up_blocks"))
    });
    let mut store = if diffusers_names {
        diffusers::vae_store(path, files)?
    } else {
        let store = TensorStore::from_files(path.clone(), files, AE_PREFIXES);
        if !store.contains("decoder.conv_in.weight") {
            return Err(Error::Layout {
                path,
                message: "no `decoder.conv_in.weight`: not a FLUX autoencoder".into(),
            });
        }
        store
    };
    store.attach_fp8_scales()?;
    Ok(store)
}

/// A T5 encoder in GGUF: llama.cpp names (`enc.blk.N.attn_q.weight`, city96's
/// `t5-v1_1-xxl-encoder-Q*.gguf`) mapped to transformers', or transformers names as they are.
fn gguf_t5(path: &Path) -> Result<TensorStore> {
    let file = GgufFile::open(path)?;
    check_arch(&file, &["t5", "t5encoder"], "a T5 encoder")?;
    let names = file.tensors();
    let llama =
        names.contains_key("token_embd.weight") || names.keys().any(|n| n.starts_with("enc.blk."));
    let gated = names.keys().any(|n| n.contains(".ffn_gate."));
    TensorStore::from_gguf(path, file.clone(), |name| {
        if llama {
            gguf::t5_canonical(name, gated)
        } else {
            Some(name.to_string())
        }
    })
}

/// T5 encoder weights (HF transformers names), from safetensors or GGUF.
pub fn open_t5(path: &Path) -> Result<TensorStore> {
    let mut store = if gguf::is_gguf(path) {
        gguf_t5(path)?
    } else {
        let mut store = TensorStore::from_files(path, safetensors_files(path)?, &[]);
        store.attach_fp8_scales()?;
        store
    };
    // Some exports store the embedding twice (tied); keep one, or it is materialised twice.
    if store.contains("shared.weight") {
        store.remove("encoder.embed_tokens.weight");
    }
    if !store.contains("shared.weight") && !store.contains("encoder.embed_tokens.weight") {
        return Err(Error::Layout {
            path: path.to_path_buf(),
            message: "no `shared.weight` or `encoder.embed_tokens.weight`: not a T5 encoder".into(),
        });
    }
    Ok(store)
}

/// CLIP text weights, `text_model.` prefix removed.
pub fn open_clip(path: &Path) -> Result<TensorStore> {
    let mut store = TensorStore::from_files(path, safetensors_files(path)?, CLIP_PREFIXES);
    store.attach_fp8_scales()?;
    if !store.contains("embeddings.token_embedding.weight") {
        return Err(Error::Layout {
            path: path.to_path_buf(),
            message: "no `text_model.embeddings.token_embedding.weight`: not a CLIP text model"
                .into(),
        });
    }
    Ok(store)
}

/// A folder's `config.json`, if any.
pub fn config_json(path: &Path) -> Option<PathBuf> {
    let p = if path.is_dir() {
        path.join("config.json")
    } else {
        path.with_file_name("config.json")
    };
    p.is_file().then_some(p)
}

/// Where Redux's two parts are: the projector file and the SigLIP vision tower (a folder with
/// its `config.json`, or a file), as resolved from what the user named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReduxPaths {
    pub projector: PathBuf,
    pub siglip: PathBuf,
}

impl ReduxPaths {
    /// `redux` is FLUX.1-Redux-dev's folder (`flux1-redux-dev.safetensors` or
    /// `image_embedder/`, and `image_encoder/`) or the projector file, with the tower in an
    /// `image_encoder/` folder beside it unless `siglip` names it (a SiglipVisionModel folder
    /// such as `image_encoder/`, or google/siglip-so400m-patch14-384's whole-model folder).
    pub fn resolve(redux: &Path, siglip: Option<&Path>) -> Result<Self> {
        let projector = if redux.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(redux)
                .map_err(|e| Error::io(redux, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            files.sort();
            let bfl = files.into_iter().find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.contains("redux") && n.ends_with(".safetensors"))
            });
            match bfl {
                Some(p) => p,
                None if redux.join("image_embedder").is_dir() => redux.join("image_embedder"),
                None => {
                    return Err(Error::Layout {
                        path: redux.to_path_buf(),
                        message: "no Redux projector here: expected flux1-redux-dev.safetensors \
                                  or an image_embedder/ folder"
                            .into(),
                    })
                }
            }
        } else {
            redux.to_path_buf()
        };
        let siglip = match siglip {
            Some(s) => s.to_path_buf(),
            None => {
                let folder = if redux.is_dir() {
                    Some(redux.to_path_buf())
                } else {
                    redux.parent().map(Path::to_path_buf)
                };
                match folder
                    .map(|f| f.join("image_encoder"))
                    .filter(|d| d.is_dir())
                {
                    Some(d) => d,
                    None => {
                        return Err(Error::Layout {
                            path: redux.to_path_buf(),
                            message: "no SigLIP vision tower found: put FLUX.1-Redux-dev's \
                                      image_encoder/ folder beside the Redux file, or name it \
                                      with --siglip DIR (google/siglip-so400m-patch14-384 \
                                      works too)"
                                .into(),
                        })
                    }
                }
            }
        };
        Ok(Self { projector, siglip })
    }
}

/// Redux's weights in one store under canonical keys: the SigLIP vision tower without
/// `vision_model.` (its pooling head and any text tower are left out: Redux uses neither), and
/// the projector's `redux_up.*`, `redux_down.*`. Also returns the tower's `config.json`.
pub fn open_redux(paths: &ReduxPaths) -> Result<(TensorStore, Option<PathBuf>)> {
    let mut store = TensorStore::new(&paths.projector);
    for file in safetensors_files(&paths.siglip)? {
        let idx = store.add_file(file.clone());
        for name in file.tensors().keys() {
            let key = name.strip_prefix("vision_model.").unwrap_or(name);
            let tower = ["embeddings.", "encoder.layers.", "post_layernorm."]
                .iter()
                .any(|p| key.starts_with(p));
            if tower && !key.ends_with("position_ids") {
                let source = Source::File {
                    file: idx,
                    name: name.clone(),
                };
                store.insert(key.to_string(), source)?;
            }
        }
    }
    if !store.contains("embeddings.patch_embedding.weight") {
        return Err(Error::Layout {
            path: paths.siglip.clone(),
            message: "no `vision_model.embeddings.patch_embedding.weight`: not a SigLIP vision \
                      tower"
                .into(),
        });
    }
    let mut found = false;
    for file in safetensors_files(&paths.projector)? {
        let idx = store.add_file(file.clone());
        for name in file.tensors().keys() {
            if name.starts_with("redux_up.") || name.starts_with("redux_down.") {
                found = true;
                let source = Source::File {
                    file: idx,
                    name: name.clone(),
                };
                store.insert(name.clone(), source)?;
            }
        }
    }
    if !found {
        return Err(Error::Layout {
            path: paths.projector.clone(),
            message: "no `redux_up.weight`: not a FLUX.1 Redux projector".into(),
        });
    }
    store.attach_fp8_scales()?;
    Ok((store, config_json(&paths.siglip)))
}
