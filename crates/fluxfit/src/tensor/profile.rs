//! Where compute time goes, by class of operation: matmuls, attention, norms, RoPE, other
//! element-wise work, copies. Off by default (one relaxed atomic load per op); `fluxfit
//! bench-cpu --profile` turns it on around the timed runs.
//!
//! Each candle op is timed on the thread that calls it (the matmul's worker threads run inside
//! that call) and added to its own class, or to the class of the enclosing [`scope`] when
//! there is one: the matmuls and softmax inside attention count as attention, the steps of a
//! composed norm as the norm.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// A class of operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Matmul,
    Attention,
    Norm,
    Rope,
    /// Activations, modulation, residual adds and every other element-wise op.
    Elementwise,
    /// `contiguous`, `cat`, dtype and device moves, padding: bytes moved, no arithmetic.
    Copy,
    Other,
}

impl Class {
    pub const ALL: [Class; 7] = [
        Class::Matmul,
        Class::Attention,
        Class::Norm,
        Class::Rope,
        Class::Elementwise,
        Class::Copy,
        Class::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Class::Matmul => "matmul (linear layers)",
            Class::Attention => "attention (scores, softmax, values)",
            Class::Norm => "norms (LayerNorm, RMSNorm)",
            Class::Rope => "RoPE",
            Class::Elementwise => "element-wise (activations, modulation, residuals)",
            Class::Copy => "copies (contiguous, cat, casts)",
            Class::Other => "other",
        }
    }
}

static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];
static CALLS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];

thread_local! {
    static SCOPE: Cell<Option<Class>> = const { Cell::new(None) };
}

/// Starts counting from zero.
pub fn start() {
    for c in NANOS.iter().chain(CALLS.iter()) {
        c.store(0, Relaxed);
    }
    ON.store(true, Relaxed);
}

/// Stops counting; returns (class, seconds, calls) for every class.
pub fn stop() -> Vec<(Class, f64, u64)> {
    ON.store(false, Relaxed);
    Class::ALL
        .iter()
        .map(|&c| {
            (
                c,
                NANOS[c as usize].load(Relaxed) as f64 * 1e-9,
                CALLS[c as usize].load(Relaxed),
            )
        })
        .collect()
}

/// Runs `f` as one op of `class` (or of the enclosing scope's class).
#[inline]
pub fn op<R>(class: Class, f: impl FnOnce() -> R) -> R {
    if !ON.load(Relaxed) {
        return f();
    }
    let class = SCOPE.with(Cell::get).unwrap_or(class);
    let t = Instant::now();
    let r = f();
    NANOS[class as usize].fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
    CALLS[class as usize].fetch_add(1, Relaxed);
    r
}

/// Runs `f` with every op inside it counted as `class` (the outermost scope wins).
#[inline]
pub fn scope<R>(class: Class, f: impl FnOnce() -> R) -> R {
    if !ON.load(Relaxed) {
        return f();
    }
    let outer = SCOPE.with(|s| s.replace(Some(s.get().unwrap_or(class))));
    let r = f();
    SCOPE.with(|s| s.set(outer));
    r
}
