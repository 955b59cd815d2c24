//! The networks, written against [`crate::tensor::Tensor`] so that the same code computes (over
//! candle) and plans (over meta tensors). Each holds only its configuration; weights arrive per
//! stage through the seam in [`weights`].

pub mod attention;
pub mod autoencoder;
pub mod clip;
pub mod encoder_layer;
pub mod flow;
pub mod ops;
pub mod redux;
pub mod siglip;
pub mod t5;
pub mod weights;
