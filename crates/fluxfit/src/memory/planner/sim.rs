//! The cost model's engine: a shadow execution of the pipeline that allocates and frees *sizes*
//! instead of tensors, in the order the real code does.
//!
//! Every network function here mirrors its counterpart in `model/` line by line: each candle op
//! that allocates (a matmul, an elementwise op, a copy made by `contiguous` or by a `reshape` of
//! a strided view, a `cat`) allocates here too, and every value is dropped where Rust drops the
//! real one (end of statement for temporaries, end of scope for locals, on reassignment). Views
//! (`narrow`, `transpose`, `get`, a `to_dtype` to the same dtype) share their storage, as candle's
//! `Arc`ed storages do, so a narrow of a large tensor keeps all of it alive. Weights come from a
//! shadow of the residency (`memory/residency.rs`) with the same resident / phase / stream /
//! cpu rules, so a stream window, an eviction or a prefetch lands at the same moment.
//!
//! The result is, per phase, the largest simultaneously-live bytes (split into weights,
//! activations and workspace at that moment), the host-side bytes of components placed on the
//! CPU, and per stage the FLOPs, the elementwise traffic and the weight bytes transferred, from
//! which the planner derives time.
//!
//! When a network in `model/` changes the order of its ops, this file must follow: the
//! `planner_accuracy` test holds the two against each other with the counting allocator.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use candle_core::DType;

use crate::memory::plan::{ComponentKind, Placement};
use crate::memory::residency::{evict_groups, group_to_prefetch};

/// What a block of bytes is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cat {
    Weights = 0,
    Act = 1,
    Work = 2,
}

/// How convolutions allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvImpl {
    /// candle's CPU kernel: NHWC copy of the input, a copy of the kernel, and per thread one
    /// im2col tile of 512 output pixels; 1×1 convolutions as a matmul on a copy of the input.
    CpuTiled { threads: usize },
    /// candle's CUDA kernel without cuDNN: the full im2col matrix (k²·C_in per output pixel),
    /// the matmul result and its NCHW copy.
    Im2col,
}

/// How the device behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimConfig {
    /// The compute device is the CPU: host and device memory are the same heap.
    pub host_is_device: bool,
    pub conv: ConvImpl,
    /// Largest transient packing buffer of one CPU matmul (gemm), bytes.
    pub gemm_workspace: usize,
    /// Threads of the CPU (host side) for its conv tiles.
    pub host_threads: usize,
}

#[derive(Debug, Default, Clone)]
struct Acc {
    live: [u64; 3],
    peak: u64,
    at_peak: [u64; 3],
    weights_peak: u64,
}

impl Acc {
    fn total(&self) -> u64 {
        self.live.iter().sum()
    }
    fn alloc(&mut self, cat: Cat, bytes: u64) {
        self.live[cat as usize] += bytes;
        let t = self.total();
        if t > self.peak {
            self.peak = t;
            self.at_peak = self.live;
        }
        self.weights_peak = self.weights_peak.max(self.live[0]);
    }
    fn free(&mut self, cat: Cat, bytes: u64) {
        self.live[cat as usize] -= bytes;
    }
    fn reset_peak(&mut self) {
        self.peak = self.total();
        self.at_peak = self.live;
        self.weights_peak = self.live[0];
    }
}

struct Blk {
    bytes: u64,
    cat: Cat,
    acc: Rc<RefCell<Acc>>,
}

impl Drop for Blk {
    fn drop(&mut self) {
        self.acc.borrow_mut().free(self.cat, self.bytes);
    }
}

/// A shadow tensor: element count, dtype, contiguity, and a shared storage block.
#[derive(Clone)]
pub(crate) struct T {
    /// Held for its `Drop`: the last handle frees the bytes.
    #[allow(dead_code)]
    blk: Rc<Blk>,
    pub n: usize,
    pub dt: DType,
    pub contig: bool,
}

impl T {
    /// A strided view of the same storage (`transpose`, `permute`, `narrow` of an inner dim).
    pub fn nc(&self) -> T {
        T {
            contig: false,
            ..self.clone()
        }
    }
    /// A view of `n` elements of the same storage.
    pub fn part(&self, n: usize, contig: bool) -> T {
        T {
            n,
            contig,
            ..self.clone()
        }
    }
}

/// Work of one stage (or of the code between stages), for the time model.
#[derive(Debug, Clone, Default)]
pub struct Segment {
    pub component: Option<ComponentKind>,
    pub stage: String,
    /// Stream group index, for streamed components.
    pub group: Option<usize>,
    /// Computed on the host while the compute device is another one.
    pub host: bool,
    pub flops: f64,
    /// Of which: convolutions.
    pub conv_flops: f64,
    /// Bytes written and read by non-matmul ops.
    pub traffic: f64,
    /// Weight bytes brought to the device before this stage can compute.
    pub sync_bytes: f64,
    /// Weight bytes prefetched while this stage computes.
    pub async_bytes: f64,
    /// Whether the weights are streamed from the host on every pass (time on the link).
    pub streamed: bool,
}

/// What one phase held.
#[derive(Debug, Clone, Default)]
pub struct PhaseStat {
    pub name: &'static str,
    /// Largest bytes live on the compute device.
    pub peak: u64,
    /// Weights, activations and workspace at that moment.
    pub at_peak: [u64; 3],
    /// Largest weights held at any moment of the phase.
    pub weights_peak: u64,
    /// Largest host bytes of components computing on the CPU (when the device is not the CPU).
    pub host_peak: u64,
    pub segments: Vec<Segment>,
    /// Denoising passes simulated (the flow model's segments are per pass).
    pub passes: usize,
}

pub(crate) struct Sim {
    pub cfg: SimConfig,
    dev: Rc<RefCell<Acc>>,
    host: Rc<RefCell<Acc>>,
    on_host: Cell<bool>,
    segs: RefCell<Vec<Segment>>,
    phase: Cell<Option<&'static str>>,
    pub phases: RefCell<Vec<PhaseStat>>,
}

const F32: DType = DType::F32;

impl Sim {
    pub fn new(cfg: SimConfig) -> Self {
        let dev = Rc::new(RefCell::new(Acc::default()));
        let host = if cfg.host_is_device {
            dev.clone()
        } else {
            Rc::new(RefCell::new(Acc::default()))
        };
        Self {
            cfg,
            dev,
            host,
            on_host: Cell::new(false),
            segs: RefCell::new(vec![Segment::default()]),
            phase: Cell::new(None),
            phases: RefCell::new(Vec::new()),
        }
    }

    /// Whether ops now run on the CPU (the device is the CPU, or a cpu-placed component runs).
    fn cpu_side(&self) -> bool {
        self.cfg.host_is_device || self.on_host.get()
    }

    fn acc(&self) -> Rc<RefCell<Acc>> {
        if self.on_host.get() {
            self.host.clone()
        } else {
            self.dev.clone()
        }
    }

    /// Runs `f` with allocations on the host (a cpu-placed component while the device is a GPU).
    pub fn on_host<R>(&self, host: bool, f: impl FnOnce() -> R) -> R {
        let before = self.on_host.replace(host && !self.cfg.host_is_device);
        let r = f();
        self.on_host.set(before);
        r
    }

    pub fn host_side(&self) -> bool {
        self.on_host.get()
    }

    fn block(&self, cat: Cat, bytes: u64) -> Rc<Blk> {
        let acc = self.acc();
        acc.borrow_mut().alloc(cat, bytes);
        Rc::new(Blk { bytes, cat, acc })
    }

    /// A new activation of `n` elements.
    pub fn act(&self, n: usize, dt: DType) -> T {
        T {
            blk: self.block(Cat::Act, (n * dt.size_in_bytes()) as u64),
            n,
            dt,
            contig: true,
        }
    }

    /// A new device-side activation, wherever ops run now (a transfer's destination).
    pub fn act_on_device(&self, n: usize, dt: DType) -> T {
        let before = self.on_host.replace(false);
        let t = self.act(n, dt);
        self.on_host.set(before);
        t
    }

    /// A workspace buffer held until dropped.
    pub fn work(&self, bytes: usize) -> T {
        T {
            blk: self.block(Cat::Work, bytes as u64),
            n: bytes,
            dt: DType::U8,
            contig: true,
        }
    }

    /// A workspace buffer allocated and freed at once (it only raises the peak).
    pub fn transient(&self, bytes: usize) {
        drop(self.work(bytes));
    }

    /// Packed weights dequantized into `bytes` of dense weights on the device: a read of the
    /// blocks and a write of the result.
    pub fn dequantize(&self, bytes: usize) -> T {
        self.seg().traffic += 1.5 * bytes as f64;
        self.weights(bytes)
    }

    pub fn weights(&self, bytes: usize) -> T {
        T {
            blk: self.block(Cat::Weights, bytes as u64),
            n: bytes,
            dt: DType::U8,
            contig: true,
        }
    }

    fn seg(&self) -> std::cell::RefMut<'_, Segment> {
        std::cell::RefMut::map(self.segs.borrow_mut(), |s| {
            s.last_mut().expect("a segment is open")
        })
    }

    /// Starts the segment of a stage.
    pub fn begin_stage(&self, c: ComponentKind, stage: &str, group: Option<usize>, streamed: bool) {
        let host = self.on_host.get();
        self.segs.borrow_mut().push(Segment {
            component: Some(c),
            stage: stage.to_string(),
            group,
            host,
            streamed,
            ..Segment::default()
        });
    }

    pub fn transfer(&self, bytes: usize, prefetch: bool) {
        let mut s = self.seg();
        if prefetch {
            s.async_bytes += bytes as f64;
        } else {
            s.sync_bytes += bytes as f64;
        }
    }

    /// An elementwise (or copy) op's output.
    pub fn ew(&self, n: usize, dt: DType) -> T {
        self.seg().traffic += 2.0 * (n * dt.size_in_bytes()) as f64;
        self.act(n, dt)
    }

    /// `[m, k] × [k, n]`.
    pub fn mm(&self, m: usize, n: usize, k: usize, dt: DType) -> T {
        self.bmm(1, m, n, k, dt)
    }

    /// `b` matmuls `[m, k] × [k, n]`.
    pub fn bmm(&self, b: usize, m: usize, n: usize, k: usize, dt: DType) -> T {
        self.seg().flops += 2.0 * (b * m) as f64 * n as f64 * k as f64;
        let out = self.act(b * m * n, dt);
        if self.cpu_side() {
            self.transient(gemm_packing(m, n, k, dt.size_in_bytes()).min(self.cfg.gemm_workspace));
        }
        out
    }

    /// `to_dtype`: a view when the dtype is the same.
    pub fn cast(&self, x: &T, dt: DType) -> T {
        if x.dt == dt {
            T { dt, ..x.clone() }
        } else {
            self.ew(x.n, dt)
        }
    }

    /// `contiguous()`, or a `reshape` that must copy a strided view.
    pub fn cont(&self, x: &T) -> T {
        if x.contig {
            x.clone()
        } else {
            self.ew(x.n, x.dt)
        }
    }

    pub fn begin_phase(&self, name: &'static str) {
        self.end_phase();
        self.phase.set(Some(name));
        self.dev.borrow_mut().reset_peak();
        self.host.borrow_mut().reset_peak();
        self.segs.replace(vec![Segment::default()]);
    }

    pub fn end_phase(&self) {
        let Some(name) = self.phase.take() else {
            return;
        };
        let d = self.dev.borrow().clone();
        let host_peak = if self.cfg.host_is_device {
            0
        } else {
            self.host.borrow().peak
        };
        self.phases.borrow_mut().push(PhaseStat {
            name,
            peak: d.peak,
            at_peak: d.at_peak,
            weights_peak: d.weights_peak,
            host_peak,
            segments: self.segs.replace(vec![Segment::default()]),
            passes: 1,
        });
    }

    // ---- ops of model/ops.rs ----

    /// `ops::linear`: `x.reshape((rows, in))` (a copy if x is strided, dropped after the matmul),
    /// the matmul, and a new tensor for the bias.
    pub fn linear(&self, x: &T, rows: usize, inp: usize, out: usize, bias: bool) -> T {
        let xr = self.cont(x);
        let y = self.mm(rows, out, inp, x.dt);
        drop(xr);
        if bias {
            let yb = self.ew(rows * out, x.dt);
            drop(y);
            yb
        } else {
            y
        }
    }

    /// `ops::layer_norm_plain`.
    pub fn layer_norm_plain(&self, x: &T) -> T {
        let xf = self.cast(x, F32);
        let centred = self.ew(x.n, F32);
        drop(self.ew(x.n, F32)); // sqr, reduced at once
        let y = self.ew(x.n, F32);
        let out = self.cast(&y, x.dt);
        drop(y);
        drop(centred);
        drop(xf);
        out
    }

    /// `ops::layer_norm` (with affine weight and bias, applied in f32).
    pub fn layer_norm(&self, x: &T) -> T {
        let y = {
            let x32 = self.cast(x, F32);
            self.layer_norm_plain(&x32)
        };
        let m = self.ew(x.n, F32);
        let a = self.ew(x.n, F32);
        let out = self.cast(&a, x.dt);
        drop(a);
        drop(m);
        drop(y);
        out
    }

    /// `ops::rms_norm`.
    pub fn rms_norm(&self, x: &T) -> T {
        let xf = self.cast(x, F32);
        drop(self.ew(x.n, F32)); // sqr
        let y = {
            let d = self.ew(x.n, F32);
            self.cast(&d, x.dt)
        };
        let out = self.ew(x.n, x.dt);
        drop(y);
        drop(xf);
        out
    }

    /// `ops::modulate`: a multiply and an add.
    pub fn modulate(&self, x: &T) -> T {
        let m = self.ew(x.n, x.dt);
        let out = self.ew(x.n, x.dt);
        drop(m);
        out
    }

    /// Softmax attention (`model/attention.rs`) of `heads` heads, `lq` queries, `lk` keys of
    /// width `d`. `q_chunk_contig`: whether a query chunk is contiguous as is; `kt_contig`:
    /// whether `k.t()` is (the VAE's transposed tokens); `v.contiguous()` copies per chunk when
    /// v is strided.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &T,
        k: &T,
        v: &T,
        heads: usize,
        lq: usize,
        lk: usize,
        d: usize,
        chunk: Option<usize>,
        kt_contig: bool,
    ) -> T {
        let dt = q.dt;
        let kt = if kt_contig {
            k.clone()
        } else {
            self.ew(k.n, k.dt)
        };
        let block = |c: usize, whole: bool| -> T {
            let s2 = {
                // A chunk of queries is a narrow along the token axis: contiguous only with one
                // head and contiguous queries.
                let qc = if q.contig && (whole || heads == 1) {
                    q.clone()
                } else {
                    self.ew(heads * c * d, dt)
                };
                let mm = self.bmm(heads, c, lk, d, dt);
                let s2 = self.ew(heads * c * lk, dt);
                drop(mm);
                drop(qc);
                s2
            };
            let p = {
                let s32 = self.cast(&s2, F32);
                let p32 = self.ew(heads * c * lk, F32);
                let p = self.cast(&p32, v.dt);
                drop(p32);
                drop(s32);
                p
            };
            let out = {
                let vc = self.cont(v);
                let out = self.bmm(heads, c, d, lk, dt);
                drop(vc);
                out
            };
            drop(p);
            drop(s2);
            out
        };
        let out = match chunk {
            Some(c) if c < lq => {
                let mut outs = Vec::new();
                let mut start = 0;
                while start < lq {
                    let n = c.min(lq - start);
                    outs.push(block(n, false));
                    start += n;
                }
                self.ew(heads * lq * d, dt)
            }
            _ => block(lq, true),
        };
        drop(kt);
        out
    }

    /// `attention::apply_rope` on a contiguous `x`.
    pub fn rope(&self, x: &T) -> T {
        let xf = self.cast(x, F32);
        let half = x.n / 2;
        let o0 = {
            let a = self.ew(half, F32);
            let b = self.ew(half, F32);
            let o = self.ew(half, F32);
            drop(b);
            drop(a);
            o
        };
        let o1 = {
            let a = self.ew(half, F32);
            let b = self.ew(half, F32);
            let o = self.ew(half, F32);
            drop(b);
            drop(a);
            o
        };
        // `Tensor::stack(&[out0, out1], ..)` moves both halves into a temporary array.
        let st = self.ew(x.n, F32);
        drop(o1);
        drop(o0);
        let out = self.cast(&st, x.dt);
        drop(st);
        drop(xf);
        out
    }

    /// `Tensor::conv2d` plus the bias add of `autoencoder::conv`.
    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        &self,
        x: &T,
        c_in: usize,
        c_out: usize,
        k: usize,
        hw_in: usize,
        hw_out: usize,
        stride1_pad_ok: bool,
    ) -> T {
        let dt = x.dt;
        let es = dt.size_in_bytes();
        let f = 2.0 * (c_out * c_in * k * k) as f64 * hw_out as f64;
        {
            let mut seg = self.seg();
            seg.flops += f;
            seg.conv_flops += f;
            // The im2col matrix is written and read once.
            seg.traffic += 2.0 * (hw_out * k * k * c_in * es) as f64;
        }
        let y = match (self.cfg.conv, self.cpu_side()) {
            (_, true) | (ConvImpl::CpuTiled { .. }, false) => {
                let threads = match self.cfg.conv {
                    ConvImpl::CpuTiled { threads } if !self.on_host.get() => threads,
                    _ => self.cfg.host_threads,
                };
                if k == 1 && stride1_pad_ok {
                    let dst = self.act(c_out * hw_out, dt);
                    let inp = self.work(c_in * hw_in * es);
                    let res = self.act(c_out * hw_out, dt);
                    self.transient(
                        gemm_packing(c_out, hw_out, c_in, es).min(self.cfg.gemm_workspace),
                    );
                    drop(res);
                    drop(inp);
                    dst
                } else {
                    let dst = self.act(c_out * hw_out, dt);
                    let inp = self.work(c_in * hw_in * es);
                    let kf = self.work(c_out * c_in * k * k * es);
                    let tiles = hw_out.div_ceil(512).min(threads.max(1));
                    let tile = 512.min(hw_out);
                    self.transient(tiles * ((k * k * c_in + c_out) * tile * es + tile * 16));
                    drop(kf);
                    drop(inp);
                    dst
                }
            }
            (ConvImpl::Im2col, false) => {
                let col = self.work(hw_out * k * k * c_in * es);
                let res = self.act(hw_out * c_out, dt);
                let out = self.act(hw_out * c_out, dt);
                drop(res);
                drop(col);
                out
            }
        };
        let o = self.ew(c_out * hw_out, dt);
        drop(y);
        o
    }
}

/// The packing buffer the `gemm` crate allocates for one row-major `[m, k] × [k, n]` product
/// (freed when the call returns). gemm computes the transposed product, so the output's columns
/// `n` are its rows: with more than 128 micro-rows (2048) it packs the other operand, `kc × m`
/// values; with at most two register blocks (256) it pre-packs `kc × n`; in between nothing.
/// `kc` is the depth split into panels of at most 1024 (the L1-derived panel depth of a 48 KiB,
/// 12-way L1; 512 on 32 KiB, 8-way ones, where this overestimates).
pub(crate) fn gemm_packing(m: usize, n: usize, k: usize, es: usize) -> usize {
    let kc = k.div_ceil(k.div_ceil(1024).max(1));
    if n > 2048 {
        kc * m * es
    } else if n <= 256 {
        kc * n * es
    } else {
        0
    }
}

// ---- the residency's shadow ----

/// One stage: its name, bytes on the device in the compute dtype, host staging bytes while it
/// is materialised (0 when its tensors are read as they are stored).
#[derive(Debug, Clone)]
pub struct StageCost {
    pub name: String,
    /// Device bytes as held (packed tensors at their stored size).
    pub bytes: usize,
    pub staging: usize,
    /// `+packed`: bytes of the packed tensors dequantized to the compute dtype, a transient
    /// the network holds while it computes the stage.
    pub unpacked: usize,
}

#[derive(Default)]
struct Held {
    held: HashMap<usize, T>,
    groups: VecDeque<(usize, T)>,
    pending: Option<(usize, T)>,
    current: Option<usize>,
    start: Option<usize>,
    repeats: bool,
}

/// `memory/residency.rs`'s rules over sizes.
pub(crate) struct ShadowWeights {
    pub kind: ComponentKind,
    pub placement: Placement,
    pub dtype: DType,
    stages: Vec<StageCost>,
    index: HashMap<String, usize>,
    state: RefCell<Held>,
}

impl ShadowWeights {
    pub fn new(
        kind: ComponentKind,
        placement: Placement,
        dtype: DType,
        stages: Vec<StageCost>,
    ) -> Self {
        let placement = placement.normalised();
        let index = stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        Self {
            kind,
            placement,
            dtype,
            stages,
            index,
            state: RefCell::new(Held::default()),
        }
    }

    /// Whether this component computes on the host.
    pub fn on_cpu(&self) -> bool {
        self.placement == Placement::Cpu
    }

    fn materialise(&self, sim: &Sim, range: std::ops::Range<usize>, prefetch: bool) -> T {
        let bytes: usize = self.stages[range.clone()].iter().map(|s| s.bytes).sum();
        let staging = self.stages[range]
            .iter()
            .map(|s| s.staging)
            .max()
            .unwrap_or(0);
        let w = sim.weights(bytes);
        // The storage-dtype copy of the largest tensor, on the heap while it is converted.
        if staging > 0 && (sim.cfg.host_is_device || sim.host_side()) {
            sim.transient(staging);
        }
        if !(sim.cfg.host_is_device || self.on_cpu()) {
            sim.transfer(bytes, prefetch);
        }
        w
    }

    /// `Weights::stage`.
    pub fn stage(&self, sim: &Sim, name: &str) -> T {
        let idx = self.index[name];
        let streamed = matches!(self.placement, Placement::Stream { .. });
        let group = match self.placement {
            Placement::Stream { group, .. } => Some(idx / group),
            _ => None,
        };
        sim.begin_stage(self.kind, name, group, streamed);
        if let Placement::Stream { group, window } = self.placement {
            let held = self.stream_stage(sim, idx, group, window);
            return self.unpacked(sim, idx, held);
        }
        let held = {
            let mut st = self.state.borrow_mut();
            match st.held.get(&idx) {
                Some(t) => t.clone(),
                None => {
                    let t = self.materialise(sim, idx..idx + 1, false);
                    st.held.insert(idx, t.clone());
                    t
                }
            }
        };
        self.unpacked(sim, idx, held)
    }

    /// `Shared::unpacked`: the held stage, or its packed tensors dequantized into a transient.
    fn unpacked(&self, sim: &Sim, idx: usize, held: T) -> T {
        match self.stages[idx].unpacked {
            0 => held,
            n => sim.dequantize(n),
        }
    }

    fn stream_stage(&self, sim: &Sim, idx: usize, group: usize, window: usize) -> T {
        let g = idx / group;
        let mut st = self.state.borrow_mut();
        if st.current != Some(g) || !st.groups.iter().any(|(h, _)| *h == g) {
            self.enter(sim, &mut st, g, group, window);
        }
        st.groups
            .iter()
            .find(|(h, _)| *h == g)
            .map(|(_, t)| t.clone())
            .expect("the entered group is held")
    }

    fn evict(st: &mut Held, limit: usize, keep: usize) {
        evict_groups(&mut st.groups, st.pending.is_some(), limit, keep);
    }

    fn enter(&self, sim: &Sim, st: &mut Held, g: usize, group: usize, window: usize) {
        let n = self.stages.len();
        let ngroups = n.div_ceil(group);
        let range = |g: usize| g * group..((g + 1) * group).min(n);
        if st.current.is_some() && st.start == Some(g) {
            st.repeats = true;
        }
        st.start.get_or_insert(g);
        if let Some(pos) = st.groups.iter().position(|(h, _)| *h == g) {
            let e = st.groups.remove(pos).expect("in range");
            st.groups.push_back(e);
        } else {
            let mut got = None;
            if let Some((h, t)) = st.pending.take() {
                if h == g {
                    got = Some(t);
                } else {
                    st.groups.push_front((h, t));
                }
            }
            let t = match got {
                Some(t) => t,
                None => {
                    Self::evict(st, window.saturating_sub(1), g);
                    self.materialise(sim, range(g), false)
                }
            };
            st.groups.push_back((g, t));
        }
        st.current = Some(g);
        let next = group_to_prefetch(g, ngroups, st.repeats, st.start, &st.groups);
        if let (Some(next), true) = (next, window >= 2) {
            Self::evict(st, window - 1, g);
            let t = self.materialise(sim, range(next), true);
            st.pending = Some((next, t));
        }
        Self::evict(st, window, g);
    }

    /// End of the component's phase.
    pub fn release(&self) {
        if self.placement != Placement::Resident {
            *self.state.borrow_mut() = Held::default();
        }
    }
}
