//! The networks. Each holds only its configuration; weights arrive per stage through
//! [`crate::memory::residency::Weights`].

pub mod attention;
pub mod autoencoder;
pub mod clip;
pub mod flow;
pub mod ops;
pub mod t5;
