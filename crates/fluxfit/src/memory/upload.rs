//! Uploads through a ring of staging buffers: the host-side logic of the GPU's copy path, kept
//! apart from CUDA so that CPU tests cover it.
//!
//! A GPU copies from page-locked (pinned) host memory asynchronously, on its own stream, while
//! the compute stream runs; from ordinary memory it cannot. So a streamed stage's bytes go
//! memory map → pinned slot (on the host, converting the dtype where needed) → device (on the
//! copy stream). A few slots are reused round-robin: the host fills slot s+1 while the device
//! still copies out of slot s, and before it refills a slot it waits for that slot's last copy.
//! [`StagingRing`] decides which slot and which bytes each copy uses and when a wait is due;
//! a [`StagingBackend`] carries out those steps (CUDA's pinned slots and events in
//! `memory::cuda`, plain host buffers in tests).

use std::ops::Range;

use crate::error::Result;

/// One copy through the ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The staging slot that carries it.
    pub slot: usize,
    /// The source bytes it carries (also its offset in the destination).
    pub bytes: Range<usize>,
    /// The slot's previous copy may still be running: wait for it before filling the slot.
    pub wait: bool,
}

/// Round-robin assignment of copies to `slots` staging buffers of `slot_bytes` each.
#[derive(Debug, Clone)]
pub struct StagingRing {
    slot_bytes: usize,
    next: usize,
    /// Per slot: a copy was issued from it and not yet waited for.
    in_flight: Vec<bool>,
}

impl StagingRing {
    /// At least one slot of at least one byte.
    pub fn new(slots: usize, slot_bytes: usize) -> Self {
        Self {
            slot_bytes: slot_bytes.max(1),
            next: 0,
            in_flight: vec![false; slots.max(1)],
        }
    }

    pub fn slots(&self) -> usize {
        self.in_flight.len()
    }

    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// The copies that carry `len` bytes, in order. Consecutive copies use consecutive slots, so
    /// with two or more slots the host fills one while the device reads the other.
    pub fn chunks(&mut self, len: usize) -> Vec<Chunk> {
        let mut out = Vec::with_capacity(len.div_ceil(self.slot_bytes));
        let mut start = 0;
        while start < len {
            let end = (start + self.slot_bytes).min(len);
            let slot = self.next;
            out.push(Chunk {
                slot,
                bytes: start..end,
                wait: self.in_flight[slot],
            });
            self.in_flight[slot] = true;
            self.next = (slot + 1) % self.in_flight.len();
            start = end;
        }
        out
    }

    /// Slots whose copies may still be running (to wait for before the slots are freed).
    pub fn pending(&self) -> Vec<usize> {
        (0..self.in_flight.len())
            .filter(|&s| self.in_flight[s])
            .collect()
    }

    /// All copies were waited for (the backend synchronised its copy stream).
    pub fn settle(&mut self) {
        self.in_flight.iter_mut().for_each(|f| *f = false);
    }
}

/// Carries out a ring's steps for one destination.
pub trait StagingBackend {
    /// Blocks until the last copy out of `slot` finished.
    fn wait_slot(&mut self, slot: usize) -> Result<()>;
    /// Writes `src` at the start of `slot` (on the host).
    fn fill(&mut self, slot: usize, src: &[u8]) -> Result<()>;
    /// Starts copying the first `len` bytes of `slot` to `dst_offset` of the destination, and
    /// marks the slot busy until that copy ends.
    fn copy(&mut self, slot: usize, len: usize, dst_offset: usize) -> Result<()>;
}

/// Sends `src` through the ring to the backend's destination (the copies may still be running
/// when this returns; the backend orders their use).
pub fn upload<B: StagingBackend>(
    ring: &mut StagingRing,
    backend: &mut B,
    src: &[u8],
) -> Result<()> {
    for c in ring.chunks(src.len()) {
        if c.wait {
            backend.wait_slot(c.slot)?;
        }
        backend.fill(c.slot, &src[c.bytes.clone()])?;
        backend.copy(c.slot, c.bytes.len(), c.bytes.start)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    /// Slots in plain memory and copies that finish only when waited for, so that a fill of a
    /// slot still being copied is caught.
    struct Simulated {
        slots: Vec<Vec<u8>>,
        /// Per slot: the copy not yet done (len, destination offset).
        busy: Vec<Option<(usize, usize)>>,
        dst: Vec<u8>,
        log: Vec<String>,
    }

    impl Simulated {
        fn new(ring: &StagingRing, dst_len: usize) -> Self {
            Self {
                slots: vec![vec![0; ring.slot_bytes()]; ring.slots()],
                busy: vec![None; ring.slots()],
                dst: vec![0; dst_len],
                log: vec![],
            }
        }

        fn finish(&mut self, slot: usize) {
            if let Some((len, off)) = self.busy[slot].take() {
                self.dst[off..off + len].copy_from_slice(&self.slots[slot][..len]);
            }
        }

        fn finish_all(&mut self) {
            (0..self.slots.len()).for_each(|s| self.finish(s));
        }
    }

    impl StagingBackend for Simulated {
        fn wait_slot(&mut self, slot: usize) -> Result<()> {
            self.log.push(format!("wait {slot}"));
            self.finish(slot);
            Ok(())
        }
        fn fill(&mut self, slot: usize, src: &[u8]) -> Result<()> {
            if self.busy[slot].is_some() {
                return Err(Error::Config(format!("slot {slot} filled while copying")));
            }
            self.log.push(format!("fill {slot}"));
            self.slots[slot][..src.len()].copy_from_slice(src);
            Ok(())
        }
        fn copy(&mut self, slot: usize, len: usize, dst_offset: usize) -> Result<()> {
            self.log.push(format!("copy {slot}"));
            self.busy[slot] = Some((len, dst_offset));
            Ok(())
        }
    }

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn chunks_cover_the_bytes_in_slot_sized_pieces() {
        let mut ring = StagingRing::new(2, 10);
        let c = ring.chunks(25);
        let ranges: Vec<_> = c.iter().map(|c| c.bytes.clone()).collect();
        assert_eq!(ranges, vec![0..10, 10..20, 20..25]);
        let slots: Vec<_> = c.iter().map(|c| c.slot).collect();
        assert_eq!(slots, vec![0, 1, 0]);
        let waits: Vec<_> = c.iter().map(|c| c.wait).collect();
        assert_eq!(waits, vec![false, false, true]);
        assert!(ring.chunks(0).is_empty());
    }

    #[test]
    fn every_byte_arrives_and_no_slot_is_refilled_while_copying() -> Result<()> {
        for (slots, slot_bytes, sizes) in [
            (1, 8, vec![3, 20, 8]),
            (2, 8, vec![17, 1, 64]),
            (3, 5, vec![40, 2, 9, 0]),
        ] {
            let mut ring = StagingRing::new(slots, slot_bytes);
            for n in sizes {
                let src = bytes(n);
                let mut b = Simulated::new(&ring, n);
                // The previous destination's copies were waited for by whoever freed it.
                ring.settle();
                upload(&mut ring, &mut b, &src)?;
                b.finish_all();
                assert_eq!(b.dst, src, "{slots} slots of {slot_bytes}, {n} bytes");
            }
        }
        Ok(())
    }

    #[test]
    fn two_slots_fill_the_next_before_waiting_for_the_previous() -> Result<()> {
        let mut ring = StagingRing::new(2, 4);
        let src = bytes(12);
        let mut b = Simulated::new(&ring, 12);
        upload(&mut ring, &mut b, &src)?;
        assert_eq!(
            b.log,
            ["fill 0", "copy 0", "fill 1", "copy 1", "wait 0", "fill 0", "copy 0"]
        );
        assert_eq!(ring.pending(), vec![0, 1]);
        Ok(())
    }

    #[test]
    fn the_ring_carries_its_state_across_uploads() {
        let mut ring = StagingRing::new(2, 4);
        ring.chunks(4);
        let c = ring.chunks(8);
        assert_eq!((c[0].slot, c[0].wait), (1, false));
        assert_eq!((c[1].slot, c[1].wait), (0, true));
        ring.settle();
        assert!(ring.pending().is_empty());
        assert!(!ring.chunks(1)[0].wait);
    }
}
