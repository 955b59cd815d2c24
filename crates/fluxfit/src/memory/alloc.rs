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

// SAFETY: every call is forwarded to `System` unchanged, or served from blocks `System` gave
// and a `dealloc` handed back (see `kept`); only counters are updated around it.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = match kept::take(layout) {
            Some(p) => p,
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { System.alloc(layout) },
        };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = match kept::take(layout) {
            Some(p) => {
                // SAFETY: a kept block of exactly this layout, now the caller's.
                unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
                p
            }
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { System.alloc_zeroed(layout) },
        };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !kept::keep(ptr, layout) {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { System.dealloc(ptr, layout) };
        }
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

/// Large freed blocks kept for the next allocation of the same layout, so that a denoising
/// step's activations (the same sizes every block and every step) reuse memory that is already
/// mapped instead of being returned to the kernel and faulted in afresh. Bounded by a byte cap
/// ([`keep_freed`], off until set); kept bytes are free as far as the counters go, so peaks
/// measure live memory, and the process's resident memory exceeds them by at most the cap.
mod kept {
    use std::alloc::Layout;
    use std::sync::atomic::{
        AtomicBool, AtomicUsize,
        Ordering::{Acquire, Relaxed, Release},
    };

    /// Blocks smaller than this go straight back to the system allocator (which keeps them).
    const MIN: usize = 1 << 20;
    const SLOTS: usize = 64;

    pub static CAP: AtomicUsize = AtomicUsize::new(0);
    static HELD: AtomicUsize = AtomicUsize::new(0);
    static LOCK: AtomicBool = AtomicBool::new(false);
    /// (address, size, align) of each kept block; size 0 = empty slot. Guarded by `LOCK`.
    static SLOT_ADDR: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
    static SLOT_SIZE: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
    static SLOT_ALIGN: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];

    fn locked<R>(f: impl FnOnce() -> R) -> R {
        while LOCK
            .compare_exchange_weak(false, true, Acquire, Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        let r = f();
        LOCK.store(false, Release);
        r
    }

    /// A kept block of exactly `layout`, if there is one.
    pub fn take(layout: Layout) -> Option<*mut u8> {
        if layout.size() < MIN || HELD.load(Relaxed) == 0 {
            return None;
        }
        locked(|| {
            let i = (0..SLOTS).find(|&i| {
                SLOT_SIZE[i].load(Relaxed) == layout.size()
                    && SLOT_ALIGN[i].load(Relaxed) == layout.align()
            })?;
            SLOT_SIZE[i].store(0, Relaxed);
            HELD.fetch_sub(layout.size(), Relaxed);
            Some(SLOT_ADDR[i].load(Relaxed) as *mut u8)
        })
    }

    /// Keeps a freed block if it is large and fits under the cap; false: free it.
    pub fn keep(ptr: *mut u8, layout: Layout) -> bool {
        let cap = CAP.load(Relaxed);
        if layout.size() < MIN || layout.size() > cap {
            return false;
        }
        locked(|| {
            if HELD.load(Relaxed) + layout.size() > cap {
                return false;
            }
            let Some(i) = (0..SLOTS).find(|&i| SLOT_SIZE[i].load(Relaxed) == 0) else {
                return false;
            };
            SLOT_ADDR[i].store(ptr as usize, Relaxed);
            SLOT_ALIGN[i].store(layout.align(), Relaxed);
            SLOT_SIZE[i].store(layout.size(), Relaxed);
            HELD.fetch_add(layout.size(), Relaxed);
            true
        })
    }

    pub fn held() -> usize {
        HELD.load(Relaxed)
    }
}

/// Keeps up to `bytes` of large freed blocks for reuse (see the `kept` module); 0 turns it off
/// (blocks already kept stay until reused).
pub fn keep_freed(bytes: usize) {
    kept::CAP.store(bytes, Relaxed);
}

/// Bytes of freed blocks kept for reuse now.
pub fn kept_bytes() -> usize {
    kept::held()
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
