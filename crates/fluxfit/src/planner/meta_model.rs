//! A model over meta tensors: the four networks with [`MetaWeights`], on which the planner
//! runs the pipeline's own phases (`pipeline::run`) to see what each phase holds.

use std::rc::Rc;

use candle_core::DType;

use super::meta_weights::MetaWeights;
use crate::component::{Component, Phase};
use crate::error::Result;
use crate::model::autoencoder::AutoEncoder;
use crate::model::clip::ClipTextModel;
use crate::model::flow::Flux;
use crate::model::redux::ReduxEncoder;
use crate::model::t5::T5Encoder;
use crate::pipeline::run::{Parts, Tokens};
use crate::tensor::meta::{Heap, Meta, MetaDevice};
use crate::variant::Variant;

pub(crate) struct MetaModel {
    pub name: String,
    pub variant: Variant,
    pub heap: Rc<Heap>,
    pub device: MetaDevice,
    pub dtype: DType,
    pub vae_tile: Option<usize>,
    pub flow: (Flux, MetaWeights),
    pub vae: (AutoEncoder, MetaWeights),
    pub t5: (T5Encoder, MetaWeights),
    pub clip: (ClipTextModel, MetaWeights),
    pub redux: Option<(ReduxEncoder, MetaWeights)>,
}

impl MetaModel {
    fn weights(&self, kind: Component) -> &MetaWeights {
        match kind {
            Component::T5 => &self.t5.1,
            Component::Clip => &self.clip.1,
            Component::Flow => &self.flow.1,
            Component::Vae => &self.vae.1,
        }
    }
}

impl Parts<Meta> for MetaModel {
    type T5 = MetaWeights;
    type Clip = MetaWeights;
    type Flow = MetaWeights;
    type Vae = MetaWeights;
    type Redux = MetaWeights;
    fn t5(&self) -> (&T5Encoder, &MetaWeights) {
        (&self.t5.0, &self.t5.1)
    }
    fn clip(&self) -> (&ClipTextModel, &MetaWeights) {
        (&self.clip.0, &self.clip.1)
    }
    fn flow(&self) -> (&Flux, &MetaWeights) {
        (&self.flow.0, &self.flow.1)
    }
    fn vae(&self) -> (&AutoEncoder, &MetaWeights) {
        (&self.vae.0, &self.vae.1)
    }
    fn redux(&self) -> Option<(&ReduxEncoder, &MetaWeights)> {
        self.redux.as_ref().map(|(r, w)| (r, w))
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn variant(&self) -> Variant {
        self.variant
    }
    fn device(&self) -> &MetaDevice {
        &self.device
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn vae_tile(&self) -> Option<usize> {
        self.vae_tile
    }
    /// Token rows of the request's lengths (the ids' values change no size).
    fn tokens(&self, _: &str, t5_tokens: usize) -> Result<Tokens> {
        Ok((vec![vec![0; t5_tokens]], vec![vec![0; 77]]))
    }
    fn begin_phase(&self, name: Phase) {
        self.heap.begin_phase(name);
    }
    fn end_phase(&self, released: &[Component]) {
        for &c in released {
            self.weights(c).release();
            if c == Component::Clip {
                if let Some((_, w)) = &self.redux {
                    w.release();
                }
            }
        }
        self.heap.end_phase();
    }
}
