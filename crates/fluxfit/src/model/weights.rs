//! The seam between what a network computes and where its weights are (docs/architecture.md
//! principle 1), defined here, by the networks that use it.
//!
//! A network names the stage it is about to run (`double_blocks.7`, `decoder.up.2`) and receives
//! that stage's tensors on its compute device in its compute dtype. `memory::residency`
//! implements [`Weights`] over candle under every plan (resident, per phase, streamed with
//! prefetch, on the CPU); the planner implements it over meta tensors with the same rules. The
//! network code is the same under every plan and in the planner.

use candle_core::DType;

use crate::checkpoint::store::TensorStore;
use crate::error::{Error, Result};
use crate::model::ops;
use crate::tensor::Tensor;

/// A named group of weights a network uses as one unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSpec {
    pub name: String,
    /// Prepended to the names a network asks for (`double_blocks.7.`).
    pub root: String,
    /// Key prefixes under `root` that belong to the stage; empty means everything under `root`.
    pub members: Vec<String>,
}

impl StageSpec {
    /// A stage that owns every key under `root.`.
    pub fn under(name: impl Into<String>) -> Self {
        let name = name.into();
        Self {
            root: format!("{name}."),
            name,
            members: Vec::new(),
        }
    }

    /// A stage made of several top-level groups (`img_in.`, `time_in.`, ...).
    pub fn groups(name: impl Into<String>, members: &[&str]) -> Self {
        Self {
            name: name.into(),
            root: String::new(),
            members: members.iter().map(|m| format!("{m}.")).collect(),
        }
    }

    /// Whether canonical key `key` belongs to this stage.
    pub fn owns(&self, key: &str) -> bool {
        if self.members.is_empty() {
            key.starts_with(&self.root)
        } else {
            self.members.iter().any(|m| key.starts_with(m.as_str()))
        }
    }

    /// The canonical keys of this stage present in `store`.
    pub fn keys<'a>(&'a self, store: &'a TensorStore) -> Vec<&'a String> {
        if self.members.is_empty() {
            store.keys_with_prefix(&self.root).collect()
        } else {
            self.members
                .iter()
                .flat_map(|m| store.keys_with_prefix(m))
                .collect()
        }
    }

    /// Bytes this stage occupies in storage.
    pub fn storage_bytes(&self, store: &TensorStore) -> usize {
        self.keys(store)
            .into_iter()
            .filter_map(|k| store.info(k).ok())
            .map(|i| i.stored_bytes())
            .sum()
    }
}

/// What networks see: stages by name.
pub trait Weights<T: Tensor> {
    type Stage: Stage<T>;
    fn stage(&self, name: &str) -> Result<Self::Stage>;
    fn device(&self) -> &T::Device;
    fn dtype(&self) -> DType;
}

/// One stage's tensors, by name relative to the stage's root.
pub trait Stage<T: Tensor> {
    /// The stage's name, for messages.
    fn name(&self) -> &str;
    /// The stage's key prefix (`double_blocks.7.`).
    fn root(&self) -> &str;
    fn get_opt(&self, rel: &str) -> Option<T>;
    /// The Linear weight `rel` (`….weight`) when the plan multiplies it block-quantized
    /// (`+qmatmul`).
    fn quantized(&self, rel: &str) -> Option<&T::QWeight>;

    /// The tensor at `root + rel`; a missing one names the full key and the stage.
    fn get(&self, rel: &str) -> Result<T> {
        self.get_opt(rel).ok_or_else(|| Error::MissingKey {
            path: format!("stage {}", self.name()).into(),
            key: format!("{}{rel}", self.root()),
            hint: String::new(),
        })
    }

    /// The Linear layer `name`, plus its LoRA term `B(A(x))` when LoRAs are attached (stacked
    /// LoRAs and slices of fused weights are one pair of higher rank, B carrying the scales; see
    /// `checkpoint::lora`).
    fn linear(&self, name: &str, x: &T) -> Result<T> {
        let y = self.base_linear(name, x)?;
        match self.get_opt(&format!("{name}.lora_A.weight")) {
            None => Ok(y),
            Some(a) => {
                let h = ops::linear(x, &a, self.get_opt(&format!("{name}.lora_A.bias")).as_ref())?;
                let up = self.get(&format!("{name}.lora_B.weight"))?;
                let bias = self.get_opt(&format!("{name}.lora_B.bias"));
                y.add(&ops::linear(&h, &up, bias.as_ref())?)
            }
        }
    }

    /// `x·Wᵀ + b` with `name.weight` (and `name.bias` if present), by a quantized matmul where
    /// the stage holds the weight for one, which takes f32 activations (quantized to 8 bits
    /// inside) and gives them back in `x`'s dtype.
    fn base_linear(&self, name: &str, x: &T) -> Result<T> {
        let weight = format!("{name}.weight");
        let bias = self.get_opt(&format!("{name}.bias"));
        match self.quantized(&weight) {
            Some(q) => {
                let y = x
                    .to_dtype(DType::F32)?
                    .contiguous()?
                    .qmatmul(q)?
                    .to_dtype(x.dtype())?;
                match bias {
                    Some(b) => y.broadcast_add(&b),
                    None => Ok(y),
                }
            }
            None => ops::linear(x, &self.get(&weight)?, bias.as_ref()),
        }
    }
}

/// Under a `lora=merged` plan, the layers of a stage whose LoRA pair is folded into the dense
/// weight when the stage is loaded: prefixes `X` with `X.weight`, `X.lora_A.weight` and
/// `X.lora_B.weight` all among `keys`, `X.weight` not kept block-quantized (`packed`), and no
/// `X.lora_A.bias` (no layout writes one; such a layer stays unmerged). The factors are then
/// not held; `X.lora_B.bias` is added to `X.bias` (or becomes it).
pub fn lora_merges<'a>(keys: &[&'a str], packed: impl Fn(&str) -> bool) -> Vec<&'a str> {
    let has = |k: &str| keys.contains(&k);
    keys.iter()
        .filter_map(|k| k.strip_suffix(".lora_A.weight"))
        .filter(|x| {
            let w = format!("{x}.weight");
            has(&w)
                && !packed(&w)
                && has(&format!("{x}.lora_B.weight"))
                && !has(&format!("{x}.lora_A.bias"))
        })
        .collect()
}

/// The keys a stage holds once `merges` are folded in: not the factors, except a
/// `lora_B.bias` whose layer has no bias (it is held as that bias).
pub fn held_after_merge<'a>(keys: &[&'a str], merges: &[&str]) -> Vec<&'a str> {
    fn merged<'k>(k: &'k str, suffix: &str, merges: &[&str]) -> Option<&'k str> {
        k.strip_suffix(suffix).filter(|x| merges.contains(x))
    }
    keys.iter()
        .copied()
        .filter(|k| {
            if merged(k, ".lora_A.weight", merges).is_some()
                || merged(k, ".lora_B.weight", merges).is_some()
            {
                return false;
            }
            match merged(k, ".lora_B.bias", merges) {
                Some(x) => !keys.contains(&format!("{x}.bias").as_str()),
                None => true,
            }
        })
        .collect()
}

/// `W + B·A`, computed in f32 and returned in `w`'s dtype: a LoRA folded into its weight.
/// Stacked LoRAs and slices of fused weights are already one pair (B carries the scales).
pub fn merge_lora<T: Tensor>(w: &T, a: &T, b: &T) -> Result<T> {
    let f32 = |t: &T| t.to_dtype(DType::F32);
    let update = f32(b)?.matmul(&f32(a)?)?;
    f32(w)?.add(&update)?.to_dtype(w.dtype())
}
