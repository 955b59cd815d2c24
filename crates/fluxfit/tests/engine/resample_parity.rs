//! `fluxfit::resample` against Pillow's `Image.resize((w, h), Image.LANCZOS)` (and `BICUBIC`,
//! which Redux's SigLIP processor uses), byte for byte.
//! Goldens: tests/fixtures/resample, written by tools/reference/make_resample_golden.py
//! (Pillow 13.0.0), which lists the same cases.

use fluxfit::image::{read_mask, read_rgb8};
use fluxfit::resample::{bicubic_rgb8, lanczos_l8, lanczos_rgb8};

/// Targets for the two 37×23 sources (identity, ×2.7 up, ÷3.1 and ÷7.4 down, non-integer
/// ratios, mixed up/down, both pass orders, one pass only, 1-pixel sides).
const BIG: &[(usize, usize)] = &[
    (37, 23),
    (100, 62),
    (12, 7),
    (5, 3),
    (29, 17),
    (53, 29),
    (20, 50),
    (80, 11),
    (33, 7),
    (35, 18),
    (34, 18),
    (41, 23),
    (37, 31),
    (64, 48),
    (1, 1),
    (37, 1),
    (1, 23),
];

const CASES: &[(&str, &[(usize, usize)])] = &[
    ("rgb", BIG),
    ("l", BIG),
    // 96×64 → 720×1456 over 8 and over 16.
    ("rgb_small", &[(90, 182), (45, 91)]),
    ("l_col", &[(4, 20), (1, 3), (3, 1), (1, 1)]),
    ("rgb_row", &[(25, 2), (4, 1), (1, 1)]),
];

/// Width, height and bytes (3 per pixel for `rgb*`, 1 for `l*`, which are greyscale PNGs:
/// `read_mask`'s L conversion of a grey pixel is the identity, (65536·v + 2¹⁵) >> 16 = v).
fn load(name: &str) -> (usize, usize, Vec<u8>) {
    let path = crate::common::fixtures()
        .join("resample")
        .join(format!("{name}.png"));
    if name.starts_with("rgb") {
        let img = read_rgb8(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        (img.width, img.height, img.data)
    } else {
        read_mask(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
    }
}

/// BICUBIC cases (up, down, both pass orders, one pass, to 1×1, to SigLIP-like squares).
const BICUBIC: &[(&str, &[(usize, usize)])] = &[
    (
        "rgb",
        &[
            (100, 62),
            (12, 7),
            (56, 56),
            (33, 7),
            (20, 50),
            (41, 23),
            (1, 1),
        ],
    ),
    ("rgb_small", &[(56, 56)]),
];

#[test]
fn bicubic_matches_pillow_byte_for_byte() {
    for &(source, sizes) in BICUBIC {
        let (w, h, src) = load(source);
        for &(ow, oh) in sizes {
            let (_, _, want) = load(&format!("{source}-{ow}x{oh}-bicubic"));
            let got = bicubic_rgb8(&src, w, h, ow, oh);
            let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(
                bad, 0,
                "{source} → {ow}x{oh} bicubic: {bad} bytes differ from Pillow"
            );
        }
    }
}

#[test]
fn lanczos_matches_pillow_byte_for_byte() {
    let mut failures = Vec::new();
    let mut n = 0;
    for &(source, sizes) in CASES {
        let (w, h, src) = load(source);
        for &(ow, oh) in sizes {
            let (gw, gh, want) = load(&format!("{source}-{ow}x{oh}"));
            assert_eq!(
                (gw, gh),
                (ow, oh),
                "{source}-{ow}x{oh}.png has the wrong size"
            );
            let got = if source.starts_with("rgb") {
                lanczos_rgb8(&src, w, h, ow, oh)
            } else {
                lanczos_l8(&src, w, h, ow, oh)
            };
            let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            let worst = got
                .iter()
                .zip(&want)
                .map(|(&a, &b)| a.abs_diff(b))
                .max()
                .unwrap_or(0);
            println!(
                "{source} {w}x{h} -> {ow}x{oh}: {differ} of {} bytes differ (max {worst})",
                want.len()
            );
            if got != want {
                failures.push(format!("{source} -> {ow}x{oh}"));
            }
            n += 1;
        }
    }
    assert_eq!(n, 43, "every golden case ran");
    assert!(
        failures.is_empty(),
        "not byte-identical to Pillow: {failures:?}"
    );
}

/// The image.rs wrappers the pipelines call go through the same resampler.
#[test]
fn image_wrappers_use_the_pillow_resampler() {
    let (w, h, data) = load("rgb");
    let img = fluxfit::image::Rgb8 {
        width: w,
        height: h,
        data,
    };
    let (_, _, want) = load("rgb-53x29");
    let out = fluxfit::image::resize_lanczos(&img, 53, 29);
    assert_eq!((out.width, out.height), (53, 29));
    assert!(out.data == want, "resize_lanczos differs from Pillow");

    let (w, h, mask) = load("l");
    let (_, _, want) = load("l-20x50");
    assert!(
        fluxfit::image::resize_mask_lanczos(&mask, (w, h), (20, 50)) == want,
        "resize_mask_lanczos differs from Pillow"
    );
}
