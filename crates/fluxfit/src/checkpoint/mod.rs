//! Where weights come from: memory-mapped safetensors and the key layouts of published checkpoints.

pub mod diffusers;
pub mod gguf;
pub mod layout;
pub mod lora;
pub mod quant_rules;
pub mod quantize;
pub mod safetensors;
pub mod store;
