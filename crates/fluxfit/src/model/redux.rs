//! FLUX.1 Redux's image encoder (the reference's `ReduxImageEncoder`): SigLIP's last hidden
//! state projected into T5's space by `redux_down(SiLU(redux_up(x)))`. Its tokens are appended
//! to the T5 sequence (see `pipeline::redux`), so an image prompts the flow model as text does.
//!
//! One store holds both parts: the SigLIP keys (canonical, see [`super::siglip`]) and the
//! projector's `redux_up.{weight,bias}` `[3·T, D]` and `redux_down.{weight,bias}` `[T, 3·T]`.

use super::siglip::{SiglipConfig, SiglipVision};
use super::t5::dims;
use crate::checkpoint::store::TensorStore;
use crate::error::{Error, Result};
use crate::model::ops;
use crate::model::weights::{Stage, StageSpec, Weights};
use crate::tensor::Tensor;

const UP: &str = "redux_up";
const DOWN: &str = "redux_down";
const PROJECTOR: &str = "projector";

#[derive(Debug, Clone, PartialEq)]
pub struct ReduxConfig {
    pub siglip: SiglipConfig,
    /// Width of the tokens, T5's (4096 for FLUX.1).
    pub txt_dim: usize,
}

impl ReduxConfig {
    /// FLUX.1-Redux-dev: so400m's 729 tokens of 1152 → 12288 → 4096.
    pub fn flux() -> Self {
        Self {
            siglip: SiglipConfig::so400m_patch14_384(),
            txt_dim: 4096,
        }
    }

    /// The projector's width read off `redux_down.weight`, checked with SigLIP's.
    pub fn from_store(store: &TensorStore, siglip: SiglipConfig) -> Result<Self> {
        let [txt_dim, _] = dims::<2>(store, &format!("{DOWN}.weight"))?;
        let config = Self { siglip, txt_dim };
        let hint = format!(
            " (Redux projector: {} → {} → {})",
            config.siglip.hidden_size,
            3 * txt_dim,
            txt_dim
        );
        for (key, shape) in config.projector_shapes() {
            store.expect_shape(&key, &shape, &hint)?;
        }
        Ok(config)
    }

    fn projector_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, t) = (self.siglip.hidden_size, self.txt_dim);
        vec![
            (format!("{UP}.weight"), vec![3 * t, d]),
            (format!("{UP}.bias"), vec![3 * t]),
            (format!("{DOWN}.weight"), vec![t, 3 * t]),
            (format!("{DOWN}.bias"), vec![t]),
        ]
    }

    /// Every tensor with its shape: SigLIP's, then the projector's.
    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = self.siglip.expected_shapes();
        out.extend(self.projector_shapes());
        out
    }

    /// Tokens one image adds to the text sequence.
    pub fn tokens(&self) -> usize {
        self.siglip.patches()
    }
}

pub struct ReduxEncoder {
    pub config: ReduxConfig,
    siglip: SiglipVision,
}

impl ReduxEncoder {
    pub fn new(config: ReduxConfig) -> Self {
        Self {
            siglip: SiglipVision::new(config.siglip.clone()),
            config,
        }
    }

    /// SigLIP's stages, then the projector's.
    pub fn stages(&self) -> Vec<StageSpec> {
        let mut stages = self.siglip.stages();
        stages.push(StageSpec::groups(PROJECTOR, &[UP, DOWN]));
        stages
    }

    /// SigLIP's `last_hidden_state` `[B, N, D]` of processed pixels `[B, 3, S, S]`.
    pub fn hidden_states<T: Tensor, W: Weights<T>>(&self, w: &W, pixels: &T) -> Result<T> {
        self.siglip.forward(w, pixels)
    }

    /// The image's tokens `[B, N, T]` in the weights' dtype.
    pub fn forward<T: Tensor, W: Weights<T>>(&self, w: &W, pixels: &T) -> Result<T> {
        let hidden = self.hidden_states(w, pixels)?;
        let s = w.stage(PROJECTOR)?;
        let up = ops::linear(
            &hidden,
            &s.get(&format!("{UP}.weight"))?,
            Some(&s.get(&format!("{UP}.bias"))?),
        )?;
        let x = ops::silu(&up)?;
        ops::linear(
            &x,
            &s.get(&format!("{DOWN}.weight"))?,
            Some(&s.get(&format!("{DOWN}.bias"))?),
        )
    }

    /// Refuses a projector whose tokens do not have the flow model's text width.
    pub fn check_width(&self, context_in_dim: usize, origin: &str) -> Result<()> {
        if self.config.txt_dim == context_in_dim {
            return Ok(());
        }
        Err(Error::Config(format!(
            "the Redux projector ({origin}) makes tokens of width {} but the flow model takes \
             {context_in_dim} (txt_in.weight): a Redux file for another model",
            self.config.txt_dim
        )))
    }
}
