//! Canny parity: `fluxfit::canny::canny_rgb` against `cv2.Canny(img, 50, 200)` (opencv-python-
//! headless 4.13.0.92) on every `tests/fixtures/canny_*.png`, pixel for pixel. The goldens come
//! from tools/reference/make_canny_golden.py.

use std::path::Path;

use fluxfit::canny::canny_rgb;
use fluxfit::image::read_rgb8;

/// The reference makes Canny's input from a [−1, 1] float32 tensor (`b/127.5 − 1`, then
/// `((x + 1)·127.5)` truncated to uint8); the `reference` fixture's golden was made that way.
fn reference_round_trip(b: u8) -> u8 {
    let x = b as f32 / 127.5 - 1.0;
    ((x + 1.0) * 127.5) as u8
}

/// A golden edge map: an 8-bit greyscale PNG, read without any conversion.
fn golden_edges(path: &Path) -> (usize, usize, Vec<u8>) {
    let img = ::image::ImageReader::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .decode()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match img {
        ::image::DynamicImage::ImageLuma8(g) => {
            (g.width() as usize, g.height() as usize, g.into_raw())
        }
        other => panic!(
            "{}: not an 8-bit L PNG: {:?}",
            path.display(),
            other.color()
        ),
    }
}

#[test]
fn canny_matches_cv2_on_every_golden() {
    let fix = crate::common::fixtures();
    let mut names: Vec<String> = std::fs::read_dir(&fix)
        .expect("fixtures dir")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let stem = name.strip_prefix("canny_")?.strip_suffix(".png")?;
            Some(stem.to_string())
        })
        .collect();
    names.sort();
    assert!(
        names.len() >= 9,
        "expected the canny fixtures, found {names:?}"
    );
    assert!(names.iter().any(|n| n == "reference"));

    for name in &names {
        let img = read_rgb8(&fix.join(format!("canny_{name}.png"))).expect("fixture");
        let (w, h, want) = golden_edges(&fix.join(format!("golden/canny_{name}.png")));
        assert_eq!((img.width, img.height), (w, h), "{name}: sizes differ");
        let data: Vec<u8> = if name == "reference" {
            img.data.iter().map(|&b| reference_round_trip(b)).collect()
        } else {
            img.data
        };
        let got = canny_rgb(&data, w, h, 50.0, 200.0);
        let edges = want.iter().filter(|&&v| v == 255).count();
        println!("canny_{name}: {w}x{h}, {edges} edge pixels");
        let differ: Vec<(usize, usize)> = (0..w * h)
            .filter(|&i| got[i] != want[i])
            .map(|i| (i % w, i / w))
            .collect();
        assert!(
            differ.is_empty(),
            "canny_{name}: {} of {} pixels differ from cv2 (first (x, y): {:?})",
            differ.len(),
            w * h,
            &differ[..differ.len().min(10)]
        );
    }
}

#[test]
fn reference_round_trip_lowers_1_to_63_by_one() {
    // What make_canny_golden.py found for torch's float32 round trip; the golden relies on it.
    for v in 0..=255u8 {
        let want = if (1..=63).contains(&v) { v - 1 } else { v };
        assert_eq!(reference_round_trip(v), want, "{v}");
    }
}
