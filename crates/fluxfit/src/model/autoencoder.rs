//! The FLUX autoencoder (spec §2.2): an LDM-style VAE with 16 latent channels, 8× down-sampling,
//! one single-head attention in the middle, and a scale/shift on the latent.

use candle_core::{DType, Tensor};

use crate::checkpoint::store::TensorStore;
use crate::error::{Error, Result};
use crate::memory::residency::{StageSpec, StageWeights, Weights};
use crate::model::attention::attention;
use crate::model::t5::dims;

const NORM_GROUPS: usize = 32;
const NORM_EPS: f64 = 1e-6;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AutoEncoderConfig {
    pub in_channels: usize,
    pub ch: usize,
    pub out_ch: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub z_channels: usize,
    pub scale_factor: f64,
    pub shift_factor: f64,
}

impl AutoEncoderConfig {
    /// The one autoencoder of every FLUX.1 variant (`ae.safetensors`).
    pub fn flux() -> Self {
        Self {
            in_channels: 3,
            ch: 128,
            out_ch: 3,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            z_channels: 16,
            scale_factor: 0.3611,
            shift_factor: 0.1159,
        }
    }

    /// Reads the configuration off the checkpoint's shapes (canonical LDM keys); the latent
    /// scale and shift are FLUX's.
    pub fn from_store(store: &TensorStore) -> Result<Self> {
        let conv_in = dims::<4>(store, "encoder.conv_in.weight")?;
        let ch = conv_in[0];
        let mut ch_mult = Vec::new();
        while store.contains(&format!(
            "encoder.down.{}.block.0.conv1.weight",
            ch_mult.len()
        )) {
            let out = dims::<4>(
                store,
                &format!("encoder.down.{}.block.0.conv1.weight", ch_mult.len()),
            )?[0];
            ch_mult.push(out / ch.max(1));
        }
        let mut num_res_blocks = 0;
        while store.contains(&format!(
            "encoder.down.0.block.{num_res_blocks}.conv1.weight"
        )) {
            num_res_blocks += 1;
        }
        if ch_mult.is_empty() || num_res_blocks == 0 {
            return Err(Error::Layout {
                path: store.origin().to_path_buf(),
                message: "no `encoder.down.N.block.M` tensors: not an LDM/FLUX autoencoder".into(),
            });
        }
        Ok(Self {
            in_channels: conv_in[1],
            ch,
            out_ch: dims::<4>(store, "decoder.conv_out.weight")?[0],
            ch_mult,
            num_res_blocks,
            z_channels: dims::<4>(store, "decoder.conv_in.weight")?[1],
            ..Self::flux()
        })
    }

    fn levels(&self) -> usize {
        self.ch_mult.len()
    }

    /// Every tensor the encoder and decoder read, with its shape.
    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut s = ShapeList::default();
        let ch = self.ch;
        let top = ch * self.ch_mult[self.levels() - 1];
        s.conv("encoder.conv_in", ch, self.in_channels, 3);
        let mut block_in = ch;
        for (i, m) in self.ch_mult.iter().enumerate() {
            let block_out = ch * m;
            for j in 0..self.num_res_blocks {
                s.resnet(&format!("encoder.down.{i}.block.{j}"), block_in, block_out);
                block_in = block_out;
            }
            if i + 1 != self.levels() {
                s.conv(
                    &format!("encoder.down.{i}.downsample.conv"),
                    block_in,
                    block_in,
                    3,
                );
            }
        }
        for side in ["encoder", "decoder"] {
            s.resnet(&format!("{side}.mid.block_1"), top, top);
            s.resnet(&format!("{side}.mid.block_2"), top, top);
            for n in ["q", "k", "v", "proj_out"] {
                s.conv(&format!("{side}.mid.attn_1.{n}"), top, top, 1);
            }
            s.norm(&format!("{side}.mid.attn_1.norm"), top);
        }
        s.norm("encoder.norm_out", top);
        s.conv("encoder.conv_out", 2 * self.z_channels, top, 3);
        s.conv("decoder.conv_in", top, self.z_channels, 3);
        let mut block_in = top;
        for i in (0..self.levels()).rev() {
            let block_out = ch * self.ch_mult[i];
            for j in 0..=self.num_res_blocks {
                s.resnet(&format!("decoder.up.{i}.block.{j}"), block_in, block_out);
                block_in = block_out;
            }
            if i != 0 {
                s.conv(
                    &format!("decoder.up.{i}.upsample.conv"),
                    block_in,
                    block_in,
                    3,
                );
            }
        }
        s.norm("decoder.norm_out", ch * self.ch_mult[0]);
        s.conv("decoder.conv_out", self.out_ch, ch * self.ch_mult[0], 3);
        s.0
    }

    pub fn validate(&self, store: &TensorStore) -> Result<()> {
        for (key, shape) in self.expected_shapes() {
            store.expect_shape(&key, &shape, "")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct AutoEncoder {
    pub config: AutoEncoderConfig,
    /// Query-chunk length of the mid attention (h·w tokens at latent resolution).
    pub attn_chunk: Option<usize>,
}

impl AutoEncoder {
    pub fn new(config: AutoEncoderConfig, attn_chunk: Option<usize>) -> Self {
        Self { config, attn_chunk }
    }

    pub fn encoder_stages(&self) -> Vec<StageSpec> {
        let mut s = vec![StageSpec::under("encoder.conv_in")];
        s.extend((0..self.config.levels()).map(|i| StageSpec::under(format!("encoder.down.{i}"))));
        s.push(StageSpec::under("encoder.mid"));
        s.push(StageSpec::groups(
            "encoder.out",
            &["encoder.norm_out", "encoder.conv_out"],
        ));
        s
    }

    pub fn decoder_stages(&self) -> Vec<StageSpec> {
        let mut s = vec![
            StageSpec::under("decoder.conv_in"),
            StageSpec::under("decoder.mid"),
        ];
        s.extend(
            (0..self.config.levels())
                .rev()
                .map(|i| StageSpec::under(format!("decoder.up.{i}"))),
        );
        s.push(StageSpec::groups(
            "decoder.out",
            &["decoder.norm_out", "decoder.conv_out"],
        ));
        s
    }

    /// Image `[B, 3, H, W]` in [−1, 1] → scaled latent `[B, 16, H/8, W/8]` (the mean, no sampling).
    pub fn encode(&self, w: &dyn Weights, x: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let s = w.stage("encoder.conv_in")?;
        let mut h = conv(&s, "", &x.to_dtype(w.dtype())?, 1, 1)?;
        for i in 0..cfg.levels() {
            let s = w.stage(&format!("encoder.down.{i}"))?;
            for j in 0..cfg.num_res_blocks {
                h = resnet(&s, &format!("block.{j}."), &h)?;
            }
            if i + 1 != cfg.levels() {
                h = h.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
                h = conv(&s, "downsample.conv.", &h, 0, 2)?;
            }
        }
        h = self.mid(&*w.stage("encoder.mid")?, &h)?;
        let s = w.stage("encoder.out")?;
        h = swish(&group_norm(&s, "encoder.norm_out.", &h)?)?;
        h = conv(&s, "encoder.conv_out.", &h, 1, 1)?;
        let mean = h.narrow(1, 0, cfg.z_channels)?;
        Ok(((mean - cfg.shift_factor)? * cfg.scale_factor)?)
    }

    /// Scaled latent → image in roughly [−1, 1].
    pub fn decode(&self, w: &dyn Weights, z: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let z = ((z.to_dtype(w.dtype())? / cfg.scale_factor)? + cfg.shift_factor)?;
        let mut h = conv(&*w.stage("decoder.conv_in")?, "", &z, 1, 1)?;
        h = self.mid(&*w.stage("decoder.mid")?, &h)?;
        for i in (0..cfg.levels()).rev() {
            let s = w.stage(&format!("decoder.up.{i}"))?;
            for j in 0..=cfg.num_res_blocks {
                h = resnet(&s, &format!("block.{j}."), &h)?;
            }
            if i != 0 {
                let (_, _, hh, ww) = h.dims4()?;
                h = conv(
                    &s,
                    "upsample.conv.",
                    &h.upsample_nearest2d(hh * 2, ww * 2)?,
                    1,
                    1,
                )?;
            }
        }
        let s = w.stage("decoder.out")?;
        h = swish(&group_norm(&s, "decoder.norm_out.", &h)?)?;
        conv(&s, "decoder.conv_out.", &h, 1, 1)
    }

    fn mid(&self, s: &StageWeights, h: &Tensor) -> Result<Tensor> {
        let h = resnet(s, "block_1.", h)?;
        let h = self.attn(s, "attn_1.", &h)?;
        resnet(s, "block_2.", &h)
    }

    /// Single-head self-attention over the h·w positions, channels as the head dim.
    fn attn(&self, s: &StageWeights, p: &str, x: &Tensor) -> Result<Tensor> {
        let (b, c, hh, ww) = x.dims4()?;
        let n = group_norm(s, &format!("{p}norm."), x)?;
        let tokens = |name: &str| -> Result<Tensor> {
            let t = conv(s, &format!("{p}{name}."), &n, 0, 1)?;
            Ok(t.reshape((b, 1, c, hh * ww))?.transpose(2, 3)?)
        };
        let a = attention(&tokens("q")?, &tokens("k")?, &tokens("v")?, self.attn_chunk)?;
        let a = a.transpose(2, 3)?.reshape((b, c, hh, ww))?;
        Ok((x + conv(s, &format!("{p}proj_out."), &a, 0, 1)?)?)
    }
}

fn resnet(s: &StageWeights, p: &str, x: &Tensor) -> Result<Tensor> {
    let h = conv(
        s,
        &format!("{p}conv1."),
        &swish(&group_norm(s, &format!("{p}norm1."), x)?)?,
        1,
        1,
    )?;
    let h = conv(
        s,
        &format!("{p}conv2."),
        &swish(&group_norm(s, &format!("{p}norm2."), &h)?)?,
        1,
        1,
    )?;
    let skip = if s.get_opt(&format!("{p}nin_shortcut.weight")).is_some() {
        conv(s, &format!("{p}nin_shortcut."), x, 0, 1)?
    } else {
        x.clone()
    };
    Ok((skip + h)?)
}

fn conv(s: &StageWeights, p: &str, x: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let w = s.get(&format!("{p}weight"))?;
    let b = s.get(&format!("{p}bias"))?;
    let y = x.conv2d(&w, padding, stride, 1, 1)?;
    Ok(y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?)
}

/// GroupNorm(32, eps 1e-6) with affine parameters, statistics in f32.
fn group_norm(s: &StageWeights, p: &str, x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let dtype = x.dtype();
    let xf = x
        .to_dtype(DType::F32)?
        .reshape((b, NORM_GROUPS, (c / NORM_GROUPS) * h * w))?;
    let mean = xf.mean_keepdim(2)?;
    let centred = xf.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(2)?;
    let y = centred.broadcast_div(&(var + NORM_EPS)?.sqrt()?)?;
    let y = y.reshape((b, c, h, w))?.to_dtype(dtype)?;
    let weight = s.get(&format!("{p}weight"))?.reshape((1, c, 1, 1))?;
    let bias = s.get(&format!("{p}bias"))?.reshape((1, c, 1, 1))?;
    Ok(y.broadcast_mul(&weight)?.broadcast_add(&bias)?)
}

fn swish(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::silu(x)?)
}

/// Builder of (key, shape) lists for [`AutoEncoderConfig::expected_shapes`].
#[derive(Default)]
struct ShapeList(Vec<(String, Vec<usize>)>);

impl ShapeList {
    fn conv(&mut self, name: &str, o: usize, i: usize, k: usize) {
        self.0.push((format!("{name}.weight"), vec![o, i, k, k]));
        self.0.push((format!("{name}.bias"), vec![o]));
    }
    fn norm(&mut self, name: &str, c: usize) {
        self.0.push((format!("{name}.weight"), vec![c]));
        self.0.push((format!("{name}.bias"), vec![c]));
    }
    fn resnet(&mut self, p: &str, i: usize, o: usize) {
        self.norm(&format!("{p}.norm1"), i);
        self.conv(&format!("{p}.conv1"), o, i, 3);
        self.norm(&format!("{p}.norm2"), o);
        self.conv(&format!("{p}.conv2"), o, o, 3);
        if i != o {
            self.conv(&format!("{p}.nin_shortcut"), o, i, 1);
        }
    }
}
