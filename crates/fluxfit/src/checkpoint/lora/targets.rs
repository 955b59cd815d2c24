//! Which canonical layer a LoRA module adapts, in which component, and which of its output rows.
//!
//! Every layout is mapped through the names the stores already hold (BFL for the flow model,
//! transformers' for CLIP and T5) and the one diffusers table `checkpoint::diffusers` reads
//! diffusers checkpoints with, so a name is never spelled out twice.

use std::collections::HashMap;

use super::keys::Layout;
use crate::checkpoint::diffusers::{self, Rows};
use crate::checkpoint::store::TensorStore;
use crate::component::Component;

/// A layer a module adapts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub component: Component,
    /// The canonical layer (its weight is `{layer}.weight`).
    pub layer: String,
    pub rows: Span,
}

/// Which output rows of the canonical weight a module's update covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    All,
    /// `len` rows from `offset` (`to_k` of a fused `qkv`).
    Rows {
        offset: usize,
        len: usize,
    },
    /// All, the two halves exchanged (diffusers' `norm_out.linear`).
    SwappedHalves,
}

/// The stores a LoRA can adapt, with the lookups kohya's underscored names need.
pub struct Base<'a> {
    pub flow: &'a TensorStore,
    pub clip: Option<&'a TensorStore>,
    pub t5: Option<&'a TensorStore>,
    /// kohya name (without `lora_`) → canonical layer and the diffusers rows it covers.
    kohya: HashMap<String, (Component, String, Rows)>,
    /// The flow model's hidden size: the width of q, k and v in a fused weight.
    hidden: usize,
}

/// The layers of a store: its 2-D `….weight` keys without the suffix (LoRA factors excluded).
fn linear_layers(store: &TensorStore) -> impl Iterator<Item = String> + '_ {
    store.keys().filter_map(|k| {
        let layer = k.strip_suffix(".weight")?;
        (!k.contains(".lora_") && store.shape(k).is_ok_and(|s| s.len() == 2))
            .then(|| layer.to_string())
    })
}

fn underscored(name: &str) -> String {
    name.replace('.', "_")
}

impl<'a> Base<'a> {
    pub fn new(
        flow: &'a TensorStore,
        clip: Option<&'a TensorStore>,
        t5: Option<&'a TensorStore>,
    ) -> Self {
        let mut kohya = HashMap::new();
        for layer in linear_layers(flow) {
            kohya.insert(
                format!("unet_{}", underscored(&layer)),
                (Component::Flow, layer, Rows::All),
            );
        }
        let count = |prefix: &str| {
            (0..)
                .take_while(|i| flow.contains(&format!("{prefix}.{i}.linear1.weight")))
                .count()
        };
        let double = (0..)
            .take_while(|i| flow.contains(&format!("double_blocks.{i}.img_attn.qkv.weight")))
            .count();
        for name in diffusers::flow_layers(double, count("single_blocks")) {
            if let Some((layer, rows)) = diffusers::flow_layer(&name) {
                kohya.insert(
                    format!("unet_{}", underscored(&name)),
                    (Component::Flow, layer, rows),
                );
            }
        }
        for (store, tags, component) in [
            (clip, ["te_", "te1_"].as_slice(), Component::Clip),
            (t5, ["te2_", "te3_"].as_slice(), Component::T5),
        ] {
            for layer in store.into_iter().flat_map(linear_layers) {
                for tag in tags {
                    kohya.insert(
                        format!("{tag}{}", underscored(&layer)),
                        (component, layer.clone(), Rows::All),
                    );
                }
            }
        }
        Self {
            flow,
            clip,
            t5,
            kohya,
            hidden: flow.shape("img_in.weight").map_or(0, |s| s[0]),
        }
    }

    pub fn store(&self, component: Component) -> Option<&'a TensorStore> {
        match component {
            Component::Flow => Some(self.flow),
            Component::Clip => self.clip,
            Component::T5 => self.t5,
            Component::Vae => None,
        }
    }

    /// The layer `module` (a name with its wrapper prefix removed) adapts in `layout`.
    pub fn target(&self, layout: Layout, module: &str) -> Option<Target> {
        let (component, layer, rows) = match layout {
            Layout::Bfl => (Component::Flow, module.to_string(), Rows::All),
            Layout::Diffusers => match module.strip_prefix("text_encoder.") {
                Some(clip) => (Component::Clip, clip.to_string(), Rows::All),
                None => {
                    let (layer, rows) = diffusers::flow_layer(module)?;
                    (Component::Flow, layer, rows)
                }
            },
            Layout::Kohya => self.kohya.get(module.strip_prefix("lora_")?)?.clone(),
            Layout::XLabs => {
                let (layer, rows) = xlabs(module, self.hidden)?;
                let out = self.out_rows(Component::Flow, &layer)?;
                if let Span::Rows { offset, len } = rows {
                    (offset + len <= out).then_some(())?;
                }
                return Some(Target {
                    component: Component::Flow,
                    layer,
                    rows,
                });
            }
        };
        let out = self.out_rows(component, &layer)?;
        let rows = match rows {
            Rows::All => Span::All,
            Rows::SwappedHalves => Span::SwappedHalves,
            // q, k and v are `hidden` rows each; a single block's MLP takes the rest.
            Rows::Part { index, of } => {
                let width = if of == 3 { out / 3 } else { self.hidden };
                let offset = index * width;
                let len = if index + 1 == of {
                    out.checked_sub(offset)?
                } else {
                    width
                };
                // A base too narrow for its own parts matches nothing (its config check says why).
                (len > 0 && offset + len <= out).then_some(Span::Rows { offset, len })?
            }
        };
        Some(Target {
            component,
            layer,
            rows,
        })
    }

    /// The output rows of a component's layer, if it has one by that name.
    fn out_rows(&self, component: Component, layer: &str) -> Option<usize> {
        let shape = self
            .store(component)?
            .shape(&format!("{layer}.weight"))
            .ok()?;
        (shape.len() == 2).then(|| shape[0])
    }
}

/// XLabs' processors: `qkv_lora1`/`proj_lora1` adapt the image stream's attention, `…2` the
/// text stream's; in a single block `qkv_lora` adapts the q, k, v rows of `linear1` (not the
/// MLP's) and `proj_lora` `linear2`, as diffusers reads them.
fn xlabs(module: &str, hidden: usize) -> Option<(String, Span)> {
    let (block, proc) = module.split_once(".processor.")?;
    if block.starts_with("double_blocks.") {
        let inner = match proc {
            "qkv_lora1" => "img_attn.qkv",
            "proj_lora1" => "img_attn.proj",
            "qkv_lora2" => "txt_attn.qkv",
            "proj_lora2" => "txt_attn.proj",
            _ => return None,
        };
        Some((format!("{block}.{inner}"), Span::All))
    } else if block.starts_with("single_blocks.") {
        match proc {
            "qkv_lora" => Some((
                format!("{block}.linear1"),
                Span::Rows {
                    offset: 0,
                    len: 3 * hidden,
                },
            )),
            "proj_lora" => Some((format!("{block}.linear2"), Span::All)),
            _ => None,
        }
    } else {
        None
    }
}
