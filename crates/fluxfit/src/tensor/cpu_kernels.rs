//! fluxfit's own f32 CPU kernels for the flow model's hot path, on plain slices.
//!
//! candle computes element-wise ops one scalar (and one libm call) at a time on one thread,
//! each op writing a new tensor; these kernels fuse the chains the transformer runs (LayerNorm
//! with its modulation, the gated residual, GELU-tanh, a Linear's bias) into one pass each, in
//! vector registers, over every thread. Attention runs a block of queries at a time with its
//! scores kept in a per-thread buffer (the cache-sized chunks of flash attention), writing the
//! heads straight into `[B, L, H·D]`.
//!
//! Each kernel's body is plain Rust compiled three times: for AVX-512, for AVX2 + FMA, and
//! portable, picked at run time (`FLUXFIT_CPU=avx2` or `portable` forces a narrower one to
//! measure it). Arithmetic is never contracted into fused multiply-adds, so the three give the
//! same bits; sums run over 16 explicit lanes for the same reason. Matmuls are the `gemm`
//! crate's (candle's), which has its own AVX-512 and AVX2 kernels.

use std::sync::OnceLock;

use rayon::prelude::*;

/// The vector instruction set the element-wise kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

/// The instruction set in use: the widest the CPU has, or narrower where `FLUXFIT_CPU` says
/// (`avx2`, `portable`); read once per process.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let widest = detect();
        match std::env::var("FLUXFIT_CPU").as_deref() {
            Ok("portable") => Isa::Portable,
            Ok("avx2") if widest != Isa::Portable => Isa::Avx2,
            _ => widest,
        }
    })
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// Whether the networks use these kernels for f32 on the CPU (`FLUXFIT_CPU_KERNELS=off` turns
/// them off, back to candle's ops, to compare).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("FLUXFIT_CPU_KERNELS").as_deref() != Ok("off"))
}

/// The kernels' instruction set and the matmuls', in words.
pub fn describe() -> String {
    let gemm = if cfg!(feature = "avx512") && detect() == Isa::Avx512 {
        "AVX-512"
    } else if detect() != Isa::Portable {
        "AVX2"
    } else {
        "portable"
    };
    let own = match (enabled(), isa()) {
        (false, _) => "off",
        (true, Isa::Avx512) => "AVX-512",
        (true, Isa::Avx2) => "AVX2",
        (true, Isa::Portable) => "portable",
    };
    format!("matmuls {gemm}, fused kernels {own}")
}

/// `fn name(args) body` compiled for each [`Isa`] and dispatched on [`isa`].
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi2")]
            unsafe fn v4($($arg: $ty),*) {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,bmi2")]
            unsafe fn v3($($arg: $ty),*) {
                body($($arg),*)
            }
            match isa() {
                // SAFETY: `isa` returns these only where the CPU has the features.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { v4($($arg),*) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { v3($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}

const LANES: usize = 16;

/// `e^x` for f32 to about one ulp: 2^n·p(r) with n = ⌊x·log₂e⌉ and a degree-6 polynomial on
/// |r| ≤ ln2/2 (Cephes' coefficients). Branch-free so that loops over it vectorise.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let p = p * r * r + r + 1.0;
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// GELU with the tanh approximation, as `x·σ(2u)`, u = √(2/π)(x + 0.044715x³) (the same
/// function as 0.5x(1 + tanh u)).
#[inline(always)]
fn gelu1(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // √(2/π)
    let u = K * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp(-2.0 * u))
}

/// Sum over 16 explicit lanes (the same order whatever the vector width).
#[inline(always)]
fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += f(c[i]);
        }
    }
    for (i, &x) in chunks.remainder().iter().enumerate() {
        acc[i] += f(x);
    }
    acc.iter().sum()
}

/// Rows per parallel task so that each task has at least ~64 K elements.
fn rows_per_task(rows: usize, dim: usize) -> usize {
    (65_536 / dim.max(1)).clamp(1, rows.max(1))
}

simd_fn! {
    fn gelu_chunk(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = gelu1(v);
        }
    }
}

/// `y = GELU_tanh(x)`.
pub fn gelu_tanh(x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(1 << 16)
        .zip(x.par_chunks(1 << 16))
        .for_each(|(y, x)| gelu_chunk(x, y));
}

simd_fn! {
    fn ada_norm_row(x: &[f32], shift: &[f32], scale: &[f32], eps: f32, y: &mut [f32]) {
        let d = x.len() as f32;
        let mean = lane_sum(x, |v| v) / d;
        let var = lane_sum(x, |v| (v - mean) * (v - mean)) / d;
        let std = (var + eps).sqrt();
        for i in 0..x.len() {
            y[i] = (x[i] - mean) / std * (scale[i] + 1.0) + shift[i];
        }
    }
}

/// AdaLN: LayerNorm without affine over each row of `x` (`[batches·rows_per_batch, dim]`),
/// then `·(1 + scale) + shift` with the batch's `scale`/`shift` rows (`[batches, dim]`).
pub fn ada_norm(
    x: &[f32],
    dim: usize,
    rows_per_batch: usize,
    shift: &[f32],
    scale: &[f32],
    eps: f32,
    y: &mut [f32],
) {
    let per = rows_per_task(x.len() / dim, dim);
    y.par_chunks_mut(per * dim)
        .zip(x.par_chunks(per * dim))
        .enumerate()
        .for_each(|(t, (y, x))| {
            for (r, (y, x)) in y.chunks_mut(dim).zip(x.chunks(dim)).enumerate() {
                let b = (t * per + r) / rows_per_batch;
                let m = b * dim..(b + 1) * dim;
                ada_norm_row(x, &shift[m.clone()], &scale[m], eps, y);
            }
        });
}

simd_fn! {
    fn gated_add_row(x: &[f32], gate: &[f32], h: &[f32], y: &mut [f32]) {
        for i in 0..x.len() {
            y[i] = x[i] + gate[i] * h[i];
        }
    }
}

/// The gated residual `y = x + gate·h`, `gate` one `[dim]` row per batch.
pub fn gated_add(
    x: &[f32],
    gate: &[f32],
    h: &[f32],
    dim: usize,
    rows_per_batch: usize,
    y: &mut [f32],
) {
    let per = rows_per_task(x.len() / dim, dim);
    y.par_chunks_mut(per * dim)
        .zip(x.par_chunks(per * dim).zip(h.par_chunks(per * dim)))
        .enumerate()
        .for_each(|(t, (y, (x, h)))| {
            for (r, ((y, x), h)) in y
                .chunks_mut(dim)
                .zip(x.chunks(dim))
                .zip(h.chunks(dim))
                .enumerate()
            {
                let b = (t * per + r) / rows_per_batch;
                gated_add_row(x, &gate[b * dim..(b + 1) * dim], h, y);
            }
        });
}

/// A row-major matrix view: element (i, j) at `data[i·rs + j·cs]`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ (+ b[n])`, on every thread, the bias as the accumulator's
/// starting value (no separate pass).
pub fn linear(x: Mat, w: Mat, b: Option<&[f32]>, m: usize, n: usize, k: usize, y: &mut [f32]) {
    assert!(y.len() >= m * n);
    if let Some(b) = b {
        for row in y.chunks_mut(n).take(m) {
            row.copy_from_slice(&b[..n]);
        }
    }
    // wᵀ as a k × n operand: element (kk, j) is w[j, kk].
    let wt = Operand {
        ptr: w.data.as_ptr(),
        rs: w.cs,
        cs: w.rs,
    };
    let xo = Operand {
        ptr: x.data.as_ptr(),
        rs: x.rs,
        cs: x.cs,
    };
    // SAFETY: every index the views imply lies inside their slices (checked by the callers
    // against the tensors' layouts), and `y` holds m·n values.
    unsafe {
        matmul_raw(
            (m, n, k),
            y.as_mut_ptr(),
            n,
            xo,
            wt,
            b.is_some(),
            rayon::current_num_threads(),
        )
    }
}

simd_fn! {
    fn softmax_row(s: &mut [f32], scale: f32) {
        let mut mx = [f32::NEG_INFINITY; LANES];
        let mut chunks = s.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                mx[i] = mx[i].max(c[i]);
            }
        }
        for (i, &v) in chunks.remainder().iter().enumerate() {
            mx[i] = mx[i].max(v);
        }
        let max = mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for v in s.iter_mut() {
            *v = exp((*v - max) * scale);
        }
        let inv = 1.0 / lane_sum(s, |v| v);
        for v in s.iter_mut() {
            *v *= inv;
        }
    }
}

/// Queries per block of the fused attention: the block's scores (`QUERY_BLOCK × L` f32) stay
/// in a thread's cache.
pub const QUERY_BLOCK: usize = 128;

/// A `[B, H, L, D]` tensor's values with its strides (batch, head, position); the last dim is
/// contiguous.
#[derive(Debug, Clone, Copy)]
pub struct Heads<'a> {
    pub data: &'a [f32],
    pub sb: usize,
    pub sh: usize,
    pub sl: usize,
}

/// Softmax attention `softmax(q·kᵀ/√D)·v` over `[B, H, L, D]` views, written as `[B, L, H·D]`
/// into `out`, one (batch, head, block of queries) per task: each task's scores live in a
/// buffer of `QUERY_BLOCK × L` values, never the whole `L × L`.
pub fn attention(
    q: Heads,
    k: Heads,
    v: Heads,
    dims: (usize, usize, usize, usize),
    out: &mut [f32],
) {
    let (b, h, l, d) = dims;
    let scale = 1.0 / (d as f32).sqrt();
    let blocks = l.div_ceil(QUERY_BLOCK);
    let out_ptr = SendPtr(out.as_mut_ptr());
    assert!(out.len() >= b * l * h * d);
    (0..b * h * blocks).into_par_iter().for_each_init(
        || vec![0f32; QUERY_BLOCK * l],
        |scores, task| {
            let (bh, blk) = (task / blocks, task % blocks);
            let (bi, hi) = (bh / h, bh % h);
            let q0 = blk * QUERY_BLOCK;
            let rows = QUERY_BLOCK.min(l - q0);
            let qp = &q.data[bi * q.sb + hi * q.sh + q0 * q.sl..];
            let kp = &k.data[bi * k.sb + hi * k.sh..];
            let vp = &v.data[bi * v.sb + hi * v.sh..];
            // SAFETY: the views' extents were checked by the caller; `scores` holds rows·l.
            unsafe {
                // kᵀ as a d × l operand: element (dd, j) is k[j, dd].
                let kt = Operand {
                    ptr: kp.as_ptr(),
                    rs: 1,
                    cs: k.sl,
                };
                let qo = Operand {
                    ptr: qp.as_ptr(),
                    rs: q.sl,
                    cs: 1,
                };
                matmul_raw((rows, l, d), scores.as_mut_ptr(), l, qo, kt, false, 1);
            }
            for row in scores[..rows * l].chunks_mut(l) {
                softmax_row(row, scale);
            }
            // Rows (bi, q0 + i) of the output, head hi's D columns: each task writes a
            // disjoint set of elements.
            let dst = out_ptr.at((bi * l + q0) * h * d + hi * d);
            // SAFETY: as above; tasks write disjoint elements of `out`.
            unsafe {
                let p = Operand {
                    ptr: scores.as_ptr(),
                    rs: l,
                    cs: 1,
                };
                let vo = Operand {
                    ptr: vp.as_ptr(),
                    rs: v.sl,
                    cs: 1,
                };
                matmul_raw((rows, d, l), dst, h * d, p, vo, false, 1);
            }
        },
    );
}

/// A matrix operand of [`matmul_raw`]: its first element and its row and column strides.
#[derive(Clone, Copy)]
struct Operand {
    ptr: *const f32,
    rs: usize,
    cs: usize,
}

/// `dst[m×n] = (dst if accumulate) + lhs[m×k]·rhs[k×n]`, `dst` row-major with row stride
/// `dst_rs`, on `threads` threads (1: the calling thread only).
///
/// # Safety
/// Every element the sizes and strides reach must lie inside its operand's allocation, and no
/// other thread may touch the `dst` elements they reach.
unsafe fn matmul_raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: Operand,
    rhs: Operand,
    accumulate: bool,
    threads: usize,
) {
    // SAFETY: the caller's guarantees are gemm's.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.ptr,
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.ptr,
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        )
    }
}

/// A raw pointer the attention tasks share to write disjoint parts of one output.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

impl SendPtr {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}
// SAFETY: used only to write disjoint elements from different tasks.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulps_of_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "{worst}");
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn gelu_matches_the_tanh_form() {
        for i in -2000..2000 {
            let x = i as f32 * 0.01;
            let want = 0.5 * x * (1.0 + (0.797_884_6f32 * (x + 0.044_715 * x * x * x)).tanh());
            assert!((gelu1(x) - want).abs() <= 1e-6 * (1.0 + x.abs()), "{x}");
        }
        assert!(gelu1(-100.0).abs() < 1e-30);
        assert_eq!(gelu1(100.0), 100.0);
    }
}
