//! The FLUX autoencoder (docs/flux.md §2.2): an LDM-style VAE with 16 latent channels, 8× down-sampling,
//! one single-head attention in the middle, and a scale/shift on the latent.

use candle_core::DType;

use crate::checkpoint::store::TensorStore;
use crate::error::{Error, Result};
use crate::model::attention::attention;
use crate::model::t5::dims;
use crate::model::weights::{Stage, StageSpec, Weights};
use crate::tensor::{HostBuffer, Tensor};

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
    pub fn encode<T: Tensor, W: Weights<T>>(&self, w: &W, x: &T) -> Result<T> {
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
        h = self.mid(&w.stage("encoder.mid")?, &h)?;
        let s = w.stage("encoder.out")?;
        h = swish(&group_norm(&s, "encoder.norm_out.", &h)?)?;
        h = conv(&s, "encoder.conv_out.", &h, 1, 1)?;
        let mean = h.narrow(1, 0, cfg.z_channels)?;
        mean.affine(1.0, -cfg.shift_factor)?
            .affine(cfg.scale_factor, 0.0)
    }

    /// Scaled latent → image in roughly [−1, 1].
    pub fn decode<T: Tensor, W: Weights<T>>(&self, w: &W, z: &T) -> Result<T> {
        let cfg = &self.config;
        let z = z
            .to_dtype(w.dtype())?
            .affine(1.0 / cfg.scale_factor, 0.0)?
            .affine(1.0, cfg.shift_factor)?;
        let mut h = conv(&w.stage("decoder.conv_in")?, "", &z, 1, 1)?;
        h = self.mid(&w.stage("decoder.mid")?, &h)?;
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

    /// [`AutoEncoder::decode`] tile by tile: the latent is cut into overlapping tiles of
    /// `tile / 8` latent pixels a side (overlap a quarter of the tile), each decoded on its own
    /// and blended into the image with linear (feathered) weights over the overlaps, normalised
    /// so that they sum to one everywhere. Memory is that of one tile's decode plus the output
    /// image. The result is on the host (CPU), in f32.
    ///
    /// Not bit-identical to the whole decode: every GroupNorm takes its statistics over the tile,
    /// not the image, and the mid attention sees the tile only; the overlaps hide the seams.
    pub fn decode_tiled<T: Tensor, W: Weights<T>>(&self, w: &W, z: &T, tile: usize) -> Result<T> {
        let (b, _, lh, lw) = z.dims4()?;
        let t = (tile / 8).max(1);
        let overlap = vae_tile_overlap(t);
        let ys = tile_starts(lh, t, overlap);
        let xs = tile_starts(lw, t, overlap);
        let (th, tw) = (t.min(lh), t.min(lw));
        let wy = tile_weights(&ys, th, lh, 8);
        let wx = tile_weights(&xs, tw, lw, 8);
        let (ph, pw) = (8 * lh, 8 * lw);
        let oc = self.config.out_ch;
        let host = T::host_of(z.device());
        let mut out = T::Host::zeros(b * oc * ph * pw, &host)?;
        for (iy, &y0) in ys.iter().enumerate() {
            for (ix, &x0) in xs.iter().enumerate() {
                let zt = z.narrow(2, y0, th)?.narrow(3, x0, tw)?.contiguous()?;
                let img = self.decode(w, &zt)?;
                drop(zt);
                let wt = tile_weight::<T>(&wy[iy], &wx[ix], img.device())?;
                let weighted = img.to_dtype(DType::F32)?.broadcast_mul(&wt)?;
                out.add_tile(&weighted, b * oc, ph, pw, 8 * y0, 8 * x0)?;
            }
        }
        out.into_tensor(&[b, oc, ph, pw], &host)
    }

    /// [`AutoEncoder::encode`] tile by tile: overlapping image tiles of `tile` pixels a side
    /// (on the 8-pixel grid, overlap a quarter of the tile), each encoded on its own and blended
    /// into the latent with linear weights over the overlaps (normalised to sum to one). Images
    /// whose sides are not multiples of 8, or that fit in one tile, are encoded whole. The
    /// result is on the input's device, in f32.
    pub fn encode_tiled<T: Tensor, W: Weights<T>>(&self, w: &W, x: &T, tile: usize) -> Result<T> {
        let (b, _, ph, pw) = x.dims4()?;
        let t = (tile / 8).max(1);
        if !ph.is_multiple_of(8) || !pw.is_multiple_of(8) || 8 * t >= ph.max(pw) {
            return self.encode(w, x)?.to_dtype(DType::F32);
        }
        let (lh, lw) = (ph / 8, pw / 8);
        let overlap = vae_tile_overlap(t);
        let ys = tile_starts(lh, t, overlap);
        let xs = tile_starts(lw, t, overlap);
        let (th, tw) = (t.min(lh), t.min(lw));
        let wy = tile_weights(&ys, th, lh, 1);
        let wx = tile_weights(&xs, tw, lw, 1);
        let zc = self.config.z_channels;
        let mut out = T::Host::zeros(b * zc * lh * lw, x.device())?;
        for (iy, &y0) in ys.iter().enumerate() {
            for (ix, &x0) in xs.iter().enumerate() {
                let xt = x
                    .narrow(2, 8 * y0, 8 * th)?
                    .narrow(3, 8 * x0, 8 * tw)?
                    .contiguous()?;
                let z = self.encode(w, &xt)?;
                drop(xt);
                let wt = tile_weight::<T>(&wy[iy], &wx[ix], z.device())?;
                let weighted = z.to_dtype(DType::F32)?.broadcast_mul(&wt)?;
                out.add_tile(&weighted, b * zc, lh, lw, y0, x0)?;
            }
        }
        out.into_tensor(&[b, zc, lh, lw], x.device())
    }

    fn mid<T: Tensor, S: Stage<T>>(&self, s: &S, h: &T) -> Result<T> {
        let h = resnet(s, "block_1.", h)?;
        let h = self.attn(s, "attn_1.", &h)?;
        resnet(s, "block_2.", &h)
    }

    /// Single-head self-attention over the h·w positions, channels as the head dim.
    fn attn<T: Tensor, S: Stage<T>>(&self, s: &S, p: &str, x: &T) -> Result<T> {
        let (b, c, hh, ww) = x.dims4()?;
        let n = group_norm(s, &format!("{p}norm."), x)?;
        let tokens = |name: &str| -> Result<T> {
            let t = conv(s, &format!("{p}{name}."), &n, 0, 1)?;
            t.reshape(&[b, 1, c, hh * ww])?.transpose(2, 3)
        };
        let a = attention(&tokens("q")?, &tokens("k")?, &tokens("v")?, self.attn_chunk)?;
        let a = a.transpose(2, 3)?.reshape(&[b, c, hh, ww])?;
        x.add(&conv(s, &format!("{p}proj_out."), &a, 0, 1)?)
    }
}

/// A tile's 2-D blending weight `[h, w]`: the product of its two axes' weights.
fn tile_weight<T: Tensor>(wy: &[f32], wx: &[f32], device: &T::Device) -> Result<T> {
    let y = T::from_f32(&[wy.len(), 1], device, || wy.to_vec())?;
    let x = T::from_f32(&[1, wx.len()], device, || wx.to_vec())?;
    y.broadcast_mul(&x)
}

/// The overlap (latent pixels) between neighbouring VAE tiles of `t` latent pixels a side.
pub fn vae_tile_overlap(t: usize) -> usize {
    t / 4
}

/// Start offsets of tiles of length `t` covering `len` with at least `overlap` between
/// neighbours, spread evenly (the first at 0, the last ending at `len`).
pub fn tile_starts(len: usize, t: usize, overlap: usize) -> Vec<usize> {
    if len <= t {
        return vec![0];
    }
    let overlap = overlap.min(t - 1);
    let n = (len - overlap).div_ceil(t - overlap);
    (0..n)
        .map(|i| (i * (len - t) + (n - 1) / 2) / (n - 1))
        .collect()
}

/// Per tile, the pixel weights along one axis: ramps of `(p + ½) / overlap` over the overlaps
/// with the neighbours (1 elsewhere), normalised so that the tiles' weights sum to one at every
/// pixel. Separable: the 2-D weight of a tile is the product of its two axes' weights, and the
/// product of the normalised axes sums to one too.
fn tile_weights(starts: &[usize], t: usize, len: usize, scale: usize) -> Vec<Vec<f32>> {
    let n = scale * t;
    let mut ws: Vec<Vec<f32>> = starts
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let left = (i > 0).then(|| scale * (starts[i - 1] + t - s));
            let right = starts.get(i + 1).map(|&next| scale * (s + t - next));
            (0..n)
                .map(|p| {
                    let mut w = 1f32;
                    if let Some(o) = left.filter(|&o| o > 0) {
                        w = w.min((p as f32 + 0.5) / o as f32);
                    }
                    if let Some(o) = right.filter(|&o| o > 0) {
                        w = w.min(((n - p) as f32 - 0.5) / o as f32);
                    }
                    w
                })
                .collect()
        })
        .collect();
    let mut sum = vec![0f32; scale * len];
    for (w, &s) in ws.iter().zip(starts) {
        for (p, v) in w.iter().enumerate() {
            sum[scale * s + p] += v;
        }
    }
    for (w, &s) in ws.iter_mut().zip(starts) {
        for (p, v) in w.iter_mut().enumerate() {
            *v /= sum[scale * s + p];
        }
    }
    ws
}

fn resnet<T: Tensor, S: Stage<T>>(s: &S, p: &str, x: &T) -> Result<T> {
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
    skip.add(&h)
}

fn conv<T: Tensor, S: Stage<T>>(s: &S, p: &str, x: &T, padding: usize, stride: usize) -> Result<T> {
    let w = s.get(&format!("{p}weight"))?;
    let b = s.get(&format!("{p}bias"))?;
    let y = x.conv2d(&w, padding, stride)?;
    y.broadcast_add(&b.reshape(&[1, b.dim(0)?, 1, 1])?)
}

/// GroupNorm(32, eps 1e-6) with affine parameters, statistics in f32.
fn group_norm<T: Tensor, S: Stage<T>>(s: &S, p: &str, x: &T) -> Result<T> {
    let (b, c, h, w) = x.dims4()?;
    let dtype = x.dtype();
    let xf = x
        .to_dtype(DType::F32)?
        .reshape(&[b, NORM_GROUPS, (c / NORM_GROUPS) * h * w])?;
    let mean = xf.mean_keepdim(2)?;
    let centred = xf.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(2)?;
    let y = centred.broadcast_div(&var.affine(1.0, NORM_EPS)?.sqrt()?)?;
    let y = y.reshape(&[b, c, h, w])?.to_dtype(dtype)?;
    let weight = s.get(&format!("{p}weight"))?.reshape(&[1, c, 1, 1])?;
    let bias = s.get(&format!("{p}bias"))?.reshape(&[1, c, 1, 1])?;
    y.broadcast_mul(&weight)?.broadcast_add(&bias)
}

fn swish<T: Tensor>(x: &T) -> Result<T> {
    x.silu()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_axis_and_their_weights_sum_to_one() {
        for (len, t) in [
            (16, 8),
            (17, 8),
            (40, 16),
            (128, 64),
            (8, 8),
            (5, 8),
            (100, 9),
        ] {
            let o = vae_tile_overlap(t);
            let starts = tile_starts(len, t, o);
            let tl = t.min(len);
            assert_eq!(starts[0], 0);
            assert_eq!(starts.last().unwrap() + tl, len, "{len} {t}: {starts:?}");
            for w in starts.windows(2) {
                assert!(w[0] + tl >= w[1] + o, "{len} {t}: {starts:?}");
            }
            for scale in [1, 8] {
                let ws = tile_weights(&starts, tl, len, scale);
                let mut sum = vec![0f32; scale * len];
                for (w, &s) in ws.iter().zip(&starts) {
                    for (p, v) in w.iter().enumerate() {
                        sum[scale * s + p] += v;
                    }
                }
                assert!(sum.iter().all(|s| (s - 1.0).abs() < 1e-5), "{len} {t}");
            }
        }
    }
}
