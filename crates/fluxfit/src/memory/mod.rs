//! Where every byte lives: residency of weights (and, later, the ledger and the planner).

pub mod plan;
pub mod residency;
