//! The weight seam over meta tensors: a component's stages held, streamed and released by the
//! residency's rules (`memory/residency.rs`; streamed groups by the same [`StreamSchedule`]),
//! with the stage bytes of a manifest instead of tensors. A stage a network asks for gives views of its weights' shapes that share the held
//! block, so the networks' own code runs unchanged over it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::memory::plan::{Component, Placement};
use crate::memory::stream::{Step, StreamSchedule};
use crate::model::weights::{merge_lora, Stage, Weights};
use crate::tensor::meta::{Block, Cat, Meta, MetaDevice, MetaQWeight};

/// One stage: its name, bytes on the device as held, host staging bytes while it is
/// materialised (0 when its tensors are read as they are stored), and what the network sees.
#[derive(Debug, Clone)]
pub struct StageCost {
    pub name: String,
    /// The stage's key prefix (`double_blocks.7.`).
    pub root: String,
    /// Device bytes as held (packed tensors at their stored size).
    pub bytes: usize,
    pub staging: usize,
    /// `+packed`: bytes of the packed tensors dequantized to the compute dtype, a transient
    /// the network holds while it computes the stage.
    pub unpacked: usize,
    /// Every tensor (full key, shape) the network can ask for.
    pub tensors: Vec<(String, Vec<usize>)>,
    /// Linear weights (full key) a `+qmatmul` plan multiplies as stored.
    pub qmm: Vec<String>,
    /// `lora=merged`: the shapes (W, A, B) of each LoRA folded into its weight at each load.
    pub merges: Vec<[Vec<usize>; 3]>,
}

#[derive(Default)]
struct Held {
    held: HashMap<usize, Rc<Block>>,
    schedule: Option<StreamSchedule>,
    groups: HashMap<usize, Rc<Block>>,
    pending: Option<Rc<Block>>,
}

/// A component's weights under a placement, over meta tensors.
pub(crate) struct MetaWeights {
    pub kind: Component,
    pub placement: Placement,
    dtype: DType,
    device: MetaDevice,
    stages: Vec<Rc<StageCost>>,
    index: HashMap<String, usize>,
    state: RefCell<Held>,
}

/// One stage as the network sees it.
pub(crate) struct MetaStage {
    cost: Rc<StageCost>,
    /// The held block (a group's when streamed), or the dequantized transient of a packed stage.
    block: Rc<Block>,
    qmm: HashMap<String, MetaQWeight>,
    dtype: DType,
    device: MetaDevice,
}

impl MetaWeights {
    /// `device`: the compute device, or the host for a `cpu` placement.
    pub fn new(
        kind: Component,
        placement: Placement,
        dtype: DType,
        device: MetaDevice,
        stages: Vec<StageCost>,
    ) -> Self {
        let index = stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        Self {
            kind,
            placement: placement.normalised(),
            dtype,
            device,
            stages: stages.into_iter().map(Rc::new).collect(),
            index,
            state: RefCell::new(Held::default()),
        }
    }

    fn on_cpu(&self) -> bool {
        self.placement == Placement::Cpu
    }

    fn cpu_side(&self) -> bool {
        self.device.heap().cfg.host_is_device || self.on_cpu()
    }

    fn materialise(&self, range: std::ops::Range<usize>, prefetch: bool) -> Rc<Block> {
        let heap = self.device.heap();
        let bytes: usize = self.stages[range.clone()].iter().map(|s| s.bytes).sum();
        let range_merges: Vec<[Vec<usize>; 3]> = self.stages[range.clone()]
            .iter()
            .flat_map(|s| s.merges.iter().cloned())
            .collect();
        let staging = self.stages[range]
            .iter()
            .map(|s| s.staging)
            .max()
            .unwrap_or(0);
        let block = heap.block(&self.device, Cat::Weights, bytes);
        // The storage-dtype copy of the largest tensor, on the heap while it is converted.
        if staging > 0 && self.cpu_side() {
            heap.transient(&heap.host(), staging);
        }
        if !self.cpu_side() {
            heap.transfer(bytes, prefetch);
        }
        self.merge_loras(range_merges, &block);
        block
    }

    /// Runs the merge of each LoRA the stages fold in (`model::weights::merge_lora`, the
    /// residency's code) over meta tensors: the factors arrive, the f32 product and sum are
    /// made, the merged weight takes its place in the block.
    fn merge_loras(&self, merges: Vec<[Vec<usize>; 3]>, block: &Rc<Block>) {
        for [w, a, b] in merges {
            let weight = Meta::in_block(block, &w, self.dtype, &self.device);
            let a = Meta::alloc(&a, self.dtype, &self.device);
            let b = Meta::alloc(&b, self.dtype, &self.device);
            merge_lora(&weight, &a, &b).expect("merge shapes come from the manifest");
        }
    }

    /// The kept stages of a streamed component (partial residency).
    fn keep(&self) -> usize {
        match self.placement {
            Placement::Stream { keep, .. } => keep.min(self.stages.len()),
            _ => 0,
        }
    }

    /// Stage `idx` of a streamed component, past the kept ones.
    fn stream_stage(&self, idx: usize, group: usize, window: usize) -> Rc<Block> {
        let keep = self.keep();
        let g = (idx - keep) / group;
        let n = self.stages.len();
        let range = |g: usize| {
            let start = keep + g * group;
            start..(start + group).min(n)
        };
        let mut st = self.state.borrow_mut();
        let schedule = st
            .schedule
            .get_or_insert_with(|| StreamSchedule::new((n - keep).div_ceil(group), window));
        if schedule.must_enter(g) {
            for step in schedule.enter(g) {
                match step {
                    Step::Evict(h) => drop(st.groups.remove(&h)),
                    Step::Arrive(h) | Step::KeepOldest(h) => {
                        let b = st.pending.take().expect("a prefetch is in flight");
                        st.groups.insert(h, b);
                    }
                    Step::Load(h) => {
                        let b = self.materialise(range(h), false);
                        st.groups.insert(h, b);
                    }
                    Step::Prefetch(h) => st.pending = Some(self.materialise(range(h), true)),
                }
            }
        }
        st.groups[&g].clone()
    }

    /// End of the component's phase (`Residency::release`).
    pub fn release(&self) {
        if self.placement != Placement::Resident {
            *self.state.borrow_mut() = Held::default();
        }
    }
}

impl Weights<Meta> for MetaWeights {
    type Stage = MetaStage;

    fn stage(&self, name: &str) -> Result<MetaStage> {
        let idx = *self.index.get(name).ok_or_else(|| {
            Error::Config(format!("{} has no stage named `{name}`", self.kind.name()))
        })?;
        let heap = self.device.heap();
        let keep = self.keep();
        let (group, streamed) = match self.placement {
            Placement::Stream { group, .. } if idx >= keep => (Some((idx - keep) / group), true),
            _ => (None, false),
        };
        heap.begin_segment(self.kind as usize, name, group, streamed, self.on_cpu());
        let held = match self.placement {
            Placement::Stream { group, window, .. } if idx >= keep => {
                self.stream_stage(idx, group, window)
            }
            _ => {
                let mut st = self.state.borrow_mut();
                st.held
                    .entry(idx)
                    .or_insert_with(|| self.materialise(idx..idx + 1, false))
                    .clone()
            }
        };
        let cost = self.stages[idx].clone();
        // `Residency`'s `unpacked`: packed tensors dequantized into a transient stage.
        let block = match cost.unpacked {
            0 => held,
            n => {
                heap.traffic(1.5 * n as f64);
                heap.block(&self.device, Cat::Weights, n)
            }
        };
        let qmm = cost
            .qmm
            .iter()
            .filter_map(|k| {
                let (_, shape) = cost.tensors.iter().find(|(n, _)| n == k)?;
                Some((
                    k.clone(),
                    MetaQWeight {
                        out: shape[0],
                        inp: shape[1],
                    },
                ))
            })
            .collect();
        Ok(MetaStage {
            cost,
            block,
            qmm,
            dtype: self.dtype,
            device: self.device.clone(),
        })
    }

    fn device(&self) -> &MetaDevice {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

impl Stage<Meta> for MetaStage {
    fn name(&self) -> &str {
        &self.cost.name
    }
    fn root(&self) -> &str {
        &self.cost.root
    }
    fn get_opt(&self, rel: &str) -> Option<Meta> {
        let key = format!("{}{rel}", self.cost.root);
        let (_, shape) = self.cost.tensors.iter().find(|(k, _)| *k == key)?;
        Some(Meta::in_block(&self.block, shape, self.dtype, &self.device))
    }
    fn quantized(&self, rel: &str) -> Option<&MetaQWeight> {
        self.qmm.get(&format!("{}{rel}", self.cost.root))
    }
}
