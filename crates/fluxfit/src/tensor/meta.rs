//! Size-only tensors: [`Meta`] carries a layout (candle's own [`Layout`]), a dtype and a shared
//! storage block, and every method allocates, shares or frees *bytes* as candle's method of the
//! same name does, on a [`Heap`] that keeps the live bytes, their peak per phase and the cost of
//! each stage of work. Running a network over `Meta` is running its code on shapes.
//!
//! What candle does, and so what is counted here:
//! - views share their storage (`narrow`, `transpose`, `permute`, `get`, `chunk`, `squeeze`,
//!   `unsqueeze`, a `reshape` or `flatten_all` of a contiguous tensor, a `to_dtype` or
//!   `to_device` that changes nothing): a view of a large tensor keeps all of it alive;
//! - `contiguous` and a `reshape` of a strided view copy; `cat` allocates its output once;
//! - every arithmetic op allocates its output (contiguous), and a value's bytes are freed when
//!   the last tensor sharing them is dropped, where Rust drops it;
//! - kernels' own buffers: the CPU matmul's packing buffer (gemm), the CPU convolution's NHWC
//!   copy, kernel copy and per-thread im2col tiles, the GPU convolution's full im2col matrix.
//!
//! Costs per stage: FLOPs (matmuls and convolutions), bytes written and read by the other ops,
//! weight bytes transferred; the planner turns them into time.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use candle_core::shape::Dim;
use candle_core::{DType, Layout, Shape};

use super::{HostBuffer, Tensor};
use crate::component::Phase;
use crate::error::Result;

/// What a block of bytes is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cat {
    Weights = 0,
    Act = 1,
    Work = 2,
}

/// How convolutions allocate on the compute device.
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
pub struct MetaConfig {
    /// The compute device is the CPU: host and device memory are the same heap.
    pub host_is_device: bool,
    pub conv: ConvImpl,
    /// Largest transient packing buffer of one CPU matmul (gemm), bytes.
    pub gemm_workspace: usize,
    /// Threads of the CPU (host side) for its conv tiles.
    pub host_threads: usize,
    /// The networks use fused norm and RoPE kernels (`Tensor::fused_kernels`; CUDA).
    pub fused: bool,
    /// The networks use fluxfit's own CPU kernels for f32 (`Tensor::cpu_kernels`).
    pub cpu_kernels: bool,
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

/// A storage block; its bytes are freed when the last tensor sharing it is dropped.
pub struct Block {
    bytes: u64,
    cat: Cat,
    acc: Rc<RefCell<Acc>>,
}

impl Drop for Block {
    fn drop(&mut self) {
        self.acc.borrow_mut().free(self.cat, self.bytes);
    }
}

/// Work of one stage (or of the code between stages), for the time model.
#[derive(Debug, Clone, Default)]
pub struct Segment {
    /// Who opened it ([`Heap::begin_segment`]): an index the caller gives meaning to.
    pub owner: Option<usize>,
    pub stage: String,
    /// Stream group index, for streamed weights.
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
#[derive(Debug, Clone)]
pub struct PhaseStat {
    pub name: Phase,
    /// Largest bytes live on the compute device.
    pub peak: u64,
    /// Weights, activations and workspace at that moment.
    pub at_peak: [u64; 3],
    /// Largest weights held at any moment of the phase.
    pub weights_peak: u64,
    /// Largest host bytes (when the device is not the CPU).
    pub host_peak: u64,
    pub segments: Vec<Segment>,
    /// Denoising passes run (the flow model's segments are per pass).
    pub passes: usize,
}

/// The bytes live on the compute device and on the host, per phase, and the work done.
pub struct Heap {
    pub cfg: MetaConfig,
    dev: Rc<RefCell<Acc>>,
    host: Rc<RefCell<Acc>>,
    segs: RefCell<Vec<Segment>>,
    phase: Cell<Option<Phase>>,
    phases: RefCell<Vec<PhaseStat>>,
}

impl Heap {
    pub fn new(cfg: MetaConfig) -> Rc<Self> {
        let dev = Rc::new(RefCell::new(Acc::default()));
        let host = if cfg.host_is_device {
            dev.clone()
        } else {
            Rc::new(RefCell::new(Acc::default()))
        };
        Rc::new(Self {
            cfg,
            dev,
            host,
            segs: RefCell::new(vec![Segment::default()]),
            phase: Cell::new(None),
            phases: RefCell::new(Vec::new()),
        })
    }

    /// The compute device.
    pub fn device(self: &Rc<Self>) -> MetaDevice {
        MetaDevice {
            heap: self.clone(),
            host: self.cfg.host_is_device,
        }
    }

    /// The host (the compute device itself when that is the CPU).
    pub fn host(self: &Rc<Self>) -> MetaDevice {
        MetaDevice {
            heap: self.clone(),
            host: true,
        }
    }

    fn acc(&self, host: bool) -> Rc<RefCell<Acc>> {
        if host {
            self.host.clone()
        } else {
            self.dev.clone()
        }
    }

    /// A block of `bytes` on `device`, freed when the returned handle and its views are gone.
    pub fn block(&self, device: &MetaDevice, cat: Cat, bytes: usize) -> Rc<Block> {
        let acc = self.acc(device.host);
        acc.borrow_mut().alloc(cat, bytes as u64);
        Rc::new(Block {
            bytes: bytes as u64,
            cat,
            acc,
        })
    }

    /// A workspace buffer allocated and freed at once (it only raises the peak).
    pub fn transient(&self, device: &MetaDevice, bytes: usize) {
        drop(self.block(device, Cat::Work, bytes));
    }

    fn seg(&self) -> std::cell::RefMut<'_, Segment> {
        std::cell::RefMut::map(self.segs.borrow_mut(), |s| {
            s.last_mut().expect("a segment is open")
        })
    }

    /// Starts the segment of a stage: the work that follows is counted to it.
    pub fn begin_segment(
        &self,
        owner: usize,
        stage: &str,
        group: Option<usize>,
        streamed: bool,
        host: bool,
    ) {
        self.segs.borrow_mut().push(Segment {
            owner: Some(owner),
            stage: stage.to_string(),
            group,
            host: host && !self.cfg.host_is_device,
            streamed,
            ..Segment::default()
        });
    }

    /// Weight bytes moved to the device for the current segment (`prefetch`: overlapping it).
    pub fn transfer(&self, bytes: usize, prefetch: bool) {
        let mut s = self.seg();
        if prefetch {
            s.async_bytes += bytes as f64;
        } else {
            s.sync_bytes += bytes as f64;
        }
    }

    /// Bytes written and read by an op that is not a matmul.
    pub fn traffic(&self, bytes: f64) {
        self.seg().traffic += bytes;
    }

    fn flops(&self, f: f64, conv: bool) {
        let mut s = self.seg();
        s.flops += f;
        if conv {
            s.conv_flops += f;
        }
    }

    pub fn begin_phase(&self, name: Phase) {
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

    /// The phases recorded so far.
    pub fn take_phases(&self) -> Vec<PhaseStat> {
        self.end_phase();
        self.phases.take()
    }
}

/// A side of a [`Heap`]: the compute device, or the host.
#[derive(Clone)]
pub struct MetaDevice {
    heap: Rc<Heap>,
    host: bool,
}

impl std::fmt::Debug for MetaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.host {
            "meta:host"
        } else {
            "meta:device"
        })
    }
}

impl MetaDevice {
    pub fn heap(&self) -> &Rc<Heap> {
        &self.heap
    }

    /// Whether ops here run on the CPU.
    fn cpu(&self) -> bool {
        self.host || self.heap.cfg.host_is_device
    }
}

/// A size-only tensor. See the module doc.
#[derive(Clone)]
pub struct Meta {
    layout: Layout,
    dtype: DType,
    /// Held for its `Drop`: the last tensor sharing the block frees its bytes.
    #[allow(dead_code)]
    storage: Rc<Block>,
    device: MetaDevice,
}

/// A block-quantized Linear weight `[out, in]`, for `+qmatmul` plans.
#[derive(Debug, Clone, Copy)]
pub struct MetaQWeight {
    pub out: usize,
    pub inp: usize,
}

/// The packing buffer the `gemm` crate allocates for one row-major `[m, k] × [k, n]` product
/// (freed when the call returns). gemm computes the transposed product, so the output's columns
/// `n` are its rows: with more than 128 micro-rows (2048) it packs the other operand, `kc × m`
/// values; with at most two register blocks (256) it pre-packs `kc × n`; in between nothing.
/// `kc` is the depth split into panels of at most 1024 (the L1-derived panel depth of a 48 KiB,
/// 12-way L1; 512 on 32 KiB, 8-way ones, where this overestimates).
pub fn gemm_packing(m: usize, n: usize, k: usize, es: usize) -> usize {
    let kc = k.div_ceil(k.div_ceil(1024).max(1));
    if n > 2048 {
        kc * m * es
    } else if n <= 256 {
        kc * n * es
    } else {
        0
    }
}

fn bytes_of(dims: &[usize], dtype: DType) -> usize {
    dims.iter().product::<usize>() * dtype.size_in_bytes()
}

fn index<D: Dim>(dims: &[usize], d: D, op: &'static str) -> Result<usize> {
    Ok(d.to_index(&Shape::from(dims), op)?)
}

/// Broadcast shape of two operands (numpy rules), as candle's `broadcast_*` ops compute it.
fn broadcast(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    Ok(Shape::from(a)
        .broadcast_shape_binary_op(&Shape::from(b), "broadcast")?
        .dims()
        .to_vec())
}

/// Whether candle's `cat` can copy `l` as 2-D blocks along `dim` (`Layout::outer_stride_for_dim`).
fn copy2d_compatible(l: &Layout, dim: usize) -> bool {
    if l.is_contiguous() {
        return true;
    }
    let (dims, strides) = (l.dims(), l.stride());
    let mut expected = 1usize;
    for i in (dim..dims.len()).rev() {
        if strides[i] != expected {
            return false;
        }
        expected *= dims[i];
    }
    if dim == 0 {
        return true;
    }
    let mut expected_outer = strides[dim - 1];
    for k in (0..dim - 1).rev() {
        expected_outer *= dims[k + 1];
        if strides[k] != expected_outer {
            return false;
        }
    }
    true
}

impl Meta {
    /// A new contiguous tensor on `device` (an activation).
    pub fn alloc(dims: &[usize], dtype: DType, device: &MetaDevice) -> Self {
        Self::alloc_as(dims, dtype, device, Cat::Act)
    }

    fn alloc_as(dims: &[usize], dtype: DType, device: &MetaDevice, cat: Cat) -> Self {
        let storage = device.heap.block(device, cat, bytes_of(dims, dtype));
        Self {
            layout: Layout::contiguous(dims),
            dtype,
            storage,
            device: device.clone(),
        }
    }

    /// A weight of `dims` stored in `block` (which the caller has counted).
    pub fn in_block(block: &Rc<Block>, dims: &[usize], dtype: DType, device: &MetaDevice) -> Self {
        Self {
            layout: Layout::contiguous(dims),
            dtype,
            storage: block.clone(),
            device: device.clone(),
        }
    }

    fn heap(&self) -> &Heap {
        &self.device.heap
    }

    fn view(&self, layout: Layout) -> Self {
        Self {
            layout,
            ..self.clone()
        }
    }

    /// The output of an elementwise op (written once, its inputs read once).
    fn ew(&self, dims: &[usize], dtype: DType) -> Self {
        self.heap().traffic(2.0 * bytes_of(dims, dtype) as f64);
        Self::alloc(dims, dtype, &self.device)
    }

    fn unary(&self) -> Result<Self> {
        Ok(self.ew(self.dims(), self.dtype))
    }

    fn binary(&self, rhs: &Self) -> Result<Self> {
        let dims = broadcast(self.dims(), rhs.dims())?;
        Ok(self.ew(&dims, self.dtype))
    }

    fn copy(&self) -> Self {
        self.ew(self.dims(), self.dtype)
    }
}

impl Tensor for Meta {
    type Device = MetaDevice;
    type QWeight = MetaQWeight;
    type Host = MetaHost;

    fn dims(&self) -> &[usize] {
        self.layout.dims()
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn device(&self) -> &MetaDevice {
        &self.device
    }
    fn is_contiguous(&self) -> bool {
        self.layout.is_contiguous()
    }
    fn host_of(device: &MetaDevice) -> MetaDevice {
        device.heap.host()
    }
    fn same_device(a: &MetaDevice, b: &MetaDevice) -> bool {
        a.host == b.host || a.heap.cfg.host_is_device
    }

    fn from_f32(
        shape: &[usize],
        device: &MetaDevice,
        _: impl FnOnce() -> Vec<f32>,
    ) -> Result<Self> {
        Ok(Self::alloc(shape, DType::F32, device))
    }
    fn from_u32(
        shape: &[usize],
        device: &MetaDevice,
        _: impl FnOnce() -> Vec<u32>,
    ) -> Result<Self> {
        Ok(Self::alloc(shape, DType::U32, device))
    }
    fn zeros(shape: &[usize], dtype: DType, device: &MetaDevice) -> Result<Self> {
        Ok(Self::alloc(shape, dtype, device))
    }

    fn reshape(&self, shape: &[usize]) -> Result<Self> {
        if shape.iter().product::<usize>() != self.elem_count() {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: Shape::from(self.dims()),
                rhs: Shape::from(shape),
                op: "reshape",
            }
            .into());
        }
        if self.is_contiguous() {
            Ok(self.view(Layout::contiguous_with_offset(
                shape,
                self.layout.start_offset(),
            )))
        } else {
            Ok(self.ew(shape, self.dtype))
        }
    }
    fn narrow<D: Dim>(&self, dim: D, start: usize, len: usize) -> Result<Self> {
        let d = index(self.dims(), dim, "narrow")?;
        Ok(self.view(self.layout.narrow(d, start, len)?))
    }
    fn transpose<D1: Dim, D2: Dim>(&self, a: D1, b: D2) -> Result<Self> {
        let a = index(self.dims(), a, "transpose")?;
        let b = index(self.dims(), b, "transpose")?;
        if a == b {
            return Ok(self.clone());
        }
        Ok(self.view(self.layout.transpose(a, b)?))
    }
    fn permute(&self, dims: &[usize]) -> Result<Self> {
        Ok(self.view(self.layout.permute(dims)?))
    }
    fn t(&self) -> Result<Self> {
        let r = self.dims().len();
        self.transpose(r - 2, r - 1)
    }
    fn get(&self, i: usize) -> Result<Self> {
        self.narrow(0, i, 1)?.squeeze(0)
    }
    fn chunk<D: Dim>(&self, chunks: usize, dim: D) -> Result<Vec<Self>> {
        let d = index(self.dims(), dim, "chunk")?;
        let size = self.dims()[d];
        if size < chunks {
            return (0..size).map(|i| self.narrow(d, i, 1)).collect();
        }
        let chunk_size = size / chunks;
        let cnt_additional = size % chunks;
        let mut out = Vec::with_capacity(chunks);
        let mut sum = 0;
        for i in 0..chunks {
            let len = chunk_size + usize::from(i < cnt_additional);
            out.push(self.narrow(d, sum, len)?);
            sum += len;
        }
        Ok(out)
    }
    fn squeeze<D: Dim>(&self, dim: D) -> Result<Self> {
        let d = index(self.dims(), dim, "squeeze")?;
        if self.dims()[d] != 1 {
            return Ok(self.clone());
        }
        let mut dims = self.dims().to_vec();
        let mut strides = self.layout.stride().to_vec();
        dims.remove(d);
        strides.remove(d);
        Ok(self.view(Layout::new(
            dims.into(),
            strides,
            self.layout.start_offset(),
        )))
    }
    fn unsqueeze<D: Dim>(&self, dim: D) -> Result<Self> {
        let d = dim.to_index_plus_one(&Shape::from(self.dims()), "unsqueeze")?;
        let mut dims = self.dims().to_vec();
        let mut strides = self.layout.stride().to_vec();
        dims.insert(d, 1);
        let stride = if d < strides.len() { strides[d] } else { 1 };
        strides.insert(d, stride);
        Ok(self.view(Layout::new(
            dims.into(),
            strides,
            self.layout.start_offset(),
        )))
    }
    fn flatten_all(&self) -> Result<Self> {
        self.reshape(&[self.elem_count()])
    }
    fn contiguous(&self) -> Result<Self> {
        if self.is_contiguous() {
            Ok(self.clone())
        } else {
            Ok(self.copy())
        }
    }
    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        if dtype == self.dtype {
            Ok(self.clone())
        } else {
            Ok(self.ew(self.dims(), dtype))
        }
    }
    fn to_device(&self, device: &MetaDevice) -> Result<Self> {
        if Self::same_device(&self.device, device) {
            Ok(self.clone())
        } else {
            Ok(Self::alloc(self.dims(), self.dtype, device))
        }
    }
    fn cat<D: Dim>(parts: &[&Self], dim: D) -> Result<Self> {
        let first = parts[0];
        if parts.len() == 1 {
            return Ok(first.clone());
        }
        let d = index(first.dims(), dim, "cat")?;
        let mut dims = first.dims().to_vec();
        dims[d] = parts.iter().map(|p| p.dims()[d]).sum();
        let out = first.ew(&dims, first.dtype);
        if d == 0 || parts.iter().all(|p| copy2d_compatible(&p.layout, d)) {
            Ok(out)
        } else {
            // candle concatenates the transposed parts along dim 0 and transposes back.
            let mut t = dims.clone();
            t.swap(0, d);
            Ok(out.view(Layout::contiguous(t).transpose(0, d)?))
        }
    }
    fn stack<D: Dim>(parts: &[&Self], dim: D) -> Result<Self> {
        let d = dim.to_index_plus_one(&Shape::from(parts[0].dims()), "stack")?;
        let parts = parts
            .iter()
            .map(|p| p.unsqueeze(d))
            .collect::<Result<Vec<_>>>()?;
        Self::cat(&parts.iter().collect::<Vec<_>>(), d)
    }
    fn pad_with_zeros<D: Dim>(&self, dim: D, left: usize, right: usize) -> Result<Self> {
        if left == 0 && right == 0 {
            return Ok(self.clone());
        }
        let d = index(self.dims(), dim, "pad_with_zeros")?;
        let pad = |n: usize| {
            let mut dims = self.dims().to_vec();
            dims[d] = n;
            Self::alloc(&dims, self.dtype, &self.device)
        };
        let mut parts = Vec::new();
        if left > 0 {
            parts.push(pad(left));
        }
        parts.push(self.clone());
        if right > 0 {
            parts.push(pad(right));
        }
        Self::cat(&parts.iter().collect::<Vec<_>>(), d)
    }

    fn add(&self, rhs: &Self) -> Result<Self> {
        self.binary(rhs)
    }
    fn sub(&self, rhs: &Self) -> Result<Self> {
        self.binary(rhs)
    }
    fn mul(&self, rhs: &Self) -> Result<Self> {
        self.binary(rhs)
    }
    fn broadcast_add(&self, rhs: &Self) -> Result<Self> {
        self.binary(rhs)
    }
    fn broadcast_sub(&self, rhs: &Self) -> Result<Self> {
        self.binary(rhs)
    }
    fn broadcast_mul(&self, rhs: &Self) -> Result<Self> {
        self.binary(rhs)
    }
    fn broadcast_div(&self, rhs: &Self) -> Result<Self> {
        self.binary(rhs)
    }
    fn affine(&self, _: f64, _: f64) -> Result<Self> {
        self.unary()
    }
    fn sqr(&self) -> Result<Self> {
        self.unary()
    }
    fn sqrt(&self) -> Result<Self> {
        self.unary()
    }
    fn recip(&self) -> Result<Self> {
        self.unary()
    }
    fn exp(&self) -> Result<Self> {
        self.unary()
    }
    fn cos(&self) -> Result<Self> {
        self.unary()
    }
    fn sin(&self) -> Result<Self> {
        self.unary()
    }
    fn abs(&self) -> Result<Self> {
        self.unary()
    }
    fn relu(&self) -> Result<Self> {
        self.unary()
    }
    fn gelu(&self) -> Result<Self> {
        self.unary()
    }
    fn gelu_erf(&self) -> Result<Self> {
        self.unary()
    }
    fn silu(&self) -> Result<Self> {
        self.unary()
    }
    fn sigmoid(&self) -> Result<Self> {
        self.unary()
    }
    fn clamp(&self, _: f64, _: f64) -> Result<Self> {
        // `maximum` then `minimum`.
        let a = self.unary()?;
        a.unary()
    }
    fn mean_keepdim<D: Dim>(&self, dim: D) -> Result<Self> {
        let d = index(self.dims(), dim, "mean_keepdim")?;
        let mut dims = self.dims().to_vec();
        dims[d] = 1;
        // A sum, then the division.
        self.heap()
            .traffic(bytes_of(self.dims(), self.dtype) as f64);
        let sum = Self::alloc(&dims, self.dtype, &self.device);
        sum.unary()
    }
    fn softmax_last_dim(&self) -> Result<Self> {
        self.unary()
    }
    fn matmul(&self, rhs: &Self) -> Result<Self> {
        let (a, b) = (self.dims(), rhs.dims());
        let r = a.len();
        if r < 2 || b.len() != r || a[r - 1] != b[r - 2] {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: Shape::from(a),
                rhs: Shape::from(b),
                op: "matmul",
            }
            .into());
        }
        let (m, k, n) = (a[r - 2], a[r - 1], b[r - 1]);
        let batch: usize = a[..r - 2].iter().product();
        let mut dims = a.to_vec();
        dims[r - 1] = n;
        self.heap()
            .flops(2.0 * (batch * m) as f64 * n as f64 * k as f64, false);
        let out = Self::alloc(&dims, self.dtype, &self.device);
        if self.device.cpu() {
            let ws = gemm_packing(m, n, k, self.dtype.size_in_bytes());
            self.heap()
                .transient(&self.device, ws.min(self.heap().cfg.gemm_workspace));
        }
        Ok(out)
    }
    fn qmatmul(&self, w: &MetaQWeight) -> Result<Self> {
        let rows = self.elem_count() / w.inp;
        let mut dims = self.dims().to_vec();
        *dims.last_mut().expect("a matrix") = w.out;
        self.heap()
            .flops(2.0 * rows as f64 * w.out as f64 * w.inp as f64, false);
        let out = Self::alloc(&dims, DType::F32, &self.device);
        // The activations quantized to 8 bits for the dot products.
        self.heap().transient(&self.device, rows * w.inp);
        Ok(out)
    }
    fn conv2d(&self, kernel: &Self, padding: usize, stride: usize) -> Result<Self> {
        let (b, c_in, h, w) = self.dims4()?;
        let (c_out, _, kh, kw) = kernel.dims4()?;
        let oh = (h + 2 * padding - kh) / stride + 1;
        let ow = (w + 2 * padding - kw) / stride + 1;
        let (hw_in, hw_out) = (h * w, oh * ow);
        let es = self.dtype.size_in_bytes();
        let heap = self.heap();
        heap.flops(
            2.0 * (b * c_out * c_in * kh * kw) as f64 * hw_out as f64,
            true,
        );
        // The im2col matrix is written and read once.
        heap.traffic(2.0 * (b * hw_out * kh * kw * c_in * es) as f64);
        let dims = [b, c_out, oh, ow];
        let dev = &self.device;
        let work = |bytes: usize| heap.block(dev, Cat::Work, bytes);
        let out = match (heap.cfg.conv, dev.cpu()) {
            (_, true) | (ConvImpl::CpuTiled { .. }, false) => {
                let dst = Self::alloc(&dims, self.dtype, dev);
                let inp = work(b * c_in * hw_in * es);
                if kh == 1 && kw == 1 && padding == 0 && stride == 1 {
                    let res = Self::alloc(&dims, self.dtype, dev);
                    heap.transient(
                        dev,
                        gemm_packing(c_out, hw_out, c_in, es).min(heap.cfg.gemm_workspace),
                    );
                    drop(res);
                } else {
                    let kf = work(c_out * c_in * kh * kw * es);
                    let threads = heap.cfg.host_threads;
                    let tiles = hw_out.div_ceil(512).min(threads.max(1));
                    let tile = 512.min(hw_out);
                    heap.transient(
                        dev,
                        tiles * ((kh * kw * c_in + c_out) * tile * es + tile * 16),
                    );
                    drop(kf);
                }
                drop(inp);
                dst
            }
            (ConvImpl::Im2col, false) => {
                let col = work(b * hw_out * kh * kw * c_in * es);
                let res = Self::alloc(&dims, self.dtype, dev);
                let out = Self::alloc(&dims, self.dtype, dev);
                drop(res);
                drop(col);
                out
            }
        };
        Ok(out)
    }
    fn upsample_nearest2d(&self, h: usize, w: usize) -> Result<Self> {
        let (b, c, _, _) = self.dims4()?;
        Ok(self.ew(&[b, c, h, w], self.dtype))
    }
    fn index_select<D: Dim>(&self, ids: &Self, dim: D) -> Result<Self> {
        let d = index(self.dims(), dim, "index_select")?;
        let mut dims = self.dims().to_vec();
        dims[d] = ids.elem_count();
        Ok(self.ew(&dims, self.dtype))
    }
    fn max_abs(&self) -> Result<f32> {
        drop(self.unary()?);
        Ok(0.0)
    }
    fn all_finite(&self) -> Result<bool> {
        drop(self.unary()?);
        Ok(true)
    }
    fn fused_kernels(&self) -> bool {
        self.device.heap().cfg.fused || self.cpu_kernels()
    }
    fn rms_norm_fused(&self, _scale: &Self, _eps: f64) -> Result<Self> {
        self.contiguous()?.unary()
    }
    fn layer_norm_fused(&self, _w: &Self, _b: &Self, _eps: f64) -> Result<Self> {
        self.contiguous()?.unary()
    }
    fn rope_interleaved_fused(&self, _cos: &Self, _sin: &Self) -> Result<Self> {
        self.contiguous()?.unary()
    }
    fn cpu_kernels(&self) -> bool {
        self.heap().cfg.cpu_kernels && self.dtype == DType::F32
    }
    fn linear_cpu(&self, w: &Self, _b: Option<&Self>) -> Result<Self> {
        // One matmul whose output starts as the bias: no separate pass, no temporary.
        self.matmul(&w.t()?)
    }
    fn ada_norm_cpu(&self, _shift: &Self, _scale: &Self, _eps: f64) -> Result<Self> {
        self.contiguous()?.unary()
    }
    fn gated_add_cpu(&self, _gate: &Self, h: &Self) -> Result<Self> {
        self.binary(h)
    }
    fn gelu_cpu(&self) -> Result<Self> {
        self.contiguous()?.unary()
    }
    fn attention_cpu(&self, k: &Self, v: &Self) -> Result<Self> {
        let [b, h, l, d] = self.rank_dims()?;
        if k.dims() != self.dims() || v.dims() != self.dims() {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: Shape::from(self.dims()),
                rhs: Shape::from(k.dims()),
                op: "attention_cpu",
            }
            .into());
        }
        // Scores and values: two matmuls per head; the scores never leave a thread's buffer
        // of one query block, and the output is written once with its heads merged.
        self.heap()
            .flops(4.0 * (b * h) as f64 * (l * l) as f64 * d as f64, false);
        self.heap()
            .traffic(4.0 * bytes_of(self.dims(), self.dtype) as f64);
        let threads = self.heap().cfg.host_threads.max(1);
        let out = Self::alloc(&[b, l, h * d], self.dtype, &self.device);
        self.heap().transient(
            &self.device,
            threads * crate::tensor::cpu_kernels::QUERY_BLOCK * l * 4,
        );
        Ok(out)
    }
}

/// The host buffer of tiled VAE runs: its bytes, counted on the host while it lives.
pub struct MetaHost {
    block: Rc<Block>,
    len: usize,
}

impl HostBuffer<Meta> for MetaHost {
    fn zeros(len: usize, device: &MetaDevice) -> Result<Self> {
        let host = device.heap.host();
        Ok(Self {
            block: device.heap.block(&host, Cat::Act, len * 4),
            len,
        })
    }

    fn add_tile(
        &mut self,
        tile: &Meta,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<()> {
        // `flatten_all().to_vec1()`: the tile copied to a host vector for the loop.
        let host = tile.device.heap.host();
        drop(Meta::alloc(tile.dims(), DType::F32, &host));
        Ok(())
    }

    fn into_tensor(self, shape: &[usize], device: &MetaDevice) -> Result<Meta> {
        let host = device.heap.host();
        let t = Meta {
            layout: Layout::contiguous(shape),
            dtype: DType::F32,
            storage: self.block,
            device: host,
        };
        debug_assert_eq!(t.elem_count(), self.len);
        t.to_device(device)
    }
}
