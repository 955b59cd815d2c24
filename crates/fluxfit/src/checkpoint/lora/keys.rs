//! A LoRA file's keys grouped into modules (one adapted layer each, with its factors), the
//! naming layout they follow, and the files that are not FLUX LoRAs at all.

use std::collections::BTreeMap;
use std::fmt;

/// The naming scheme of a LoRA file's module names, each with its own scaling rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// BFL names (`double_blocks.0.img_attn.qkv`), maybe under `diffusion_model.`: BFL's
    /// control LoRAs, ai-toolkit's and ComfyUI's files. `lora_A`/`lora_B` or
    /// `lora_down`/`lora_up`, with an optional `alpha`.
    Bfl,
    /// diffusers names (`transformer.transformer_blocks.0.attn.to_q`) as PEFT and
    /// `save_lora_weights` write them; alpha from `alpha` tensors or the adapter metadata.
    Diffusers,
    /// kohya sd-scripts: `lora_unet_` + BFL or diffusers names with `_` for `.`, `lora_te1_`
    /// for CLIP, `lora_te3_` (older files: `lora_te2_`) for T5; `lora_down`/`lora_up` scaled by
    /// `alpha / rank`.
    Kohya,
    /// XLabs' attention processors (`double_blocks.0.processor.qkv_lora1.down.weight`),
    /// unscaled.
    XLabs,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Bfl => "BFL / ai-toolkit / ComfyUI",
            Self::Diffusers => "diffusers / PEFT",
            Self::Kohya => "kohya sd-scripts",
            Self::XLabs => "XLabs",
        })
    }
}

/// One adapted layer as the file names it, with the names of its tensors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Module {
    /// The module name with the file's wrapper prefix removed (`transformer.`,
    /// `diffusion_model.`, `base_model.model.`).
    pub name: String,
    pub down: Option<String>,
    pub up: Option<String>,
    pub down_bias: Option<String>,
    pub up_bias: Option<String>,
    pub alpha: Option<String>,
}

/// A file's keys sorted out.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub layout: Layout,
    pub modules: Vec<Module>,
    /// Tensors that are not LoRA factors (a control LoRA's QK-norm scales), by their name with
    /// the wrapper prefix removed, and the stored name.
    pub others: Vec<(String, String)>,
}

/// The tensor of a module each suffix names (longest first where one ends another).
const ROLES: &[(&str, Role)] = &[
    (".lora_A.weight", Role::Down),
    (".lora_B.weight", Role::Up),
    (".lora_A.bias", Role::DownBias),
    (".lora_B.bias", Role::UpBias),
    (".lora_down.weight", Role::Down),
    (".lora_up.weight", Role::Up),
    (".alpha", Role::Alpha),
];

/// XLabs' processors name their factors `down`/`up`.
const XLABS_ROLES: &[(&str, Role)] = &[(".down.weight", Role::Down), (".up.weight", Role::Up)];

#[derive(Debug, Clone, Copy)]
enum Role {
    Down,
    Up,
    DownBias,
    UpBias,
    Alpha,
}

/// Prefixes trainers wrap module names in.
const WRAPPERS: &[&str] = &[
    "model.diffusion_model.",
    "diffusion_model.",
    "base_model.model.",
    "transformer.",
];

/// Markers of adapters other than a plain low-rank pair, which need their own math.
const OTHER_ADAPTERS: &[(&str, &str)] = &[
    ("hada_w1_a", "LyCORIS LoHa"),
    ("lokr_w1", "LyCORIS LoKr"),
    ("lokr_w2", "LyCORIS LoKr"),
    ("oft_blocks", "LyCORIS OFT"),
    ("oft_diag", "LyCORIS OFT"),
    ("dora_scale", "DoRA"),
    ("lora_mid", "LyCORIS LoCon with a mid factor (Tucker)"),
    (".diff_b", "a ComfyUI weight difference"),
    (".diff", "a ComfyUI weight difference"),
];

/// Why a file is not a FLUX.1 LoRA fluxfit reads: another architecture or another adapter.
pub fn refusal(names: &[String]) -> Option<String> {
    let any = |pats: &[&str]| names.iter().find(|n| pats.iter().any(|p| n.contains(p)));
    let unet = any(&[
        "lora_unet_down_blocks",
        "lora_unet_up_blocks",
        "lora_unet_mid_block",
        "lora_unet_input_blocks",
        "lora_unet_output_blocks",
        "lora_unet_middle_block",
        "down_blocks.",
        "up_blocks.",
        "mid_block.",
        "input_blocks.",
        "output_blocks.",
        "middle_block.",
    ]);
    if let Some(key) = unet {
        let xl = any(&["lora_te2_", "text_encoder_2.", "add_embedding", "label_emb"]).is_some();
        let which = if xl {
            "SDXL"
        } else {
            "Stable Diffusion 1.x/2.x (or SDXL without its second text encoder)"
        };
        return Some(format!(
            "this is a LoRA for {which}, a UNet model (key `{key}`), not for FLUX.1; use a LoRA trained on FLUX.1"
        ));
    }
    if let Some(key) = any(&["joint_blocks", "context_block.", "x_block."]) {
        return Some(format!(
            "this is a LoRA for Stable Diffusion 3 (MMDiT key `{key}`), not for FLUX.1; use a LoRA trained on FLUX.1"
        ));
    }
    for (marker, what) in OTHER_ADAPTERS {
        if let Some(key) = names.iter().find(|n| {
            if *marker == ".diff" {
                n.ends_with(".diff")
            } else {
                n.contains(marker)
            }
        }) {
            return Some(format!(
                "`{key}` is {what}, which fluxfit does not apply: it reads plain LoRA pairs \
                 (`lora_A`/`lora_B`, `lora_down`/`lora_up`); extract a plain LoRA from it, or merge it into the model"
            ));
        }
    }
    None
}

/// The module name without its wrapper prefix.
fn unwrap_name(name: &str) -> &str {
    WRAPPERS
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .unwrap_or(name)
}

/// The layout a file's (unwrapped) module names follow.
fn layout(modules: &[&str]) -> Layout {
    const DIFFUSERS_ROOTS: &[&str] = &[
        "transformer_blocks.",
        "single_transformer_blocks.",
        "x_embedder",
        "context_embedder",
        "time_text_embed.",
        "norm_out.",
        "proj_out",
        "text_encoder.",
    ];
    if modules
        .iter()
        .any(|m| m.starts_with("lora_unet_") || m.starts_with("lora_te"))
    {
        Layout::Kohya
    } else if modules.iter().any(|m| m.contains(".processor.")) {
        Layout::XLabs
    } else if modules
        .iter()
        .any(|m| DIFFUSERS_ROOTS.iter().any(|r| m.starts_with(r)))
    {
        Layout::Diffusers
    } else {
        Layout::Bfl
    }
}

/// Groups `names` into modules by their suffixes.
pub fn parse(names: &[String]) -> Parsed {
    let xlabs = names.iter().any(|n| n.contains(".processor."));
    let mut modules: BTreeMap<String, Module> = BTreeMap::new();
    let mut others = Vec::new();
    for name in names {
        let roles = ROLES.iter().chain(if xlabs { XLABS_ROLES } else { &[] });
        let found = roles
            .clone()
            .find_map(|(suffix, role)| name.strip_suffix(suffix).map(|module| (module, *role)));
        let Some((module, role)) = found else {
            others.push((unwrap_name(name).to_string(), name.clone()));
            continue;
        };
        let short = unwrap_name(module).to_string();
        let m = modules.entry(short.clone()).or_insert_with(|| Module {
            name: short,
            ..Module::default()
        });
        let slot = match role {
            Role::Down => &mut m.down,
            Role::Up => &mut m.up,
            Role::DownBias => &mut m.down_bias,
            Role::UpBias => &mut m.up_bias,
            Role::Alpha => &mut m.alpha,
        };
        *slot = Some(name.clone());
    }
    let layout = layout(&modules.keys().map(String::as_str).collect::<Vec<_>>());
    Parsed {
        layout,
        modules: modules.into_values().collect(),
        others,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn layouts_are_told_by_their_names() {
        let cases = [
            (
                "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                Layout::Kohya,
            ),
            (
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
                Layout::Kohya,
            ),
            (
                "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                Layout::Diffusers,
            ),
            (
                "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
                Layout::Bfl,
            ),
            (
                "double_blocks.0.processor.qkv_lora1.down.weight",
                Layout::XLabs,
            ),
        ];
        for (key, want) in cases {
            let p = parse(&names(&[key]));
            assert_eq!(p.layout, want, "{key}");
            assert_eq!(p.modules.len(), 1, "{key}");
            assert!(p.modules[0].down.is_some() || p.modules[0].up.is_some());
        }
    }

    #[test]
    fn other_architectures_and_adapters_are_named() {
        let sd15 = refusal(&names(&[
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
        ]))
        .unwrap();
        assert!(sd15.contains("Stable Diffusion 1.x"), "{sd15}");
        let sdxl = refusal(&names(&[
            "lora_unet_input_blocks_4_1_proj_in.lora_down.weight",
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
        ]))
        .unwrap();
        assert!(sdxl.contains("SDXL"), "{sdxl}");
        let sd3 = refusal(&names(&["joint_blocks.0.x_block.attn.qkv.lora_A.weight"])).unwrap();
        assert!(sd3.contains("Stable Diffusion 3"), "{sd3}");
        let loha = refusal(&names(&["lora_unet_single_blocks_0_linear1.hada_w1_a"])).unwrap();
        assert!(loha.contains("LoHa"), "{loha}");
        let flux = names(&["lora_unet_single_blocks_0_linear1.lora_down.weight"]);
        assert_eq!(refusal(&flux), None);
    }
}
