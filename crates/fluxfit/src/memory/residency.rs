//! Where a component's weights are, under a plan: the candle side of the seam the networks
//! define in [`crate::model::weights`] (docs/architecture.md principle 1).
//!
//! A network names the stage it is about to run (`double_blocks.7`, `decoder.up.2`) and receives
//! that stage's tensors on its compute device in its compute dtype. Whether they were resident all
//! along, brought in for the phase or streamed with the next stage prefetched is the plan's
//! business; the network code is the same under every plan.
//!
//! - `Resident`: a stage is materialised on first use and kept for the session.
//! - `Phase`: the same, but [`Residency::release`] (called by the pipeline at the end of the
//!   component's phase) drops everything.
//! - `Stream { group, window }`: the stages, in [`Residency::stages`] order, form groups of
//!   `group`; at most `window` groups are held, counting the one being prefetched. When the
//!   network first asks for a stage of group g, g is taken (waiting for its prefetch if one is in
//!   flight), the least recently used groups are dropped to make room, and the materialisation of
//!   the next group (after the last: the group the pass started with, for the next pass) is
//!   handed to a background thread, so that copying it out of the memory map and converting its
//!   dtype overlap g's compute. With `window` 1 there is no room for a prefetch: streaming is
//!   then synchronous.
//! - `Cpu`: weights on the CPU and the network computes there (phase-scoped, like `Phase`); the
//!   pipeline moves inputs to [`Weights::device`] and outputs back.
//!
//! Every stage's bytes are taken from the [`Ledger`] before they are allocated and given back
//! when the stage's tensors are gone, wherever the last reference to them was dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use super::ledger::{Entry, Kind, Ledger};
pub use super::plan::Placement;
use super::stream::{Step, StreamSchedule};
use crate::checkpoint::store::TensorStore;
use crate::error::{Error, Result};
use crate::model::weights::{held_after_merge, lora_merges, merge_lora};
pub use crate::model::weights::{Stage, StageSpec, Weights};

/// One stage's tensors, on the compute device.
#[derive(Debug)]
pub struct StageWeights {
    name: String,
    root: String,
    // Declared before `entry`: fields drop in order, so the tensors are freed before the
    // ledger is told.
    tensors: HashMap<String, Tensor>,
    /// `+packed` plans: GGUF block-quantized tensors kept as stored, dequantized into a
    /// transient stage each time the network asks ([`Residency`]'s `stage`).
    packed: HashMap<String, Arc<QTensor>>,
    /// `+qmatmul` plans: packed Linear weights multiplied as they are (see [`fast_qmatmul`]).
    qmm: HashMap<String, QMatMul>,
    bytes: usize,
    _entry: Option<Entry>,
}

impl StageWeights {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Device bytes held by this stage.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Whether candle's quantized matmul beats dequantize + dense matmul for `t` on `device`, as
/// measured (`fluxfit bench-quant`, docs/quantization.md "Quantized matmul vs dequantize + f32
/// matmul"): on the CPU, for Q8_0, Q6_K and Q4_K (0.4–0.6× the f32 matmul's time); slower for
/// every other type there, and not yet measured on a GPU, where dequantizing stays the choice.
pub fn fast_qmatmul(device: &Device, t: GgmlDType) -> bool {
    device.is_cpu() && matches!(t, GgmlDType::Q8_0 | GgmlDType::Q6K | GgmlDType::Q4K)
}

/// Whether a `+qmatmul` plan multiplies `key` quantized: a 2-D Linear weight of a type with a
/// fast quantized matmul on `device`.
pub fn multiplied_quantized(device: &Device, key: &str, shape: &[usize], t: GgmlDType) -> bool {
    key.ends_with(".weight") && shape.len() == 2 && fast_qmatmul(device, t)
}

/// What the residency and its prefetch thread share.
struct Shared {
    component: &'static str,
    store: Arc<TensorStore>,
    stages: Vec<StageSpec>,
    device: Device,
    dtype: DType,
    ledger: Arc<Ledger>,
    /// Bumped by `release`: queued prefetches of an older generation are skipped.
    generation: AtomicU64,
    /// Keep GGUF block-quantized weights packed on the device (see [`StageWeights`]).
    packed: bool,
    /// Multiply packed Linear weights quantized where that is faster ([`fast_qmatmul`]).
    qmatmul: bool,
    /// Stream: the leading stages kept for the phase; groups are counted after them.
    keep: usize,
    /// `lora=merged`: LoRA pairs folded into their dense weights as each stage is loaded.
    lora_merged: bool,
}

impl Shared {
    /// Whether `key` is held packed under this residency.
    fn holds_packed(&self, key: &str) -> bool {
        self.packed && self.store.is_packable(key)
    }

    /// Device bytes `key` is held in: its stored bytes when packed, else the compute dtype's.
    fn held_bytes_of(&self, key: &str) -> Result<usize> {
        let info = self.store.info(key)?;
        Ok(if self.holds_packed(key) {
            info.stored_bytes()
        } else {
            info.numel() * self.dtype.size_in_bytes()
        })
    }

    /// Device bytes of stage `idx` as held (packed tensors at their stored size).
    fn stage_bytes(&self, idx: usize) -> usize {
        let (keys, _) = self.held_keys(idx);
        keys.into_iter()
            .filter_map(|k| self.held_bytes_of(k).ok())
            .sum()
    }

    /// The keys stage `idx` holds as loaded (a merged LoRA's factors are not held; its
    /// `lora_B.bias` is, as the layer's bias when it has none), and the layers merged.
    fn held_keys(&self, idx: usize) -> (Vec<&String>, Vec<String>) {
        let keys = self.stages[idx].keys(&self.store);
        if !self.lora_merged {
            return (keys, Vec::new());
        }
        let names: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
        let merges: Vec<String> = lora_merges(&names, |k| self.holds_packed(k))
            .into_iter()
            .map(String::from)
            .collect();
        let m: Vec<&str> = merges.iter().map(String::as_str).collect();
        let kept = held_after_merge(&names, &m);
        let held = keys
            .into_iter()
            .filter(|k| kept.contains(&k.as_str()))
            .collect();
        (held, merges)
    }

    /// Folds each merged layer's LoRA pair into its weight (and `lora_B.bias` into its bias).
    fn merge(&self, tensors: &mut HashMap<String, Tensor>, merges: &[String]) -> Result<()> {
        for x in merges {
            let weight = format!("{x}.weight");
            let a = self.load(&format!("{x}.lora_A.weight"))?;
            let b = self.load(&format!("{x}.lora_B.weight"))?;
            let w = tensors
                .remove(&weight)
                .expect("held_keys keeps the base weight");
            tensors.insert(weight, merge_lora(&w, &a, &b)?);
            let (bias, up_bias) = (format!("{x}.bias"), format!("{x}.lora_B.bias"));
            if self.store.contains(&up_bias) && self.store.contains(&bias) {
                let sum = tensors[&bias].add(&self.load(&up_bias)?)?;
                tensors.insert(bias, sum);
            } else if let Some(t) = tensors.remove(&up_bias) {
                tensors.insert(bias, t);
            }
        }
        Ok(())
    }

    /// The stage the network computes with: `held` itself, or, when it holds packed tensors, a
    /// transient copy with those dequantized to the compute dtype on the device (its bytes in
    /// the ledger until the network drops it).
    fn unpacked(&self, held: Arc<StageWeights>) -> Result<Arc<StageWeights>> {
        if held.packed.is_empty() {
            return Ok(held);
        }
        let by_qmm = |key: &str, q: &QTensor| {
            self.qmatmul && multiplied_quantized(&self.device, key, q.shape().dims(), q.dtype())
        };
        let bytes: usize = held
            .packed
            .iter()
            .filter(|(k, q)| !by_qmm(k, q))
            .map(|(_, q)| q.shape().elem_count() * self.dtype.size_in_bytes())
            .sum();
        let entry = self.ledger.take(
            self.component,
            format!("{}/{} (dequantized)", self.component, held.name),
            Kind::Weights,
            bytes,
            &self.device,
        );
        let mut tensors = held.tensors.clone();
        let mut qmm = HashMap::new();
        for (key, q) in &held.packed {
            if by_qmm(key, q) {
                qmm.insert(key.clone(), QMatMul::from_arc(q.clone())?);
            } else {
                tensors.insert(
                    key.clone(),
                    q.dequantize(&self.device)?.to_dtype(self.dtype)?,
                );
            }
        }
        Ok(Arc::new(StageWeights {
            name: held.name.clone(),
            root: held.root.clone(),
            tensors,
            packed: HashMap::new(),
            qmm,
            bytes,
            _entry: Some(entry),
        }))
    }

    /// Copies one stage out of the memory map into owned tensors on the device, converting the
    /// dtype on the way: reads this stage's bytes and no other's.
    fn materialise(&self, idx: usize) -> Result<StageWeights> {
        let spec = &self.stages[idx];
        let (keys, merges) = self.held_keys(idx);
        let mut bytes = 0;
        let mut staging = 0;
        for key in &keys {
            let info = self.store.info(key)?;
            bytes += self.held_bytes_of(key)?;
            if self.holds_packed(key) {
                continue;
            }
            // A tensor that is not stored as is in the compute dtype is built on the host first.
            let direct = self.store.is_direct(key) && info.dtype == self.dtype;
            if !direct || !self.device.is_cpu() {
                staging = staging.max(info.nbytes());
            }
        }
        let owner = format!("{}/{}", self.component, spec.name);
        let entry = self
            .ledger
            .take(self.component, owner, Kind::Weights, bytes, &self.device);
        let staging = (staging > 0).then(|| {
            self.ledger.take(
                self.component,
                format!("{}/staging", self.component),
                Kind::Workspace,
                staging,
                &Device::Cpu,
            )
        });
        let mut tensors = HashMap::with_capacity(keys.len());
        let mut packed = HashMap::new();
        for key in keys {
            if self.packed {
                if let Some(q) = self.store.packed(key, &self.device)? {
                    packed.insert(key.clone(), Arc::new(q));
                    continue;
                }
            }
            tensors.insert(key.clone(), self.load(key)?);
        }
        self.merge(&mut tensors, &merges)?;
        drop(staging);
        Ok(StageWeights {
            name: spec.name.clone(),
            root: spec.root.clone(),
            tensors,
            packed,
            qmm: HashMap::new(),
            bytes,
            _entry: Some(entry),
        })
    }

    /// One tensor on the device in the compute dtype. On CUDA it travels on the device's copy
    /// stream through pinned staging slots (`memory::cuda::CudaUploader`), so that a prefetch
    /// overlaps the kernels; elsewhere candle copies it.
    fn load(&self, key: &str) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(up) = super::cuda::CudaUploader::for_device(&self.device)? {
            return up.load(&self.store, key, self.dtype);
        }
        self.store.load(key, &self.device, self.dtype)
    }

    fn group_range(&self, g: usize, group: usize) -> std::ops::Range<usize> {
        let start = (self.keep + g * group).min(self.stages.len());
        start..(start + group).min(self.stages.len())
    }

    fn materialise_group(&self, g: usize, group: usize) -> Result<Vec<StageWeights>> {
        self.group_range(g, group)
            .map(|i| self.materialise(i))
            .collect()
    }
}

type Reply = Option<Result<Vec<StageWeights>>>;

struct Job {
    group: usize,
    generation: u64,
    reply: Sender<Reply>,
}

/// The background thread that materialises prefetched groups.
struct Worker {
    jobs: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    fn spawn(shared: Arc<Shared>, group: usize) -> Option<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name(format!("fluxfit-prefetch-{}", shared.component))
            .spawn(move || {
                for job in queue {
                    let out = (job.generation == shared.generation.load(SeqCst))
                        .then(|| shared.materialise_group(job.group, group));
                    // A receiver gone means nobody wants the group: dropping it gives it back.
                    let _ = job.reply.send(out);
                }
            })
            .ok()?;
        Some(Self {
            jobs: Some(jobs),
            handle: Some(handle),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[derive(Default)]
struct State {
    /// Resident, Phase and Cpu: stages by index.
    held: HashMap<usize, Arc<StageWeights>>,
    /// Stream: which groups are held and which comes next (made on first use).
    schedule: Option<StreamSchedule>,
    /// Stream: the held groups' stages.
    groups: HashMap<usize, Vec<Arc<StageWeights>>>,
    /// Stream: the group being prefetched.
    pending: Option<(usize, Receiver<Reply>)>,
    stats: LoadStats,
}

/// How a component's weights arrived, since the residency was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Stages (streamed: groups) materialised on the network's thread, no prefetch having them.
    pub synchronous: usize,
    /// Groups the network took from a prefetch.
    pub prefetched: usize,
    /// Prefetches issued.
    pub issued: usize,
    /// Time the network spent waiting for weights (prefetches not yet done, and synchronous
    /// loads): what prefetching did not hide.
    pub waited: std::time::Duration,
}

/// A component's weights under a plan: the store they come from, the stages networks ask for.
pub struct Residency {
    shared: Arc<Shared>,
    index: HashMap<String, usize>,
    placement: Placement,
    state: Mutex<State>,
    worker: Mutex<Option<Worker>>,
}

impl Residency {
    /// A residency with a ledger of its own (component name `weights`).
    pub fn new(
        store: Arc<TensorStore>,
        stages: Vec<StageSpec>,
        device: Device,
        dtype: DType,
        placement: Placement,
    ) -> Self {
        let ledger = Ledger::new(device.clone());
        Self::in_ledger(ledger, "weights", store, stages, device, dtype, placement)
    }

    /// A residency reporting to `ledger` under `component` (`flow`, `t5`, ...). A `Cpu`
    /// placement puts the weights on the CPU whatever `device` is.
    pub fn in_ledger(
        ledger: Arc<Ledger>,
        component: &'static str,
        store: Arc<TensorStore>,
        stages: Vec<StageSpec>,
        device: Device,
        dtype: DType,
        placement: Placement,
    ) -> Self {
        let device = match placement {
            Placement::Cpu => Device::Cpu,
            _ => device,
        };
        let placement = placement.normalised();
        let stages_len = stages.len();
        let index = stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        Self {
            shared: Arc::new(Shared {
                component,
                store,
                stages,
                device,
                dtype,
                ledger,
                generation: AtomicU64::new(0),
                packed: false,
                qmatmul: false,
                lora_merged: false,
                keep: match placement {
                    Placement::Stream { keep, .. } => keep.min(stages_len),
                    _ => 0,
                },
            }),
            index,
            placement,
            state: Mutex::new(State::default()),
            worker: Mutex::new(None),
        }
    }

    /// This residency holding GGUF block-quantized weights packed on the device (a `+packed`
    /// plan), dequantized per stage when the network asks for it.
    pub fn with_packed(mut self, packed: bool) -> Self {
        Arc::get_mut(&mut self.shared)
            .expect("a new residency's state is not shared yet")
            .packed = packed;
        self
    }

    /// This residency multiplying packed Linear weights quantized where that is faster
    /// ([`fast_qmatmul`]); implies [`Residency::with_packed`].
    pub fn with_qmatmul(mut self, qmatmul: bool) -> Self {
        let shared =
            Arc::get_mut(&mut self.shared).expect("a new residency's state is not shared yet");
        shared.qmatmul = qmatmul;
        shared.packed |= qmatmul;
        self
    }

    /// This residency folding LoRA pairs into their dense weights as stages are loaded (a
    /// `lora=merged` plan): no low-rank term at each call, a merge at each load.
    pub fn with_lora_merged(mut self, merged: bool) -> Self {
        Arc::get_mut(&mut self.shared)
            .expect("a new residency's state is not shared yet")
            .lora_merged = merged;
        self
    }

    /// Whether GGUF block-quantized weights stay packed on the device.
    pub fn packed(&self) -> bool {
        self.shared.packed
    }

    pub fn store(&self) -> &TensorStore {
        &self.shared.store
    }

    /// The store, shared (to build this component's residency under another plan).
    pub fn store_arc(&self) -> Arc<TensorStore> {
        self.shared.store.clone()
    }

    pub fn stages(&self) -> &[StageSpec] {
        &self.shared.stages
    }

    pub fn placement(&self) -> Placement {
        self.placement
    }

    pub fn component(&self) -> &'static str {
        self.shared.component
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.shared.ledger
    }

    /// Device bytes of each stage in the compute dtype, in stage order.
    pub fn stage_bytes(&self) -> Vec<usize> {
        (0..self.shared.stages.len())
            .map(|i| self.shared.stage_bytes(i))
            .collect()
    }

    /// Device bytes of each streaming group of `group` stages.
    pub fn group_bytes(&self, group: usize) -> Vec<usize> {
        self.stage_bytes()
            .chunks(group.max(1))
            .map(|c| c.iter().sum())
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes currently held on the device by this residency (a prefetch in flight excluded).
    pub fn held_bytes(&self) -> usize {
        let st = self.lock();
        st.held.values().map(|s| s.bytes).sum::<usize>()
            + st.groups
                .values()
                .flat_map(|g| g.iter())
                .map(|s| s.bytes)
                .sum::<usize>()
    }

    /// End of the component's phase: everything but resident weights is dropped, including a
    /// prefetch in flight (waited for, so that its bytes are gone when this returns).
    pub fn release(&self) {
        if self.placement == Placement::Resident {
            return;
        }
        self.drop_all();
    }

    /// Drops every held stage, whatever the placement.
    pub fn drop_all(&self) {
        self.shared.generation.fetch_add(1, SeqCst);
        let mut st = self.lock();
        if let Some((_, rx)) = st.pending.take() {
            let _ = rx.recv();
        }
        let stats = st.stats;
        *st = State {
            stats,
            ..State::default()
        };
    }

    /// How this component's weights arrived so far.
    pub fn load_stats(&self) -> LoadStats {
        self.lock().stats
    }

    fn spec_index(&self, name: &str) -> Result<usize> {
        self.index.get(name).copied().ok_or_else(|| {
            Error::Config(format!(
                "{} has no stage named `{name}`",
                self.shared.component
            ))
        })
    }

    /// Stage `idx` of a streamed component, past the kept ones (`idx >= keep`).
    fn stream_stage(&self, idx: usize, group: usize, window: usize) -> Result<Arc<StageWeights>> {
        let keep = self.shared.keep;
        let g = (idx - keep) / group;
        let mut st = self.lock();
        let ngroups = (self.shared.stages.len() - keep).div_ceil(group);
        let schedule = st
            .schedule
            .get_or_insert_with(|| StreamSchedule::new(ngroups, window));
        if schedule.must_enter(g) {
            for step in schedule.enter(g) {
                self.execute(&mut st, step, group)?;
            }
        }
        Ok(st.groups[&g][idx - keep - g * group].clone())
    }

    /// Waits for the prefetch in flight; `None` if it was skipped or its thread is gone.
    fn wait(&self, st: &mut State) -> Option<Result<Vec<StageWeights>>> {
        let (_, rx) = st.pending.take()?;
        rx.recv().ok().flatten()
    }

    /// Does one step of the streaming schedule.
    fn execute(&self, st: &mut State, step: Step, group: usize) -> Result<()> {
        let shared = &self.shared;
        let hold = |stages: Vec<StageWeights>| stages.into_iter().map(Arc::new).collect();
        let t0 = std::time::Instant::now();
        match step {
            Step::Evict(h) => drop(st.groups.remove(&h)),
            Step::Arrive(g) => {
                let stages = match self.wait(st) {
                    Some(r) => {
                        st.stats.prefetched += 1;
                        r?
                    }
                    // The prefetch thread is gone: load it here.
                    None => {
                        st.stats.synchronous += 1;
                        shared.materialise_group(g, group)?
                    }
                };
                st.groups.insert(g, hold(stages));
                st.stats.waited += t0.elapsed();
            }
            Step::KeepOldest(h) => match self.wait(st) {
                Some(Ok(stages)) => drop(st.groups.insert(h, hold(stages))),
                _ => {
                    if let Some(s) = st.schedule.as_mut() {
                        s.forget(h)
                    }
                }
            },
            Step::Load(g) => {
                st.stats.synchronous += 1;
                let stages = shared.materialise_group(g, group)?;
                st.groups.insert(g, hold(stages));
                st.stats.waited += t0.elapsed();
            }
            Step::Prefetch(next) => {
                let sent = self.worker_jobs(group).and_then(|jobs| {
                    let (reply, rx) = mpsc::channel();
                    let job = Job {
                        group: next,
                        generation: shared.generation.load(SeqCst),
                        reply,
                    };
                    jobs.send(job).ok().map(|()| rx)
                });
                match sent {
                    Some(rx) => {
                        st.pending = Some((next, rx));
                        st.stats.issued += 1;
                    }
                    None => {
                        if let Some(s) = st.schedule.as_mut() {
                            s.cancel_prefetch()
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The prefetch thread's queue, started on first use; `None` if no thread can be started
    /// (streaming then stays correct, only synchronous).
    fn worker_jobs(&self, group: usize) -> Option<Sender<Job>> {
        let mut w = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_none() {
            *w = Worker::spawn(self.shared.clone(), group);
        }
        w.as_ref().and_then(|w| w.jobs.clone())
    }
}

impl Drop for Residency {
    fn drop(&mut self) {
        self.drop_all();
    }
}

impl Stage<Tensor> for Arc<StageWeights> {
    fn name(&self) -> &str {
        &self.name
    }
    fn root(&self) -> &str {
        &self.root
    }
    fn get_opt(&self, rel: &str) -> Option<Tensor> {
        self.tensors.get(&format!("{}{rel}", self.root)).cloned()
    }
    fn quantized(&self, rel: &str) -> Option<&QMatMul> {
        self.qmm.get(&format!("{}{rel}", self.root))
    }
}

impl Weights<Tensor> for Residency {
    type Stage = Arc<StageWeights>;

    fn stage(&self, name: &str) -> Result<Arc<StageWeights>> {
        let idx = self.spec_index(name)?;
        if let Placement::Stream { group, window, .. } = self.placement {
            if idx >= self.shared.keep {
                let held = self.stream_stage(idx, group, window)?;
                return self.shared.unpacked(held);
            }
        }
        let mut st = self.lock();
        let held = match st.held.get(&idx) {
            Some(s) => s.clone(),
            None => {
                let t0 = std::time::Instant::now();
                let stage = Arc::new(self.shared.materialise(idx)?);
                st.held.insert(idx, stage.clone());
                st.stats.synchronous += 1;
                st.stats.waited += t0.elapsed();
                stage
            }
        };
        drop(st);
        self.shared.unpacked(held)
    }

    fn device(&self) -> &Device {
        &self.shared.device
    }

    fn dtype(&self) -> DType {
        self.shared.dtype
    }
}
