//! fluxfit: FLUX.1 text-to-image (and image-conditioned) generation that fits the memory you have.
//!
//! The library computes; the `fluxfit` binary parses flags and writes files. The architecture
//! (one network, run and planned; weights have one home) is in docs/architecture.md.

pub mod bench;
pub mod canny;
pub mod checkpoint;
pub mod component;
pub mod error;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod image;
pub mod memory;
pub mod model;
pub mod noise;
pub mod pipeline;
pub mod planner;
pub mod resample;
pub mod sampling;
pub mod tensor;
pub mod tokenizer;
pub mod variant;

pub use error::{Error, Result};
// Re-exported so the binary and users name the same tensor and device types.
pub use candle_core;

/// The crate version, recorded in every image's metadata.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
