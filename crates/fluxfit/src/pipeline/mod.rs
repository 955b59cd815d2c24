//! Models assembled from their parts, and what they are asked to do.

pub mod control;
pub mod fill;
pub mod kontext;
pub mod metadata;
pub mod model;
pub mod model_ref;
pub mod redux;
pub mod regions;
pub mod request;
pub mod run;
pub mod text2image;
pub mod tiny;
pub mod watch;

pub use model::{LoadOptions, LoraSpec, Model, ModelSources};
pub use model_ref::ModelRef;
pub use text2image::{Event, Generated, ImageInit, Request};
