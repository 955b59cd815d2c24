//! Measuring the heap: a counting global allocator, and the process's anonymous resident memory.
//!
//! On the CPU the compute device's memory *is* the heap, so the counting allocator is the
//! CPU's equivalent of a GPU's memory counters. The binary and the tests that measure install it:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: fluxfit::memory::alloc::CountingAlloc = fluxfit::memory::alloc::CountingAlloc;
//! ```
//!
//! Memory-mapped checkpoints are not heap and stay outside the count, as host RAM stays outside
//! VRAM. Besides the total (current and a resettable peak) it keeps the peak of the heap *not*
//! accounted for by the [`Ledger`](super::ledger::Ledger) (which reports the weights and
//! workspace it hands out through [`account`]): that remainder is what a phase's activations
//! take, measured rather than estimated.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed};

/// The system allocator, counting bytes. Zero-sized; install it as `#[global_allocator]`.
pub struct CountingAlloc;

static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Bytes currently allocated (signed: frees of blocks allocated before installation cannot
/// happen, but a signed counter cannot wrap if they did).
static CURRENT: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);
/// Heap bytes the ledger accounts for (weights and workspace held in host memory).
static ACCOUNTED: AtomicIsize = AtomicIsize::new(0);
/// Peak of `CURRENT - ACCOUNTED`.
static OTHER_PEAK: AtomicIsize = AtomicIsize::new(0);

#[inline]
fn grew(n: usize) {
    if !INSTALLED.load(Relaxed) {
        INSTALLED.store(true, Relaxed);
    }
    let cur = CURRENT.fetch_add(n as isize, Relaxed) + n as isize;
    PEAK.fetch_max(cur, Relaxed);
    OTHER_PEAK.fetch_max(cur - ACCOUNTED.load(Relaxed), Relaxed);
}

#[inline]
fn shrank(n: usize) {
    CURRENT.fetch_sub(n as isize, Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are updated around it.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

/// Whether a [`CountingAlloc`] is this process's global allocator (it has counted something).
pub fn installed() -> bool {
    INSTALLED.load(Relaxed)
}

/// Heap bytes allocated now (0 when the allocator is not installed).
pub fn current() -> usize {
    CURRENT.load(Relaxed).max(0) as usize
}

/// Largest [`current`] since the last [`reset_peak`].
pub fn peak() -> usize {
    PEAK.load(Relaxed).max(0) as usize
}

/// Heap bytes the ledger accounts for now.
pub fn accounted() -> isize {
    ACCOUNTED.load(Relaxed)
}

/// Largest `current - accounted` since the last [`reset_peak`]: everything on the heap that is
/// not ledger-held weights or workspace.
pub fn unaccounted_peak() -> isize {
    OTHER_PEAK.load(Relaxed)
}

/// Starts a new peak window at the current figures.
pub fn reset_peak() {
    let cur = CURRENT.load(Relaxed);
    PEAK.store(cur, Relaxed);
    OTHER_PEAK.store(cur - ACCOUNTED.load(Relaxed), Relaxed);
}

/// The ledger reports heap bytes it accounts for (positive when taken, negative when given
/// back). Report *before* allocating and *after* freeing, so that the unaccounted figure never
/// shows a weight as an activation.
pub fn account(delta: isize) {
    ACCOUNTED.fetch_add(delta, Relaxed);
}

/// The process's anonymous resident memory (`RssAnon` in `/proc/self/status`), in bytes: the
/// heap and other private pages, not the memory-mapped checkpoints. `None` off Linux.
pub fn rss_anon() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kb: usize = line
        .trim_start_matches("RssAnon:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}
