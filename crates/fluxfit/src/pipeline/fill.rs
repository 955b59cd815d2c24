//! FLUX.1 Fill (inpainting and outpainting): the conditioning of docs/flux.md §3 `prepare_fill` and the
//! reference demo's geometry (docs/flux.md §4.3 `resize`, §4.4 `add_border_and_mask`).

use candle_core::{DType, Tensor};

use super::model::Model;
use super::text2image::{Cond, Event, Generated, Request, Start};
use crate::error::{Error, Result};
use crate::sampling;

/// Python's `round` (half to even), as the demo's size rules use it.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// `32·round(v / 32)`.
fn snap32(v: f64) -> usize {
    (32.0 * round_half_even(v / 32.0)) as usize
}

/// The demo's `resize(img, min_mp=0.5, max_mp=2.0)` size (docs/flux.md §4.3): within 0.5–2 MP (10⁶
/// pixels) the sides are only snapped to multiples of 32; outside, the image is first scaled by
/// √(bound / MP). Returns the new (width, height); the caller resizes (Lanczos) if it changed.
pub fn fill_size(width: usize, height: usize) -> (usize, usize) {
    let (min_mp, max_mp) = (0.5, 2.0);
    let mp = (width * height) as f64 / 1e6;
    let scale = if mp < min_mp {
        (min_mp / mp).sqrt()
    } else if mp > max_mp {
        (max_mp / mp).sqrt()
    } else {
        1.0
    };
    (
        snap32(width as f64 * scale).max(32),
        snap32(height as f64 * scale).max(32),
    )
}

/// Outpainting request (`--outpaint left=…,right=…,up=…,down=…,overlap=…`, `--zoom-out Z`):
/// fractions of the original's sides.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Outpaint {
    pub left: f64,
    pub right: f64,
    pub up: f64,
    pub down: f64,
    pub overlap: f64,
    /// The demo's "zoom all": (zoom − 1)/2 of each side added to every side when > 1.
    pub zoom: f64,
}

impl Default for Outpaint {
    fn default() -> Self {
        Self {
            left: 0.0,
            right: 0.0,
            up: 0.0,
            down: 0.0,
            overlap: 0.05,
            zoom: 1.0,
        }
    }
}

impl Outpaint {
    /// Parses `left=0.25,right=0.25,up=0,down=0,overlap=0.05` (any subset; the rest default
    /// to 0, overlap 0.05) over `self`.
    pub fn parse_over(mut self, spec: &str) -> Result<Self> {
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let bad = |why: &str| {
                Error::InvalidRequest(format!(
                    "outpaint item `{item}`: {why} (expected left|right|up|down|overlap=FRACTION)"
                ))
            };
            let (k, v) = item.split_once('=').ok_or_else(|| bad("no `=`"))?;
            let v: f64 = v
                .trim()
                .parse()
                .map_err(|_| bad("the value is not a number"))?;
            let (field, max) = match k.trim() {
                "left" => (&mut self.left, 4.0),
                "right" => (&mut self.right, 4.0),
                "up" => (&mut self.up, 4.0),
                "down" => (&mut self.down, 4.0),
                "overlap" => (&mut self.overlap, 0.5),
                _ => return Err(bad("unknown side")),
            };
            if !(0.0..=max).contains(&v) {
                return Err(bad(&format!("the value is outside [0, {max}]")));
            }
            *field = v;
        }
        Ok(self)
    }
}

/// Where things go on the outpainting canvas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct OutpaintGeometry {
    /// Canvas (width, height), multiples of 32.
    pub canvas: (usize, usize),
    /// Top-left of the original on the canvas.
    pub paste: (usize, usize),
    /// The kept (black in the mask) rectangle: x0, y0, x1, y1 (exclusive).
    pub keep: (usize, usize, usize, usize),
}

/// Pads of one axis: `int(orig·side) + int(orig·(zoom − 1)/2)` when zoom > 1.
fn pads(orig: usize, a: f64, b: f64, zoom: f64) -> (usize, usize) {
    let z = if zoom > 1.0 {
        (orig as f64 * (zoom - 1.0) / 2.0) as usize
    } else {
        0
    };
    (
        (orig as f64 * a) as usize + z,
        (orig as f64 * b) as usize + z,
    )
}

/// The reference's canvas and paste offset (docs/flux.md §4.4): the canvas is rounded to a multiple of
/// 32 but the original stays at (left pad, top pad), so the rounding is all taken from (or
/// given to) the right and bottom border, and a canvas rounded down can cut the original off.
pub fn reference_outpaint(
    width: usize,
    height: usize,
    o: &Outpaint,
) -> ((usize, usize), (usize, usize)) {
    let (l, r) = pads(width, o.left, o.right, o.zoom);
    let (u, d) = pads(height, o.up, o.down, o.zoom);
    let canvas = (
        snap32((width + l + r) as f64),
        snap32((height + u + d) as f64),
    );
    (canvas, (l, u))
}

/// The outpainting geometry, with the reference's paste-offset bug fixed: the difference the
/// rounding to 32 makes is shared between the two borders of an axis in proportion to their
/// pads (half each when both are 0), and the original is kept wholly on the canvas.
pub fn outpaint_geometry(width: usize, height: usize, o: &Outpaint) -> OutpaintGeometry {
    let axis = |orig: usize, a: usize, b: usize| -> (usize, usize) {
        let want = orig + a + b;
        let size = snap32(want as f64).max(32 * orig.div_ceil(32));
        let diff = size as f64 - want as f64;
        let share = if a + b == 0 {
            0.5
        } else {
            a as f64 / (a + b) as f64
        };
        let pos = (a as f64 + diff * share).round().max(0.0) as usize;
        (size, pos.min(size - orig))
    };
    let (l, r) = pads(width, o.left, o.right, o.zoom);
    let (u, d) = pads(height, o.up, o.down, o.zoom);
    let (cw, px) = axis(width, l, r);
    let (ch, py) = axis(height, u, d);
    let (ox, oy) = (
        (o.overlap * width as f64) as usize,
        (o.overlap * height as f64) as usize,
    );
    let keep = (
        px + ox.min(width / 2),
        py + oy.min(height / 2),
        px + width - ox.min(width / 2),
        py + height - oy.min(height / 2),
    );
    OutpaintGeometry {
        canvas: (cw, ch),
        paste: (px, py),
        keep,
    }
}

/// The canvas (black around the pasted original) and its mask (255 = generate, 0 = keep).
pub fn outpaint_canvas(
    img: &crate::image::Rgb8,
    g: &OutpaintGeometry,
) -> (crate::image::Rgb8, Vec<u8>) {
    let (cw, ch) = g.canvas;
    let mut data = vec![0u8; cw * ch * 3];
    for y in 0..img.height.min(ch - g.paste.1) {
        let src = &img.data[y * img.width * 3..][..img.width.min(cw - g.paste.0) * 3];
        let dst = (g.paste.1 + y) * cw * 3 + g.paste.0 * 3;
        data[dst..dst + src.len()].copy_from_slice(src);
    }
    let mut mask = vec![255u8; cw * ch];
    let (x0, y0, x1, y1) = g.keep;
    for y in y0..y1.min(ch) {
        for m in &mut mask[y * cw + x0..y * cw + x1.min(cw)] {
            *m = 0;
        }
    }
    (
        crate::image::Rgb8 {
            width: cw,
            height: ch,
            data,
        },
        mask,
    )
}

/// Where a fill's mask comes from.
pub enum MaskFrom<'a> {
    /// A mask the image's size (255 = generate, soft values kept), and how to name it.
    Mask(&'a [u8], (usize, usize), String),
    /// The image's alpha channel made a mask ([`crate::image::read_alpha_mask`]).
    Alpha(&'a [u8]),
    /// Borders to outpaint.
    Outpaint(Outpaint),
}

/// The canvas a Fill model is given, its mask (255 = generate) and a description for the
/// metadata, from the source image as the fill demo prepares it: resized into 0.5–2 MP with
/// sides multiples of 32 ([`fill_size`]; `keep_size` keeps sides already multiples of 32),
/// then masked or outpainted.
pub fn fill_canvas(
    src: &crate::image::Rgb8,
    mask: MaskFrom,
    keep_size: bool,
) -> Result<(crate::image::Rgb8, Vec<u8>, String)> {
    use crate::image::{resize_lanczos, resize_mask_lanczos};
    let (w, h) = if keep_size {
        if !src.width.is_multiple_of(32) || !src.height.is_multiple_of(32) {
            return Err(Error::InvalidRequest(format!(
                "keep size: the image is {}x{}; fill needs sides that are multiples of 32",
                src.width, src.height
            )));
        }
        (src.width, src.height)
    } else {
        fill_size(src.width, src.height)
    };
    let img = resize_lanczos(src, w, h);
    Ok(match mask {
        MaskFrom::Outpaint(o) => {
            let g = outpaint_geometry(w, h, &o);
            let (c, m) = outpaint_canvas(&img, &g);
            let desc = format!(
                "outpaint left={},right={},up={},down={},overlap={},zoom={}; canvas {}x{}, image at {},{}",
                o.left, o.right, o.up, o.down, o.overlap, o.zoom, g.canvas.0, g.canvas.1, g.paste.0, g.paste.1
            );
            (c, m, desc)
        }
        MaskFrom::Mask(m, (mw, mh), name) => {
            if (mw, mh) != (src.width, src.height) {
                return Err(Error::InvalidRequest(format!(
                    "mask {name} is {mw}x{mh}, the image {}x{}: they must have the same size",
                    src.width, src.height
                )));
            }
            (img, resize_mask_lanczos(m, (mw, mh), (w, h)), name)
        }
        MaskFrom::Alpha(m) => (
            img,
            resize_mask_lanczos(m, (src.width, src.height), (w, h)),
            "alpha".to_string(),
        ),
    })
}

/// The 320 conditioning features per token (docs/flux.md §3 `prepare_fill`):
/// `[ae.encode(image·(1 − mask)) packed 64 ‖ mask 8×8-unshuffled and packed 256]`, both
/// rounded through bf16 as the reference does, then in `dtype`. `image` `[1, 3, H, W]` in
/// [−1, 1] (`b/127.5 − 1`), `mask` `[1, 1, H, W]` in [0, 1] (soft values kept); sides multiples
/// of 16. `encode` is the autoencoder's (scaled latent).
pub fn fill_conditioning<T: crate::tensor::Tensor>(
    image: &T,
    mask: &T,
    dtype: DType,
    encode: impl FnOnce(&T) -> Result<T>,
) -> Result<T> {
    let (_, _, h, w) = image.dims4()?;
    if !h.is_multiple_of(16) || !w.is_multiple_of(16) {
        return Err(Error::InvalidRequest(format!(
            "fill needs sides that are multiples of 16 (32 for the reference's checks), not {w}x{h}"
        )));
    }
    if mask.dims() != [1, 1, h, w] {
        return Err(Error::InvalidRequest(format!(
            "the mask is {:?}, the image {w}x{h}: they must have the same size",
            mask.dims()
        )));
    }
    let one_minus = mask.affine(-1.0, 1.0)?;
    let masked = image.broadcast_mul(&one_minus)?;
    let z = encode(&masked)?.to_dtype(DType::BF16)?;
    let z = sampling::pack(&z)?.to_dtype(dtype)?;
    let (lh, lw) = (h / 8, w / 8);
    let m = mask
        .to_device(z.device())?
        .to_dtype(DType::BF16)?
        .reshape(&[1, lh, 8, lw, 8])?
        .permute(&[0, 2, 4, 1, 3])?
        .reshape(&[1, 64, lh, lw])?;
    let m = sampling::pack(&m)?.to_dtype(dtype)?;
    T::cat(&[&z, &m], 2)
}

/// An 8-bit image and mask as `prepare_fill` reads them: the image `b/127.5 − 1`, the mask
/// `b/255`, as `[1, 3, H, W]` and `[1, 1, H, W]` f32 tensors on the CPU.
pub fn fill_tensors(img: &crate::image::Rgb8, mask: &[u8]) -> Result<(Tensor, Tensor)> {
    let (w, h) = (img.width, img.height);
    if mask.len() != w * h {
        return Err(Error::InvalidRequest(format!(
            "the mask has {} pixels, the image {w}x{h}: they must have the same size",
            mask.len()
        )));
    }
    let mut v = vec![0f32; 3 * h * w];
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            v[c * h * w + i] = px[c] as f32 / 127.5 - 1.0;
        }
    }
    let m: Vec<f32> = mask.iter().map(|&b| b as f32 / 255.0).collect();
    let dev = candle_core::Device::Cpu;
    Ok((
        Tensor::from_vec(v, (1, 3, h, w), &dev)?,
        Tensor::from_vec(m, (1, 1, h, w), &dev)?,
    ))
}

impl Model {
    /// Fill (inpainting / outpainting, docs/flux.md §3 `prepare_fill`): `image` `[1, 3, H, W]` in
    /// [−1, 1] and `mask` `[1, 1, H, W]` in [0, 1] (1 = generate) at the request's size; the
    /// conditioning is made in the encode phase. Needs a Fill model (flow in_channels 384).
    pub fn fill(
        &self,
        req: &Request,
        image: &Tensor,
        mask: &Tensor,
        embeddings: Option<(&Tensor, &Tensor)>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generated> {
        let need = 64 + 320;
        if self.flow.net.config.in_channels != need {
            return Err(Error::InvalidRequest(format!(
                "fill needs a Fill model (flow in_channels {need}); {} has {}",
                self.name, self.flow.net.config.in_channels
            )));
        }
        if image.dims() != [1, 3, req.height, req.width] {
            return Err(Error::InvalidRequest(format!(
                "the fill image is {:?}, the request needs [1, 3, {}, {}]",
                image.dims(),
                req.height,
                req.width
            )));
        }
        self.conditioned(
            req,
            embeddings,
            on_event,
            || self.fill_conditioning(image, mask),
            |txt, vec, cond, on_event| {
                self.denoise_decode(req, txt, vec, Start::Noise, Cond::Channels(cond), on_event)
            },
        )
    }

    /// `prepare_fill`'s conditioning `[1, L, 320]` in the compute dtype, on the compute device.
    pub fn fill_conditioning(&self, image: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let dev = self.device().clone();
        fill_conditioning(image, mask, self.dtype(), |x| self.encode_image(x))?
            .to_device(&dev)
            .map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_rounding() {
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
        assert_eq!(round_half_even(-0.5), 0.0);
        assert_eq!(round_half_even(2.4), 2.0);
        assert_eq!(round_half_even(2.6), 3.0);
    }

    #[test]
    fn fill_size_rule() {
        // In range: snapped only. 1000x750 = 0.75 MP → 992x736 (31.25 → 31, 23.4375 → 23).
        assert_eq!(fill_size(1000, 750), (992, 768 - 32));
        assert_eq!(fill_size(1024, 1024), (1024, 1024));
        // 1040/32 = 32.5 rounds to even: 32 → 1024.
        assert_eq!(fill_size(1040, 1024), (1024, 1024));
        // Too small: 512x512 = 0.26 MP scaled by √(0.5/0.262144) = 1.381 → 707.1 → 704.
        assert_eq!(fill_size(512, 512), (704, 704));
        // Too large: 4000x3000 = 12 MP scaled by √(2/12) → 1633 x 1224.7 → 1632 x 1216.
        assert_eq!(fill_size(4000, 3000), (1632, 1216));
    }

    #[test]
    fn outpaint_geometry_sizes_offsets_and_masks() {
        // 512x512, left and right 0.25 (128 px each), overlap 0.05 (25 px).
        let o = Outpaint::default()
            .parse_over("left=0.25,right=0.25")
            .unwrap();
        let g = outpaint_geometry(512, 512, &o);
        assert_eq!(g.canvas, (768, 512));
        assert_eq!(g.paste, (128, 0));
        assert_eq!(g.keep, (128 + 25, 25, 128 + 512 - 25, 512 - 25));
        assert_eq!(reference_outpaint(512, 512, &o), ((768, 512), (128, 0)));

        // Zoom out 1.5 on 640x480: 160 and 120 px on each side → 960x720 → 960x704
        // (22.5 → 22). The reference pastes at (160, 120), leaving 0 px below the original
        // where 120 were asked for the top; fixed: the 16 px lost are taken half from each
        // border, the original at (160, 112).
        let z = Outpaint {
            zoom: 1.5,
            ..Outpaint::default()
        };
        assert_eq!(reference_outpaint(640, 480, &z), ((960, 704), (160, 120)));
        let g = outpaint_geometry(640, 480, &z);
        assert_eq!(g.canvas, (960, 704));
        assert_eq!(g.paste, (160, 112));
        assert_eq!(g.keep, (160 + 32, 112 + 24, 160 + 640 - 32, 112 + 480 - 24));

        // Only a right border, rounded down: 512 + 0.05·512 = 537 → 544 (16.78 → 17); up
        // 0.03 of 512 = 15 px → 527 → 512 (16.47 → 16): the reference pastes at y = 15 on a
        // 512 canvas and cuts 15 rows off the bottom of the original; fixed: it stays whole.
        let o = Outpaint::default()
            .parse_over("right=0.05,up=0.03,overlap=0")
            .unwrap();
        let (canvas, paste) = reference_outpaint(512, 512, &o);
        assert_eq!((canvas, paste), ((544, 512), (0, 15)));
        assert!(
            paste.1 + 512 > canvas.1,
            "the reference cuts the original off"
        );
        let g = outpaint_geometry(512, 512, &o);
        assert_eq!(g.canvas, (544, 512));
        assert_eq!(g.paste, (0, 0));
        assert_eq!(g.keep, (0, 0, 512, 512));

        // The canvas: original pasted, mask 0 inside the keep rectangle only.
        let img = crate::image::Rgb8 {
            width: 64,
            height: 32,
            data: vec![200; 64 * 32 * 3],
        };
        let o = Outpaint::default()
            .parse_over("left=0.5,down=0.5,overlap=0.125")
            .unwrap();
        let g = outpaint_geometry(64, 32, &o);
        assert_eq!(g.canvas, (96, 64));
        assert_eq!(g.paste, (32, 0));
        assert_eq!(g.keep, (40, 4, 88, 28));
        let (c, m) = outpaint_canvas(&img, &g);
        assert_eq!((c.width, c.height), (96, 64));
        assert_eq!(c.data[31 * 3], 0);
        assert_eq!(c.data[32 * 3], 200);
        assert_eq!(c.data[(31 * 96 + 95) * 3], 200);
        assert_eq!(c.data[(32 * 96 + 95) * 3], 0);
        assert_eq!(m[4 * 96 + 40], 0);
        assert_eq!(m[4 * 96 + 39], 255);
        assert_eq!(m[27 * 96 + 87], 0);
        assert_eq!(m[28 * 96 + 87], 255);
        assert_eq!(m.iter().filter(|&&v| v == 0).count(), 48 * 24);
    }

    #[test]
    fn outpaint_specs_are_checked() {
        assert!(Outpaint::default().parse_over("left=2,overlap=0.3").is_ok());
        assert!(Outpaint::default().parse_over("side=1").is_err());
        assert!(Outpaint::default().parse_over("left=-1").is_err());
        assert!(Outpaint::default().parse_over("overlap=0.9").is_err());
        assert!(Outpaint::default().parse_over("left").is_err());
    }
}
