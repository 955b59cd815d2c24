//! FLUX.1 Kontext editing (docs/flux.md §3 `prepare_kontext`): the conditioning image becomes extra
//! tokens at ids (1, r, c) after the target's, and only the target's prediction is integrated.

use candle_core::Tensor;

use super::model::Model;
use super::text2image::{Cond, Event, Generated, Request, Start};
use crate::error::{Error, Result};
use crate::variant::Variant;

/// The ~1 MP (width, height) pairs Kontext was trained on; the conditioning image is snapped to
/// the one of closest aspect ratio (the reference's `PREFERED_KONTEXT_RESOLUTIONS`).
pub const PREFERRED_RESOLUTIONS: [(usize, usize); 17] = [
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
];

/// The preferred resolution for an image of `width` × `height`: closest aspect ratio, ties to
/// the smaller width, then height (the reference's `min` over (|Δratio|, w, h) tuples).
pub fn conditioning_size(width: usize, height: usize) -> (usize, usize) {
    let ratio = width as f64 / height as f64;
    let key = |&(w, h): &(usize, usize)| ((ratio - w as f64 / h as f64).abs(), w, h);
    PREFERRED_RESOLUTIONS
        .iter()
        .copied()
        .min_by(|a, b| key(a).partial_cmp(&key(b)).expect("finite ratios"))
        .expect("the table is not empty")
}

/// A target size from an aspect ratio `W:H` at an area of 1024² (the reference's
/// `aspect_ratio_to_height_width`, which returns (width, height) despite its name):
/// `round(√(A·r))` and `round(√(A/r))`, each floored to a multiple of 16.
pub fn aspect_ratio_size(spec: &str) -> Result<(usize, usize)> {
    let bad = || {
        Error::InvalidRequest(format!(
            "aspect ratio `{spec}`: expected W:H with positive numbers, e.g. 16:9"
        ))
    };
    let (w, h) = spec.split_once(':').ok_or_else(bad)?;
    let (w, h): (f64, f64) = (
        w.trim().parse().map_err(|_| bad())?,
        h.trim().parse().map_err(|_| bad())?,
    );
    if !(w > 0.0 && h > 0.0 && w.is_finite() && h.is_finite()) {
        return Err(bad());
    }
    let r = w / h;
    let area = 1024.0 * 1024.0;
    // Python's round is half to even; the products here are never exact halves in practice,
    // but keep the rule.
    let round = |x: f64| {
        let r = x.round();
        if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
            r - 1.0
        } else {
            r
        }
    };
    let side = |x: f64| (round(x) as usize) / 16 * 16;
    let (tw, th) = (side((area * r).sqrt()), side((area / r).sqrt()));
    use super::text2image::{MAX_SIDE, MIN_SIDE};
    if tw < MIN_SIDE || th < MIN_SIDE || tw > MAX_SIDE || th > MAX_SIDE {
        return Err(Error::InvalidRequest(format!(
            "aspect ratio `{spec}` is too extreme: it gives {tw}x{th}, and sides must be {MIN_SIDE} to {MAX_SIDE} pixels"
        )));
    }
    Ok((tw, th))
}

/// An 8-bit image as the reference feeds the autoencoder: `b/127.5 − 1`, `[1, 3, H, W]` f32.
pub fn image_tensor(img: &crate::image::Rgb8) -> Result<Tensor> {
    let (w, h) = (img.width, img.height);
    let mut v = vec![0f32; 3 * h * w];
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            v[c * h * w + i] = px[c] as f32 / 127.5 - 1.0;
        }
    }
    Ok(Tensor::from_vec(
        v,
        (1, 3, h, w),
        &candle_core::Device::Cpu,
    )?)
}

impl Model {
    /// Kontext's conditioning tokens `[1, Lc, 64]` (encoded, rounded through bf16, packed, in
    /// the compute dtype) and their ids (1, r, c) `[1, Lc, 3]`, on the compute device.
    pub fn kontext_conditioning(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        super::run::kontext_tokens(self, image)
    }

    /// Kontext editing (docs/flux.md §3 `prepare_kontext`): `image` `[1, 3, h, w]` in [−1, 1] is the
    /// conditioning image, already at the size it is encoded at (the reference snaps it to
    /// [`conditioning_size`]); the target is the request's size. `embeddings`: already
    /// encoded text (`req.prompt` is then not read).
    pub fn kontext(
        &self,
        req: &Request,
        image: &Tensor,
        embeddings: Option<(&Tensor, &Tensor)>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generated> {
        if self.variant != Variant::DevKontext {
            return Err(Error::InvalidRequest(format!(
                "editing needs a FLUX.1 Kontext model, not {} (pass --variant flux-dev-kontext if it is a Kontext checkpoint under another name)",
                self.variant
            )));
        }
        self.conditioned(
            req,
            embeddings,
            on_event,
            || self.kontext_conditioning(image),
            |txt, vec, (tokens, ids), on_event| {
                let cond = Cond::Tokens(tokens, ids);
                self.denoise_decode(req, txt, vec, Start::Noise, cond, on_event)
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapping_follows_the_reference_table() {
        assert_eq!(conditioning_size(1024, 1024), (1024, 1024));
        assert_eq!(conditioning_size(1920, 1080), (1392, 752));
        assert_eq!(conditioning_size(1080, 1920), (752, 1392));
        assert_eq!(conditioning_size(4000, 100), (1568, 672));
        assert_eq!(conditioning_size(100, 4000), (672, 1568));
        assert_eq!(conditioning_size(640, 480), (1184, 880));
        assert_eq!(conditioning_size(96, 64), (1248, 832));
        // Every entry maps to itself.
        for (w, h) in PREFERRED_RESOLUTIONS {
            assert_eq!(conditioning_size(w, h), (w, h));
        }
    }

    #[test]
    fn aspect_ratios_follow_the_spec_examples() {
        assert_eq!(aspect_ratio_size("16:9").unwrap(), (1360, 768));
        assert_eq!(aspect_ratio_size("4:3").unwrap(), (1168, 880));
        assert_eq!(aspect_ratio_size("3:2").unwrap(), (1248, 832));
        assert_eq!(aspect_ratio_size("21:9").unwrap(), (1552, 656));
        assert_eq!(aspect_ratio_size("1:1").unwrap(), (1024, 1024));
        for bad in ["16x9", "0:1", "a:b", "1:-2", "", "1000:1", "1:400"] {
            assert!(aspect_ratio_size(bad).is_err(), "{bad}");
        }
    }
}
