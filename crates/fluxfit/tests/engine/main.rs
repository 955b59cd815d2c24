//! The library's tests that need no process of their own, in one binary so that the suite links
//! once. (The tests that measure memory with the counting allocator install it as their global
//! allocator, and each keeps a binary of its own: `memory_plans`, `planner_*`, `regions`,
//! `vae_tiling`.) Run one group with `cargo test -p fluxfit --test engine GROUP::`.

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod canny_parity;
mod checkpoint_layouts;
mod conditioning_parity;
mod e2e_parity;
mod fill_parity;
mod fuzz_corpus;
mod img2img_parity;
mod lora_parity;
mod model_parity;
mod noise_parity;
mod packed_plans;
mod quantized;
mod redux_parity;
mod resample_parity;
mod text_encoder_parity;
mod tokenizer_parity;
