//! The one seam between what a network computes and where its weights are (DESIGN principle 1).
//!
//! A network names the stage it is about to run (`double_blocks.7`, `decoder.up.2`) and receives
//! that stage's tensors on its compute device in its compute dtype. Whether they were resident all
//! along, brought in for the phase or streamed with the next stage prefetched is the plan's
//! business; the network code is the same under every plan.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::store::TensorStore;
use crate::error::{Error, Result};

/// A named group of weights a network uses as one unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSpec {
    pub name: String,
    /// Prepended to the names a network asks for (`double_blocks.7.`).
    pub root: String,
    /// Key prefixes under `root` that belong to the stage; empty means everything under `root`.
    pub members: Vec<String>,
}

impl StageSpec {
    /// A stage that owns every key under `root.`.
    pub fn under(name: impl Into<String>) -> Self {
        let name = name.into();
        Self {
            root: format!("{name}."),
            name,
            members: Vec::new(),
        }
    }

    /// A stage made of several top-level groups (`img_in.`, `time_in.`, ...).
    pub fn groups(name: impl Into<String>, members: &[&str]) -> Self {
        Self {
            name: name.into(),
            root: String::new(),
            members: members.iter().map(|m| format!("{m}.")).collect(),
        }
    }

    /// The canonical keys of this stage present in `store`.
    pub fn keys<'a>(&'a self, store: &'a TensorStore) -> Vec<&'a String> {
        if self.members.is_empty() {
            store.keys_with_prefix(&self.root).collect()
        } else {
            self.members
                .iter()
                .flat_map(|m| store.keys_with_prefix(m))
                .collect()
        }
    }

    /// Bytes this stage occupies in storage.
    pub fn storage_bytes(&self, store: &TensorStore) -> usize {
        self.keys(store)
            .into_iter()
            .filter_map(|k| store.info(k).ok())
            .map(|i| i.nbytes())
            .sum()
    }
}

/// One stage's tensors, on the compute device.
#[derive(Debug)]
pub struct StageWeights {
    name: String,
    root: String,
    tensors: HashMap<String, Tensor>,
    bytes: usize,
}

impl StageWeights {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Device bytes held by this stage.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The tensor at `root + rel`; a missing one names the full key and the stage.
    pub fn get(&self, rel: &str) -> Result<Tensor> {
        self.get_opt(rel).ok_or_else(|| Error::MissingKey {
            path: format!("stage {}", self.name).into(),
            key: format!("{}{rel}", self.root),
            hint: String::new(),
        })
    }

    pub fn get_opt(&self, rel: &str) -> Option<Tensor> {
        self.tensors.get(&format!("{}{rel}", self.root)).cloned()
    }
}

/// What networks see: stages by name.
pub trait Weights {
    fn stage(&self, name: &str) -> Result<Arc<StageWeights>>;
    fn device(&self) -> &Device;
    fn dtype(&self) -> DType;
}

/// How a component's weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Materialised on first use and kept until the component is dropped.
    Resident,
}

/// A component's weights under a plan: the store they come from, the stages networks ask for.
pub struct Residency {
    store: Arc<TensorStore>,
    stages: Vec<StageSpec>,
    device: Device,
    dtype: DType,
    placement: Placement,
    held: Mutex<HashMap<String, Arc<StageWeights>>>,
}

impl Residency {
    pub fn new(
        store: Arc<TensorStore>,
        stages: Vec<StageSpec>,
        device: Device,
        dtype: DType,
        placement: Placement,
    ) -> Self {
        Self {
            store,
            stages,
            device,
            dtype,
            placement,
            held: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &TensorStore {
        &self.store
    }

    pub fn stages(&self) -> &[StageSpec] {
        &self.stages
    }

    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// Bytes currently held on the compute device.
    pub fn held_bytes(&self) -> usize {
        self.held
            .lock()
            .expect("residency lock")
            .values()
            .map(|s| s.bytes)
            .sum()
    }

    /// Drops every held stage (end of the component's phase).
    pub fn release(&self) {
        self.held.lock().expect("residency lock").clear();
    }

    fn materialise(&self, spec: &StageSpec) -> Result<StageWeights> {
        let mut tensors = HashMap::new();
        let mut bytes = 0;
        for key in spec.keys(&self.store) {
            let t = self.store.load(key, &self.device, self.dtype)?;
            bytes += t.elem_count() * t.dtype().size_in_bytes();
            tensors.insert(key.clone(), t);
        }
        Ok(StageWeights {
            name: spec.name.clone(),
            root: spec.root.clone(),
            tensors,
            bytes,
        })
    }
}

impl Weights for Residency {
    fn stage(&self, name: &str) -> Result<Arc<StageWeights>> {
        if let Some(s) = self.held.lock().expect("residency lock").get(name) {
            return Ok(s.clone());
        }
        let spec = self
            .stages
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::Config(format!("no stage named `{name}`")))?;
        let stage = Arc::new(self.materialise(spec)?);
        match self.placement {
            Placement::Resident => {
                self.held
                    .lock()
                    .expect("residency lock")
                    .insert(name.to_string(), stage.clone());
            }
        }
        Ok(stage)
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
