//! Where weights come from: memory-mapped safetensors and the key layouts of published checkpoints.

pub mod diffusers;
pub mod layout;
pub mod manifest;
pub mod safetensors;
pub mod store;
