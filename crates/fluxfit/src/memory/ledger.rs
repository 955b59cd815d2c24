//! Every byte a plan holds on the compute device, by owner (docs/architecture.md principle 3).
//!
//! Owners are stage weights (`flow/double_blocks.7`), workspace (staging buffers of a
//! materialisation in progress) and, per phase, activations. The first two are counted exactly:
//! the residency takes an [`Entry`] before it allocates a stage and the entry gives the bytes back
//! when the stage's tensors are gone. Activations are whatever else the phase allocates; on the
//! CPU they are measured by the counting allocator ([`super::alloc`]) as the heap not accounted
//! for by entries. On CUDA the totals come from the device memory pool's high-water mark
//! (every tensor candle makes comes from that pool), and the activations are the total less the
//! largest ledger holding of the phase (a lower bound). On Metal the ledger knows the weights
//! only.
//!
//! A run is a sequence of phases (`encode`, `denoise`, `decode`); for each the ledger keeps the
//! peak of the weights held, of the workspace, of the activations and of their total.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::Device;

use super::alloc;
use crate::component::Phase;

/// What an entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Weights,
    Workspace,
}

/// The figures of one phase of a run, in bytes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PhaseMemory {
    pub phase: Phase,
    /// Largest sum of stage weights held on the compute device during the phase.
    pub weights_peak: usize,
    /// Weights still held when the phase ended (after its components were released).
    pub weights_end: usize,
    /// Largest workspace (staging buffers) held on the compute device.
    pub workspace_peak: usize,
    /// Largest activations (heap beyond weights and workspace), where measured.
    pub activations_peak: Option<usize>,
    /// Largest total on the compute device: measured where possible, else weights + workspace.
    pub total_peak: usize,
    /// Whether `total_peak` and `activations_peak` were measured (the CPU's counting allocator,
    /// CUDA's memory pool).
    pub measured: bool,
    /// Peak weights by component (`t5`, `clip`, `flow`, `vae`).
    pub components: BTreeMap<String, usize>,
    /// Peak weights of components placed on the host while the compute device is another one.
    pub host_weights_peak: usize,
}

/// The ledger's account of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryReport {
    /// The compute device, in words (`cpu`, `cuda:0`).
    pub device: String,
    pub measured: bool,
    pub phases: Vec<PhaseMemory>,
    /// Largest `total_peak` over the phases.
    pub peak: usize,
}

impl MemoryReport {
    pub fn phase(&self, phase: Phase) -> Option<&PhaseMemory> {
        self.phases.iter().find(|p| p.phase == phase)
    }

    /// A fixed-width table for people.
    pub fn table(&self) -> String {
        let mib = |b: usize| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0));
        let mut s = format!(
            "memory on {} ({}):\n{:<8} {:>14} {:>14} {:>14} {:>16} {:>14}\n",
            self.device,
            if self.measured && self.device == "cpu" {
                "weights from the ledger, totals measured by the counting allocator"
            } else if self.measured {
                "weights from the ledger, totals measured by the memory pool's high-water mark"
            } else {
                "weights from the ledger; activations not measured on this device"
            },
            "phase",
            "weights held",
            "weights peak",
            "workspace",
            "activations peak",
            "total peak",
        );
        for p in &self.phases {
            s += &format!(
                "{:<8} {:>14} {:>14} {:>14} {:>16} {:>14}\n",
                p.phase,
                mib(p.weights_end),
                mib(p.weights_peak),
                mib(p.workspace_peak),
                p.activations_peak.map_or_else(|| "n/a".to_string(), mib),
                mib(p.total_peak),
            );
            let parts: Vec<String> = p
                .components
                .iter()
                .filter(|(_, b)| **b > 0)
                .map(|(c, b)| format!("{c} {}", mib(*b)))
                .collect();
            if !parts.is_empty() {
                s += &format!(
                    "{:<8} weights peak by component: {}\n",
                    "",
                    parts.join(", ")
                );
            }
            if p.host_weights_peak > 0 {
                s += &format!(
                    "{:<8} on the host (cpu placement): {}\n",
                    "",
                    mib(p.host_weights_peak)
                );
            }
        }
        s += &format!("peak {}\n", mib(self.peak));
        s
    }
}

#[derive(Debug)]
struct PhaseAcc {
    name: Phase,
    weights_peak: usize,
    workspace_peak: usize,
    accounted_peak: usize,
    host_weights_peak: usize,
    components: BTreeMap<&'static str, usize>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Current bytes by owner (`flow/double_blocks.3`, `flow/staging`), compute device and host.
    owners: BTreeMap<String, usize>,
    weights: usize,
    workspace: usize,
    host_weights: usize,
    components: BTreeMap<&'static str, usize>,
    phase: Option<PhaseAcc>,
    phases: Vec<PhaseMemory>,
    /// Heap bytes at the start of the run that are not on the "device" (tokenizers, buffers).
    base_other: isize,
    measuring: bool,
    /// What measures the device: the counting allocator or CUDA's pool (set per run).
    meter: Meter,
    last: Option<MemoryReport>,
}

/// What measures the compute device's bytes.
#[derive(Debug, Default)]
enum Meter {
    #[default]
    None,
    Heap,
    #[cfg(feature = "cuda")]
    Pool(super::cuda::PoolMeter),
}

impl Meter {
    fn of(device: &Device) -> Self {
        match device {
            Device::Cpu if alloc::installed() => Meter::Heap,
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => super::cuda::PoolMeter::new(device).map_or(Meter::None, Meter::Pool),
            _ => Meter::None,
        }
    }

    /// Bytes in use now, and those the ledger holds (weights and workspace).
    fn current(&self, accounted: usize) -> (isize, isize) {
        let _ = accounted; // read by the pool's arm only
        match self {
            Meter::None => (0, 0),
            Meter::Heap => (alloc::current() as isize, alloc::accounted()),
            #[cfg(feature = "cuda")]
            Meter::Pool(p) => (p.current() as isize, accounted as isize),
        }
    }

    fn reset_peak(&self) {
        match self {
            Meter::None => {}
            Meter::Heap => alloc::reset_peak(),
            #[cfg(feature = "cuda")]
            Meter::Pool(p) => p.reset_peak(),
        }
    }

    /// The phase's (activations, total) peaks above `base`, given the largest ledger holding.
    fn peaks(&self, base: isize, accounted_peak: usize) -> (usize, usize) {
        match self {
            Meter::None => (0, accounted_peak),
            Meter::Heap => {
                let act = (alloc::unaccounted_peak() - base).max(0) as usize;
                let total = (alloc::peak() as isize - base).max(0) as usize;
                (act, total.max(accounted_peak))
            }
            #[cfg(feature = "cuda")]
            Meter::Pool(p) => {
                let total = ((p.peak() as isize - base).max(0) as usize).max(accounted_peak);
                (total - accounted_peak, total)
            }
        }
    }
}

/// Where an entry's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loc {
    Compute,
    Host,
}

/// The bytes held on each device by owner, and their peaks per phase. Shared by the
/// residencies of one model.
#[derive(Debug)]
pub struct Ledger {
    compute: Device,
    inner: Mutex<Inner>,
}

/// A holding in the ledger: taken before the bytes are allocated, given back when dropped
/// (drop it after the bytes are freed).
#[derive(Debug)]
pub struct Entry {
    ledger: Arc<Ledger>,
    owner: String,
    component: &'static str,
    kind: Kind,
    loc: Loc,
    heap: bool,
    bytes: usize,
}

impl Entry {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.ledger.give_back(self);
    }
}

fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match d.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        Device::Metal(_) => "metal".into(),
    }
}

impl Ledger {
    pub fn new(compute: Device) -> Arc<Self> {
        Arc::new(Self {
            compute,
            inner: Mutex::new(Inner::default()),
        })
    }

    pub fn compute_device(&self) -> &Device {
        &self.compute
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `bytes` about to be allocated on `device` for `owner` of `component`.
    pub fn take(
        self: &Arc<Self>,
        component: &'static str,
        owner: String,
        kind: Kind,
        bytes: usize,
        device: &Device,
    ) -> Entry {
        let loc = if device.same_device(&self.compute) {
            Loc::Compute
        } else {
            Loc::Host
        };
        let heap = device.is_cpu();
        if heap {
            alloc::account(bytes as isize);
        }
        let mut g = self.lock();
        *g.owners.entry(owner.clone()).or_default() += bytes;
        match (loc, kind) {
            (Loc::Compute, Kind::Weights) => {
                g.weights += bytes;
                *g.components.entry(component).or_default() += bytes;
            }
            (Loc::Compute, Kind::Workspace) => g.workspace += bytes,
            (Loc::Host, Kind::Weights) => g.host_weights += bytes,
            (Loc::Host, Kind::Workspace) => {}
        }
        let (w, ws, hw) = (g.weights, g.workspace, g.host_weights);
        let comp = g.components.get(component).copied().unwrap_or(0);
        if let Some(p) = g.phase.as_mut() {
            p.weights_peak = p.weights_peak.max(w);
            p.workspace_peak = p.workspace_peak.max(ws);
            p.accounted_peak = p.accounted_peak.max(w + ws);
            p.host_weights_peak = p.host_weights_peak.max(hw);
            let c = p.components.entry(component).or_default();
            *c = (*c).max(comp);
        }
        drop(g);
        Entry {
            ledger: self.clone(),
            owner,
            component,
            kind,
            loc,
            heap,
            bytes,
        }
    }

    fn give_back(&self, e: &Entry) {
        let mut g = self.lock();
        if let Some(b) = g.owners.get_mut(&e.owner) {
            *b -= e.bytes;
            if *b == 0 {
                g.owners.remove(&e.owner);
            }
        }
        match (e.loc, e.kind) {
            (Loc::Compute, Kind::Weights) => {
                g.weights -= e.bytes;
                if let Some(c) = g.components.get_mut(e.component) {
                    *c -= e.bytes;
                }
            }
            (Loc::Compute, Kind::Workspace) => g.workspace -= e.bytes,
            (Loc::Host, Kind::Weights) => g.host_weights -= e.bytes,
            (Loc::Host, Kind::Workspace) => {}
        }
        drop(g);
        if e.heap {
            alloc::account(-(e.bytes as isize));
        }
    }

    /// Stage weights held on the compute device now.
    pub fn weights(&self) -> usize {
        self.lock().weights
    }

    /// Workspace held on the compute device now.
    pub fn workspace(&self) -> usize {
        self.lock().workspace
    }

    /// Current bytes by owner (compute device and host).
    pub fn owners(&self) -> Vec<(String, usize)> {
        self.lock()
            .owners
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Starts a run: the heap now, less what the ledger holds, is the baseline that is not on
    /// the device.
    pub fn begin_run(&self) {
        let mut g = self.lock();
        g.phases.clear();
        g.phase = None;
        g.meter = Meter::of(&self.compute);
        g.measuring = !matches!(g.meter, Meter::None);
        let (now, accounted) = g.meter.current(g.weights + g.workspace);
        g.base_other = now - accounted;
    }

    /// Starts a phase; its peaks start from what is held now.
    pub fn begin_phase(&self, name: Phase) {
        let mut g = self.lock();
        if g.phase.is_some() {
            drop(g);
            self.end_phase();
            g = self.lock();
        }
        let (w, ws, hw) = (g.weights, g.workspace, g.host_weights);
        g.phase = Some(PhaseAcc {
            name,
            weights_peak: w,
            workspace_peak: ws,
            accounted_peak: w + ws,
            host_weights_peak: hw,
            components: g.components.clone(),
        });
        g.meter.reset_peak();
    }

    /// Closes the current phase.
    pub fn end_phase(&self) {
        let mut g = self.lock();
        let Some(p) = g.phase.take() else { return };
        let (activations, total) = if g.measuring {
            let (act, total) = g.meter.peaks(g.base_other, p.accounted_peak);
            (Some(act), total)
        } else {
            (None, p.accounted_peak)
        };
        let phase = PhaseMemory {
            phase: p.name,
            weights_peak: p.weights_peak,
            weights_end: g.weights,
            workspace_peak: p.workspace_peak,
            activations_peak: activations,
            total_peak: total,
            measured: g.measuring,
            components: p
                .components
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            host_weights_peak: p.host_weights_peak,
        };
        g.phases.push(phase);
    }

    /// Ends the run and returns its report (also kept as [`Ledger::last_report`]).
    pub fn end_run(&self) -> MemoryReport {
        self.end_phase();
        let mut g = self.lock();
        let report = MemoryReport {
            device: device_name(&self.compute),
            measured: g.measuring,
            peak: g.phases.iter().map(|p| p.total_peak).max().unwrap_or(0),
            phases: std::mem::take(&mut g.phases),
        };
        g.last = Some(report.clone());
        report
    }

    /// The report of the last finished run.
    pub fn last_report(&self) -> Option<MemoryReport> {
        self.lock().last.clone()
    }
}
