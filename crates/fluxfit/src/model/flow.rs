//! The FLUX rectified-flow transformer: embedders, double-stream blocks, single-stream blocks and
//! the final layer (docs/flux.md §2.1). Each block is a small function that reads like the paper; weights
//! come per stage from the residency seam.

use candle_core::{DType, Device, D};

use crate::checkpoint::store::TensorStore;
use crate::error::{Error, Result};
use crate::model::attention::{apply_rope, attention_merged, rope_angles};
use crate::model::ops::{ada_norm, gated_add, gelu_tanh, rms_norm, silu};
use crate::model::t5::dims;
use crate::model::weights::{Stage, StageSpec, Weights};
use crate::tensor::Tensor;

const LN_EPS: f64 = 1e-6;
const TIME_DIM: usize = 256;

/// Shapes of a flow model. Real checkpoints and tiny test ones differ only in these numbers.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FlowConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub vec_in_dim: usize,
    pub context_in_dim: usize,
    pub hidden_size: usize,
    pub mlp_hidden: usize,
    pub num_heads: usize,
    pub depth: usize,
    pub depth_single: usize,
    pub axes_dim: Vec<usize>,
    pub theta: f64,
    pub qkv_bias: bool,
    pub guidance_embed: bool,
}

impl FlowConfig {
    /// FLUX.1-dev (and krea, kontext): docs/flux.md §1.1.
    pub fn dev() -> Self {
        Self {
            in_channels: 64,
            out_channels: 64,
            vec_in_dim: 768,
            context_in_dim: 4096,
            hidden_size: 3072,
            mlp_hidden: 12288,
            num_heads: 24,
            depth: 19,
            depth_single: 38,
            axes_dim: vec![16, 56, 56],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: true,
        }
    }

    pub fn schnell() -> Self {
        Self {
            guidance_embed: false,
            ..Self::dev()
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// The RoPE split of a head: the reference's [16, 56, 56] for 128, scaled the same way
    /// (1/8, 7/16, 7/16) for other head sizes, which is what our tiny models use.
    pub fn default_axes(head_dim: usize) -> Result<Vec<usize>> {
        let a0 = head_dim / 8;
        let a1 = head_dim * 7 / 16;
        if !a0.is_multiple_of(2) || !a1.is_multiple_of(2) || a0 + 2 * a1 != head_dim {
            return Err(Error::Config(format!(
                "head dim {head_dim} has no default RoPE split; give axes_dims_rope in the transformer's config.json"
            )));
        }
        Ok(vec![a0, a1, a1])
    }

    /// Reads the configuration off a checkpoint's own shapes (canonical BFL keys).
    pub fn from_store(store: &TensorStore) -> Result<Self> {
        let img_in = store.shape("img_in.weight")?;
        if img_in.len() != 2 {
            return Err(Error::Config(format!(
                "{}: `img_in.weight` should be 2-D, is {img_in:?}",
                store.origin().display()
            )));
        }
        let (hidden_size, in_channels) = (img_in[0], img_in[1]);
        const QK_NORM: &str = "double_blocks.0.img_attn.norm.query_norm.scale";
        let [head_dim] = dims::<1>(store, QK_NORM)?;
        let count = |prefix: &str| {
            let mut n = 0;
            while store.contains(&format!("{prefix}.{n}.norm.query_norm.scale"))
                || store.contains(&format!("{prefix}.{n}.img_attn.norm.query_norm.scale"))
            {
                n += 1;
            }
            n
        };
        if head_dim == 0 || hidden_size % head_dim != 0 {
            return Err(Error::Config(format!(
                "{}: hidden size {hidden_size} is not a multiple of the QK-norm size {head_dim}",
                store.origin().display()
            )));
        }
        let cfg = Self {
            in_channels,
            out_channels: dims::<2>(store, "final_layer.linear.weight")?[0],
            vec_in_dim: dims::<2>(store, "vector_in.in_layer.weight")?[1],
            context_in_dim: dims::<2>(store, "txt_in.weight")?[1],
            hidden_size,
            mlp_hidden: dims::<2>(store, "double_blocks.0.img_mlp.0.weight")?[0],
            num_heads: hidden_size / head_dim,
            depth: count("double_blocks"),
            depth_single: count("single_blocks"),
            axes_dim: Self::default_axes(head_dim).map_err(|e| {
                Error::Config(format!("{}: {e} (`{QK_NORM}`)", store.origin().display()))
            })?,
            theta: 10_000.0,
            qkv_bias: store.contains("double_blocks.0.img_attn.qkv.bias"),
            guidance_embed: store.contains("guidance_in.in_layer.weight"),
        };
        Ok(cfg)
    }

    /// Every tensor the network reads, with its shape: used to validate a checkpoint before a
    /// run and, for the real models, to plan without weights.
    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, m) = (self.hidden_size, self.mlp_hidden);
        let d = self.head_dim();
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        let mut lin = |name: String, o: usize, i: usize, bias: bool| {
            out.push((format!("{name}.weight"), vec![o, i]));
            if bias {
                out.push((format!("{name}.bias"), vec![o]));
            }
        };
        lin("img_in".into(), h, self.in_channels, true);
        lin("time_in.in_layer".into(), h, TIME_DIM, true);
        lin("time_in.out_layer".into(), h, h, true);
        lin("vector_in.in_layer".into(), h, self.vec_in_dim, true);
        lin("vector_in.out_layer".into(), h, h, true);
        if self.guidance_embed {
            lin("guidance_in.in_layer".into(), h, TIME_DIM, true);
            lin("guidance_in.out_layer".into(), h, h, true);
        }
        lin("txt_in".into(), h, self.context_in_dim, true);
        for i in 0..self.depth {
            for s in ["img", "txt"] {
                let p = format!("double_blocks.{i}.{s}");
                lin(format!("{p}_mod.lin"), 6 * h, h, true);
                lin(format!("{p}_attn.qkv"), 3 * h, h, self.qkv_bias);
                lin(format!("{p}_attn.proj"), h, h, true);
                lin(format!("{p}_mlp.0"), m, h, true);
                lin(format!("{p}_mlp.2"), h, m, true);
            }
        }
        for i in 0..self.depth_single {
            let p = format!("single_blocks.{i}");
            lin(format!("{p}.linear1"), 3 * h + m, h, true);
            lin(format!("{p}.linear2"), h, h + m, true);
            lin(format!("{p}.modulation.lin"), 3 * h, h, true);
        }
        lin("final_layer.linear".into(), self.out_channels, h, true);
        lin("final_layer.adaLN_modulation.1".into(), 2 * h, h, true);
        for i in 0..self.depth {
            for s in ["img", "txt"] {
                for n in ["query_norm", "key_norm"] {
                    out.push((
                        format!("double_blocks.{i}.{s}_attn.norm.{n}.scale"),
                        vec![d],
                    ));
                }
            }
        }
        for i in 0..self.depth_single {
            for n in ["query_norm", "key_norm"] {
                out.push((format!("single_blocks.{i}.norm.{n}.scale"), vec![d]));
            }
        }
        out
    }

    /// Checks that `store` holds every tensor with the right shape.
    pub fn validate(&self, store: &TensorStore) -> Result<()> {
        for (key, shape) in self.expected_shapes() {
            if !store.contains(&key) {
                return Err(store.missing(&key));
            }
            store.expect_shape(&key, &shape, "")?;
        }
        Ok(())
    }
}

/// The network: configuration only; see the module doc.
#[derive(Debug, Clone)]
pub struct Flux {
    pub config: FlowConfig,
    /// Query-chunk length of attention; None = unchunked.
    pub attn_chunk: Option<usize>,
}

/// Inputs of one forward pass (docs/flux.md §2.1 `Flux.forward`).
pub struct FlowInputs<'a, T> {
    /// `[B, L_img, in_channels]`
    pub img: &'a T,
    /// `[B, L_img, 3]` f32
    pub img_ids: &'a T,
    /// `[B, L_txt, context_in_dim]`
    pub txt: &'a T,
    /// `[B, L_txt, 3]` f32
    pub txt_ids: &'a T,
    /// `[B]`, in [0, 1]
    pub timesteps: &'a T,
    /// `[B, vec_in_dim]` (CLIP pooled)
    pub y: &'a T,
    /// `[B]`, required by guidance-distilled models
    pub guidance: Option<&'a T>,
}

/// [`FlowInputs`] owned: for benchmarks and tests that run the flow model on fixed inputs.
#[derive(Debug, Clone)]
pub struct FlowSample {
    pub img: candle_core::Tensor,
    pub img_ids: candle_core::Tensor,
    pub txt: candle_core::Tensor,
    pub txt_ids: candle_core::Tensor,
    pub timesteps: candle_core::Tensor,
    pub y: candle_core::Tensor,
    pub guidance: candle_core::Tensor,
}

impl FlowSample {
    /// Seeded random inputs of `cfg`'s widths (torch f32 `randn` with seeds `seed + 1..=3`):
    /// a `side × side` grid of image tokens, `txt_tokens` text tokens, t = 0.7, guidance 3.5.
    pub fn seeded(cfg: &FlowConfig, side: usize, txt_tokens: usize, seed: u64) -> Result<Self> {
        use crate::noise::{torch_randn, NoiseKind};
        let dev = Device::Cpu;
        let randn = |s: u64, shape: &[usize]| -> Result<candle_core::Tensor> {
            let n = shape.iter().product();
            Ok(candle_core::Tensor::from_vec(
                torch_randn(seed + s, n, NoiseKind::TorchF32),
                shape,
                &dev,
            )?)
        };
        Ok(Self {
            img: randn(1, &[1, side * side, cfg.in_channels])?,
            img_ids: crate::sampling::image_ids(1, 2 * side, 2 * side, 0.0, &dev)?,
            txt: randn(2, &[1, txt_tokens, cfg.context_in_dim])?,
            txt_ids: crate::sampling::text_ids(1, txt_tokens, &dev)?,
            timesteps: candle_core::Tensor::new(&[0.7f32], &dev)?,
            y: randn(3, &[1, cfg.vec_in_dim])?,
            guidance: candle_core::Tensor::new(&[3.5f32], &dev)?,
        })
    }

    /// The borrowed inputs of one forward pass (guidance only for a model that embeds it).
    pub fn inputs(&self, cfg: &FlowConfig) -> FlowInputs<'_, candle_core::Tensor> {
        FlowInputs {
            img: &self.img,
            img_ids: &self.img_ids,
            txt: &self.txt,
            txt_ids: &self.txt_ids,
            timesteps: &self.timesteps,
            y: &self.y,
            guidance: cfg.guidance_embed.then_some(&self.guidance),
        }
    }
}

impl Flux {
    pub fn new(config: FlowConfig, attn_chunk: Option<usize>) -> Self {
        Self { config, attn_chunk }
    }

    /// Stages in execution order.
    pub fn stages(&self) -> Vec<StageSpec> {
        let mut s = vec![StageSpec::groups(
            "embed",
            &["img_in", "time_in", "vector_in", "guidance_in", "txt_in"],
        )];
        s.extend((0..self.config.depth).map(|i| StageSpec::under(format!("double_blocks.{i}"))));
        s.extend(
            (0..self.config.depth_single).map(|i| StageSpec::under(format!("single_blocks.{i}"))),
        );
        s.push(StageSpec::under("final_layer"));
        s
    }

    pub fn forward<T: Tensor, W: Weights<T>>(&self, w: &W, inp: &FlowInputs<T>) -> Result<T> {
        let cfg = &self.config;
        let dtype = w.dtype();
        let emb = w.stage("embed")?;
        let img = emb.linear("img_in", &inp.img.to_dtype(dtype)?)?;
        let txt = emb.linear("txt_in", &inp.txt.to_dtype(dtype)?)?;

        let mut vec = mlp_embedder(&emb, "time_in", &timestep_embedding(inp.timesteps, dtype)?)?;
        if cfg.guidance_embed {
            let g = inp.guidance.ok_or_else(|| {
                Error::InvalidRequest(
                    "this model is guidance-distilled (it has guidance_in) and needs a guidance value"
                        .into(),
                )
            })?;
            vec = vec.add(&mlp_embedder(
                &emb,
                "guidance_in",
                &timestep_embedding(g, dtype)?,
            )?)?;
        }
        vec = vec.add(&mlp_embedder(&emb, "vector_in", &inp.y.to_dtype(dtype)?)?)?;
        drop(emb);

        let ids = T::cat(&[inp.txt_ids, inp.img_ids], 1)?;
        let pe = rope_angles(&ids, &cfg.axes_dim, cfg.theta, w.device())?;

        let (mut img, mut txt) = (img, txt);
        for i in 0..cfg.depth {
            let b = w.stage(&format!("double_blocks.{i}"))?;
            (img, txt) = self.double_block(&b, &img, &txt, &vec, &pe)?;
        }
        let l_txt = txt.dim(1)?;
        let l_img = img.dim(1)?;
        let mut x = T::cat(&[&txt, &img], 1)?;
        for i in 0..cfg.depth_single {
            let b = w.stage(&format!("single_blocks.{i}"))?;
            x = self.single_block(&b, &x, &vec, &pe)?;
        }
        let x = x.narrow(1, l_txt, l_img)?;

        let f = w.stage("final_layer")?;
        let m = f.linear("adaLN_modulation.1", &silu(&vec)?)?.unsqueeze(1)?;
        let (shift, scale) = (
            m.narrow(D::Minus1, 0, cfg.hidden_size)?,
            m.narrow(D::Minus1, cfg.hidden_size, cfg.hidden_size)?,
        );
        f.linear("linear", &ada_norm(&x, &shift, &scale, LN_EPS)?)
    }

    fn double_block<T: Tensor, S: Stage<T>>(
        &self,
        b: &S,
        img: &T,
        txt: &T,
        vec: &T,
        pe: &(T, T),
    ) -> Result<(T, T)> {
        let im = modulation(b, "img_mod.lin", vec, 6)?;
        let tm = modulation(b, "txt_mod.lin", vec, 6)?;
        let (iq, ik, iv) = self.qkv(b, "img_attn", &ada_norm(img, &im[0], &im[1], LN_EPS)?)?;
        let (tq, tk, tv) = self.qkv(b, "txt_attn", &ada_norm(txt, &tm[0], &tm[1], LN_EPS)?)?;
        // Each stream's part is dropped once joined.
        let q = T::cat(&[&tq, &iq], 2)?;
        drop((tq, iq));
        let k = T::cat(&[&tk, &ik], 2)?;
        drop((tk, ik));
        let v = T::cat(&[&tv, &iv], 2)?;
        drop((tv, iv));
        let a = self.attend(&q, &k, &v, pe)?;
        let l_txt = txt.dim(1)?;
        let txt_a = a.narrow(1, 0, l_txt)?;
        let img_a = a.narrow(1, l_txt, img.dim(1)?)?;

        let stream = |x: &T, attn: &T, m: &[T], s: &str| -> Result<T> {
            let x = gated_add(x, &m[2], &b.linear(&format!("{s}_attn.proj"), attn)?)?;
            let h = ada_norm(&x, &m[3], &m[4], LN_EPS)?;
            let h = b.linear(&format!("{s}_mlp.0"), &h)?;
            let h = b.linear(&format!("{s}_mlp.2"), &gelu_tanh(&h)?)?;
            gated_add(&x, &m[5], &h)
        };
        Ok((
            stream(img, &img_a, &im, "img")?,
            stream(txt, &txt_a, &tm, "txt")?,
        ))
    }

    fn single_block<T: Tensor, S: Stage<T>>(
        &self,
        b: &S,
        x: &T,
        vec: &T,
        pe: &(T, T),
    ) -> Result<T> {
        let h = self.config.hidden_size;
        let m = modulation(b, "modulation.lin", vec, 3)?;
        let x_mod = ada_norm(x, &m[0], &m[1], LN_EPS)?;
        let lin1 = b.linear("linear1", &x_mod)?;
        let qkv = lin1.narrow(D::Minus1, 0, 3 * h)?;
        let mlp = lin1.narrow(D::Minus1, 3 * h, self.config.mlp_hidden)?;
        let (q, k, v) = self.split_heads(&qkv)?;
        let (q, k) = qk_norm(b, "norm", &q, &k, &v)?;
        let a = self.attend(&q, &k, &v, pe)?;
        let out = b.linear("linear2", &T::cat(&[&a, &gelu_tanh(&mlp)?], D::Minus1)?)?;
        drop(a);
        gated_add(x, &m[2], &out)
    }

    /// `qkv` projection, head split and QK-norm of one stream.
    fn qkv<T: Tensor, S: Stage<T>>(&self, b: &S, prefix: &str, x: &T) -> Result<(T, T, T)> {
        let qkv = b.linear(&format!("{prefix}.qkv"), x)?;
        let (q, k, v) = self.split_heads(&qkv)?;
        let (q, k) = qk_norm(b, &format!("{prefix}.norm"), &q, &k, &v)?;
        Ok((q, k, v))
    }

    /// `[B, L, 3·H]` read as (3, heads, head_dim) → three `[B, heads, L, head_dim]`.
    fn split_heads<T: Tensor>(&self, qkv: &T) -> Result<(T, T, T)> {
        let (b, l, _) = qkv.dims3()?;
        let nh = self.config.num_heads;
        let d = self.config.head_dim();
        let t = qkv.reshape(&[b, l, 3, nh, d])?.permute(&[2, 0, 3, 1, 4])?;
        Ok((t.get(0)?, t.get(1)?, t.get(2)?))
    }

    /// RoPE on q and k, attention, heads merged back: `[B, L, H]`.
    fn attend<T: Tensor>(&self, q: &T, k: &T, v: &T, pe: &(T, T)) -> Result<T> {
        let q = apply_rope(q, &pe.0, &pe.1)?;
        let k = apply_rope(k, &pe.0, &pe.1)?;
        attention_merged(&q, &k, v, self.attn_chunk)
    }
}

/// in_layer → SiLU → out_layer.
fn mlp_embedder<T: Tensor, S: Stage<T>>(s: &S, name: &str, x: &T) -> Result<T> {
    let h = s.linear(&format!("{name}.in_layer"), x)?;
    s.linear(&format!("{name}.out_layer"), &silu(&h)?)
}

/// `lin(SiLU(vec))` split into `k` chunks `[B, 1, H]`, ordered shift, scale, gate (, shift, scale, gate).
fn modulation<T: Tensor, S: Stage<T>>(s: &S, name: &str, vec: &T, k: usize) -> Result<Vec<T>> {
    let m = s.linear(name, &silu(vec)?)?.unsqueeze(1)?;
    m.chunk(k, D::Minus1)
}

/// RMS-normalises q and k (f32 math), cast to v's dtype as the reference does.
fn qk_norm<T: Tensor, S: Stage<T>>(s: &S, prefix: &str, q: &T, k: &T, v: &T) -> Result<(T, T)> {
    let q = rms_norm(q, &s.get(&format!("{prefix}.query_norm.scale"))?, 1e-6)?;
    let k = rms_norm(k, &s.get(&format!("{prefix}.key_norm.scale"))?, 1e-6)?;
    Ok((q.to_dtype(v.dtype())?, k.to_dtype(v.dtype())?))
}

/// Sinusoidal embedding of t·1000, 256 dims, cosines first (docs/flux.md §2.1).
pub fn timestep_embedding<T: Tensor>(t: &T, dtype: DType) -> Result<T> {
    let half = TIME_DIM / 2;
    let freqs = T::from_f32(&[1, half], &T::host_of(t.device()), || {
        (0..half)
            // f32 arithmetic in the reference's order, so arguments up to 1000 agree to the last bit.
            .map(|k| ((-(10_000f64.ln()) as f32) * k as f32 / half as f32).exp())
            .collect()
    })?
    .to_device(t.device())?;
    let t = t.to_dtype(DType::F32)?.affine(1000.0, 0.0)?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
    T::cat(&[&args.cos()?, &args.sin()?], D::Minus1)?.to_dtype(dtype)
}
