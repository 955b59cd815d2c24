//! Where every byte lives: the plan, residency of weights, the ledger of device bytes and the
//! counting allocator that measures them on the CPU.

pub mod alloc;
pub mod ledger;
pub mod plan;
pub mod residency;
pub mod stream;
