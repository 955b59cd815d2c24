//! Pillow's LANCZOS and BICUBIC resizes, byte for byte, for 8-bit RGB and 8-bit L images.
//!
//! The FLUX.1 reference resizes its conditioning images (Kontext, control, Fill) with PIL's
//! `Image.resize((w, h), Image.LANCZOS)`, and Redux's SigLIP processor resizes with BICUBIC. Other Lanczos implementations differ from it by a
//! level here and there, and a level is enough to change a generated image, so this follows
//! Pillow's `libImaging/Resample.c` (checked against Pillow 13.0.0 by
//! `tests/resample_parity.rs`):
//!
//! * Separable, two passes through an 8-bit intermediate (clipped like the output). A pass
//!   whose side keeps its size is skipped; with both kept the input is copied. The order is
//!   horizontal then vertical, except (Pillow ≥ 13, python-pillow/Pillow#9549) when the height
//!   shrinks by more than twice as many pixels as the width does: `out_h < h` and
//!   `h − out_h > 2·(w − out_w)`, vertical first. The order changes the result, not just speed.
//! * Per output pixel, the filter is centred at `(i + 0.5)·scale` with `scale = in/out`. When
//!   downscaling, the kernel is stretched by `scale` (support `3·scale` for Lanczos, `2·scale`
//!   for bicubic); when upscaling it is the plain kernel (Lanczos a = 3; bicubic a = −0.5). Taps run over source pixels `[⌊c − s + ½⌋, ⌊c + s + ½⌋)`, clamped
//!   to the image, and the weights are divided by their sum, all in f64 (`sin` from the
//!   platform libm, as Pillow's C calls it).
//! * Weights become fixed point with 22 fractional bits (`PRECISION_BITS = 32 − 8 − 2`),
//!   rounded half away from zero; sums are i32 started at ½ (`1 << 21`) and the result is
//!   `sum >> 22` clamped to 0..=255.

use std::f64::consts::PI;

/// Fractional bits of the fixed-point weights (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Resizes a row-major RGB8 image (`w·h·3` bytes) to `out_w × out_h` exactly as Pillow's
/// `Image.resize((out_w, out_h), Image.LANCZOS)` does. An empty target gives an empty image
/// (Pillow refuses one); an empty source with a non-empty target panics.
pub fn lanczos_rgb8(data: &[u8], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    resize::<3>(Filter::Lanczos, data, w, h, out_w, out_h)
}

/// Resizes a row-major RGB8 image to `out_w × out_h` exactly as Pillow's
/// `Image.resize((out_w, out_h), Image.BICUBIC)` does (the SigLIP processor's resize).
pub fn bicubic_rgb8(data: &[u8], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    resize::<3>(Filter::Bicubic, data, w, h, out_w, out_h)
}

/// Resizes a row-major one-channel image (`w·h` bytes, Pillow mode "L", e.g. a mask) to
/// `out_w × out_h` exactly as Pillow's `Image.resize((out_w, out_h), Image.LANCZOS)` does.
pub fn lanczos_l8(data: &[u8], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    resize::<1>(Filter::Lanczos, data, w, h, out_w, out_h)
}

/// Pillow's resampling filters that fluxfit needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Filter {
    Lanczos,
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Self::Lanczos => 3.0,
            Self::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Self::Lanczos => lanczos(x),
            Self::Bicubic => bicubic(x),
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * PI;
    x.sin() / x
}

/// Lanczos with a = 3, written as Pillow does (the half-open window and `x / 3` matter for the
/// last bit of the weights).
fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Keys' cubic convolution with a = −0.5, written as Pillow's `bicubic_filter`.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The taps of one axis: output pixel `i` reads `len[i]` source pixels from `start[i]` with
/// weights `weights[i·stride ..]`.
struct Taps {
    start: Vec<usize>,
    len: Vec<usize>,
    stride: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the whole axis
/// (`box` = `(0, in_size)`).
fn taps(filter: Filter, in_size: usize, out_size: usize) -> Taps {
    // Pillow takes the box as f32 and subtracts in f32; exact for any real image side.
    let scale = (in_size as f32) as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let stride = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;
    let one = (1i64 << PRECISION_BITS) as f64;

    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * stride];
    let mut k = vec![0f64; stride];
    for i in 0..out_size {
        let center = (i as f64 + 0.5) * scale;
        // C's `(int)` truncates toward zero; negative values are clamped to 0 anyway.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = hi - lo;
        let mut sum = 0.0;
        for (x, kx) in k[..n].iter_mut().enumerate() {
            let w = filter.weight((((x + lo) as f64) - center + 0.5) * inv_filterscale);
            *kx = w;
            sum += w;
        }
        if sum != 0.0 {
            for kx in &mut k[..n] {
                *kx /= sum;
            }
        }
        for (dst, &kx) in weights[i * stride..][..n].iter_mut().zip(&k[..n]) {
            // Round half away from zero, then C's truncating conversion.
            *dst = if kx < 0.0 {
                (-0.5 + kx * one) as i32
            } else {
                (0.5 + kx * one) as i32
            };
        }
        start.push(lo);
        len.push(n);
    }
    Taps {
        start,
        len,
        stride,
        weights,
    }
}

/// Pillow's `clip8`: drop the fraction (arithmetic shift, so it floors) and clamp.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The rounding offset every sum starts from.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

fn resize<const C: usize>(
    f: Filter,
    data: &[u8],
    w: usize,
    h: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    assert_eq!(data.len(), w * h * C, "the image holds {w}×{h}×{C} bytes");
    if out_w == 0 || out_h == 0 {
        return Vec::new();
    }
    assert!(
        w > 0 && h > 0,
        "cannot resize an empty image to {out_w}×{out_h}"
    );
    match (out_w != w, out_h != h) {
        (false, false) => data.to_vec(),
        (true, false) => horizontal::<C>(f, data, w, 0..h, out_w),
        (false, true) => vertical::<C>(data, w, 0, &taps(f, h, out_h)),
        (true, true) if vertical_first(w, h, out_w, out_h) => {
            let tmp = vertical::<C>(data, w, 0, &taps(f, h, out_h));
            horizontal::<C>(f, &tmp, w, 0..out_h, out_w)
        }
        (true, true) => {
            // Only the source rows the vertical pass will read go through the first pass.
            let t = taps(f, h, out_h);
            let (first, last) = (t.start[0], t.start[out_h - 1] + t.len[out_h - 1]);
            let tmp = horizontal::<C>(f, data, w, first..last, out_w);
            vertical::<C>(&tmp, out_w, first, &t)
        }
    }
}

/// Pillow 13's pass order: vertical first when the height loses more than twice as many
/// pixels as the width (a wider image gaining pixels counts as losing a negative number).
fn vertical_first(w: usize, h: usize, out_w: usize, out_h: usize) -> bool {
    out_h < h && (h - out_h) as i64 > 2 * (w as i64 - out_w as i64)
}

fn horizontal<const C: usize>(
    f: Filter,
    data: &[u8],
    w: usize,
    rows: std::ops::Range<usize>,
    out_w: usize,
) -> Vec<u8> {
    let t = taps(f, w, out_w);
    let mut out = vec![0u8; rows.len() * out_w * C];
    for (line_out, y) in out.chunks_exact_mut(out_w * C).zip(rows) {
        let line = &data[y * w * C..][..w * C];
        for (i, px) in line_out.chunks_exact_mut(C).enumerate() {
            let k = &t.weights[i * t.stride..][..t.len[i]];
            let src = &line[t.start[i] * C..][..k.len() * C];
            let mut acc = [HALF; C];
            for (&kx, p) in k.iter().zip(src.chunks_exact(C)) {
                for c in 0..C {
                    acc[c] += p[c] as i32 * kx;
                }
            }
            for c in 0..C {
                px[c] = clip8(acc[c]);
            }
        }
    }
    out
}

/// The vertical pass over `src`, which holds rows `rows_from..` of a `w`-pixel-wide image.
/// Integer sums do not depend on the order, so a whole row is accumulated per tap.
fn vertical<const C: usize>(src: &[u8], w: usize, rows_from: usize, t: &Taps) -> Vec<u8> {
    let row = w * C;
    let mut out = vec![0u8; t.start.len() * row];
    let mut acc = vec![0i32; row];
    for (i, line_out) in out.chunks_exact_mut(row).enumerate() {
        acc.fill(HALF);
        let k = &t.weights[i * t.stride..][..t.len[i]];
        for (j, &ky) in k.iter().enumerate() {
            let line = &src[(t.start[i] + j - rows_from) * row..][..row];
            for (a, &p) in acc.iter_mut().zip(line) {
                *a += p as i32 * ky;
            }
        }
        for (o, &a) in line_out.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 37 % 251) as u8).collect()
    }

    #[test]
    fn the_same_size_returns_the_input() {
        let rgb = pattern(7 * 5 * 3);
        assert_eq!(lanczos_rgb8(&rgb, 7, 5, 7, 5), rgb);
        let l = pattern(7 * 5);
        assert_eq!(lanczos_l8(&l, 7, 5, 7, 5), l);
    }

    #[test]
    fn one_pixel_to_one_pixel_and_back() {
        assert_eq!(lanczos_rgb8(&[10, 200, 33], 1, 1, 1, 1), [10, 200, 33]);
        // A single pixel spreads unchanged: its only weight is normalised to 1.
        assert_eq!(lanczos_l8(&[77], 1, 1, 3, 2), [77; 6]);
        assert_eq!(lanczos_rgb8(&[1, 2, 3], 1, 1, 2, 1), [1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn constant_images_stay_constant() {
        for &v in &[0u8, 1, 128, 254, 255] {
            for &(w, h, ow, oh) in &[
                (37, 23, 100, 62),
                (37, 23, 12, 7),
                (37, 23, 1, 1),
                (5, 9, 9, 2),
                (1, 1, 4, 4),
            ] {
                let l = lanczos_l8(&vec![v; w * h], w, h, ow, oh);
                assert!(l.iter().all(|&x| x == v), "L {v} {w}x{h} -> {ow}x{oh}");
                let rgb = lanczos_rgb8(&vec![v; w * h * 3], w, h, ow, oh);
                assert!(rgb.iter().all(|&x| x == v), "RGB {v} {w}x{h} -> {ow}x{oh}");
            }
        }
    }

    #[test]
    fn an_empty_target_is_an_empty_image() {
        assert!(lanczos_rgb8(&pattern(12), 2, 2, 0, 5).is_empty());
        assert!(lanczos_l8(&[], 0, 0, 3, 0).is_empty());
    }

    #[test]
    fn rgb_channels_are_resized_independently() {
        let (w, h, ow, oh) = (9, 6, 5, 13);
        let rgb = pattern(w * h * 3);
        let out = lanczos_rgb8(&rgb, w, h, ow, oh);
        for c in 0..3 {
            let plane: Vec<u8> = rgb.iter().skip(c).step_by(3).copied().collect();
            let want = lanczos_l8(&plane, w, h, ow, oh);
            let got: Vec<u8> = out.iter().skip(c).step_by(3).copied().collect();
            assert_eq!(got, want, "channel {c}");
        }
    }

    #[test]
    fn fixed_point_weights_follow_pillow() {
        // Upscaling 2x: the a = 3 kernel, 6 taps inside the image, summing to about 2²².
        let t = taps(Filter::Lanczos, 8, 16);
        assert_eq!(t.stride, 7);
        let k = &t.weights[8 * t.stride..][..t.len[8]];
        assert_eq!((t.start[8], k.len()), (1, 6));
        let sum: i32 = k.iter().sum();
        assert!((sum - (1 << 22)).abs() <= 3, "{sum}");
        // Downscaling 3x stretches the support to 9: ⌈9⌉·2 + 1 slots.
        assert_eq!(taps(Filter::Lanczos, 30, 10).stride, 19);
    }
}
