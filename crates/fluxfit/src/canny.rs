//! Canny edge detection, bit-identical to OpenCV's `cv2.Canny(img, low, high)` with the default
//! 3×3 Sobel aperture and the L1 gradient (`L2gradient=False`).
//!
//! FLUX.1-Canny's control image is `cv2.Canny(uint8 HWC RGB, 50, 200)` (docs/flux.md §2.3). Edges are a
//! hard {0, 255} map, so "close" is not good enough: a one-pixel shift changes the conditioning.
//! The rules below were read from OpenCV's `imgproc/src/canny.cpp` and checked pixel for pixel
//! against opencv-python-headless 4.13.0.92 and 5.0.0.93 on the goldens of
//! `tools/reference/make_canny_golden.py` and on thousands of random images:
//!
//! * Sobel dx, dy per channel in integers (|d| ≤ 1020, so OpenCV's int16 never saturates), with
//!   replicated borders.
//! * Magnitude |dx| + |dy|. With several channels each pixel takes the channel of largest
//!   magnitude, the first one on a tie, together with *that* channel's dx and dy.
//! * Thresholds are floored to integers and compared strictly: `m > low`, `m > high`.
//! * Non-maximum suppression in four sectors split by the integer tan 22.5° test; the
//!   neighbour before the pixel (left or above) must be strictly smaller and the one after
//!   smaller or equal, except on diagonals, where both must be strictly smaller. Which diagonal
//!   follows from the sign of dx·dy.
//! * Magnitudes outside the image count as 0, so pixels on the border can be edges.
//! * Hysteresis: 8-connected growth from the pixels above `high` through the pixels above `low`
//!   that survived suppression.

/// tan(22.5°) in Q15, as OpenCV rounds it: the sector tests stay in exact integer arithmetic.
const TG22: i32 = 13573;
const SHIFT: u32 = 15;

/// Edge map (0 or 255 per pixel, row-major) of an RGB8 image, as cv2.Canny(img, low, high)
pub fn canny_rgb(rgb: &[u8], width: usize, height: usize, low: f64, high: f64) -> Vec<u8> {
    canny(rgb, width, height, 3, low, high)
}

/// Edge map (0 or 255 per pixel, row-major) of an 8-bit greyscale image, as
/// cv2.Canny(img, low, high).
pub fn canny_gray(gray: &[u8], width: usize, height: usize, low: f64, high: f64) -> Vec<u8> {
    canny(gray, width, height, 1, low, high)
}

/// Per-pixel state during hysteresis, as in OpenCV's map.
const MAYBE: u8 = 0;
const NEVER: u8 = 1;
const EDGE: u8 = 2;

fn canny(src: &[u8], width: usize, height: usize, cn: usize, low: f64, high: f64) -> Vec<u8> {
    assert_eq!(
        src.len(),
        width * height * cn,
        "canny: {width}x{height}x{cn} image needs {} bytes, got {}",
        width * height * cn,
        src.len()
    );
    if width == 0 || height == 0 {
        return Vec::new();
    }
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    // cvFloor; `as` saturates, which is what a threshold outside i32 means anyway.
    let (low, high) = (low.floor() as i64, high.floor() as i64);

    let (dx, dy, mag) = gradient(src, width, height, cn);

    // Magnitudes and the map carry a one-pixel frame: magnitude 0 and "never an edge", so the
    // neighbour reads below need no bounds checks and nothing grows out of the image.
    let stride = width + 2;
    let mut map = vec![NEVER; stride * (height + 2)];
    let mut stack = Vec::new();
    for y in 0..height {
        for x in 0..width {
            let p = (y + 1) * stride + x + 1;
            let m = mag[p];
            if i64::from(m) <= low
                || !is_local_max(&mag, p, stride, dx[y * width + x], dy[y * width + x])
            {
                continue;
            }
            if i64::from(m) > high {
                map[p] = EDGE;
                stack.push(p);
            } else {
                map[p] = MAYBE;
            }
        }
    }

    while let Some(p) = stack.pop() {
        for q in [
            p - 1,
            p + 1,
            p - stride - 1,
            p - stride,
            p - stride + 1,
            p + stride - 1,
            p + stride,
            p + stride + 1,
        ] {
            if map[q] == MAYBE {
                map[q] = EDGE;
                stack.push(q);
            }
        }
    }

    let mut out = Vec::with_capacity(width * height);
    for y in 0..height {
        let row = &map[(y + 1) * stride + 1..(y + 1) * stride + 1 + width];
        out.extend(row.iter().map(|&s| if s == EDGE { 255 } else { 0 }));
    }
    out
}

/// Sobel dx, dy (row-major, one value per pixel) and the L1 magnitude (on the zero-framed
/// `(width+2)×(height+2)` grid) of the channel with the largest magnitude, first channel on ties.
fn gradient(src: &[u8], width: usize, height: usize, cn: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let stride = width + 2;
    let mut dx = vec![0i32; width * height];
    let mut dy = vec![0i32; width * height];
    let mut mag = vec![0i32; stride * (height + 2)];
    let px = |y: usize, x: usize, c: usize| i32::from(src[(y * width + x) * cn + c]);
    for y in 0..height {
        let (ya, yb) = (y.saturating_sub(1), (y + 1).min(height - 1));
        for x in 0..width {
            let (xa, xb) = (x.saturating_sub(1), (x + 1).min(width - 1));
            let (mut best, mut bx, mut by) = (-1, 0, 0);
            for c in 0..cn {
                let gx = (px(ya, xb, c) - px(ya, xa, c))
                    + 2 * (px(y, xb, c) - px(y, xa, c))
                    + (px(yb, xb, c) - px(yb, xa, c));
                let gy = (px(yb, xa, c) - px(ya, xa, c))
                    + 2 * (px(yb, x, c) - px(ya, x, c))
                    + (px(yb, xb, c) - px(ya, xb, c));
                let m = gx.abs() + gy.abs();
                if m > best {
                    (best, bx, by) = (m, gx, gy);
                }
            }
            dx[y * width + x] = bx;
            dy[y * width + x] = by;
            mag[(y + 1) * stride + x + 1] = best;
        }
    }
    (dx, dy, mag)
}

/// OpenCV's non-maximum suppression at framed index `p`: the gradient direction picks the two
/// neighbours to compare against. The asymmetric `>` / `>=` keeps exactly one pixel of a
/// plateau two pixels wide; diagonals use `>` on both sides.
fn is_local_max(mag: &[i32], p: usize, stride: usize, gx: i32, gy: i32) -> bool {
    let m = mag[p];
    let ax = gx.abs();
    let ay = gy.abs() << SHIFT;
    let tg22x = ax * TG22;
    if ay < tg22x {
        // Mostly horizontal gradient: compare left and right.
        return m > mag[p - 1] && m >= mag[p + 1];
    }
    let tg67x = tg22x + (ax << (SHIFT + 1));
    if ay > tg67x {
        // Mostly vertical: compare above and below.
        return m > mag[p - stride] && m >= mag[p + stride];
    }
    // Diagonal: same signs (y down) point along ↘, so compare up-left and down-right; opposite
    // signs compare up-right and down-left.
    if (gx ^ gy) < 0 {
        m > mag[p - stride + 1] && m > mag[p + stride - 1]
    } else {
        m > mag[p - stride - 1] && m > mag[p + stride + 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rgb_from_gray(g: &[u8]) -> Vec<u8> {
        g.iter().flat_map(|&v| [v, v, v]).collect()
    }

    #[test]
    fn flat_image_has_no_edges() {
        let img = vec![128u8; 16 * 12 * 3];
        assert!(canny_rgb(&img, 16, 12, 50.0, 200.0).iter().all(|&v| v == 0));
    }

    #[test]
    fn vertical_step_gives_a_one_pixel_line() {
        // Columns 0..8 black, 8..16 white: Sobel peaks on columns 7 and 8 equally (a plateau
        // two wide); `m > left && m >= right` keeps only the left one, column 7.
        let (w, h) = (16, 10);
        let g: Vec<u8> = (0..w * h)
            .map(|i| if i % w < 8 { 0 } else { 255 })
            .collect();
        let e = canny_rgb(&rgb_from_gray(&g), w, h, 50.0, 200.0);
        for y in 0..h {
            for x in 0..w {
                assert_eq!(e[y * w + x], if x == 7 { 255 } else { 0 }, "({x}, {y})");
            }
        }
    }

    #[test]
    fn horizontal_step_gives_a_one_pixel_line() {
        let (w, h) = (9, 12);
        let g: Vec<u8> = (0..w * h)
            .map(|i| if i / w < 6 { 200 } else { 10 })
            .collect();
        let e = canny_gray(&g, w, h, 50.0, 200.0);
        for y in 0..h {
            for x in 0..w {
                assert_eq!(e[y * w + x], if y == 5 { 255 } else { 0 }, "({x}, {y})");
            }
        }
    }

    #[test]
    fn weak_edges_survive_only_when_connected() {
        // A step of 30 gives |dx| = 120 (weak: between 50 and 200); alone it vanishes.
        let (w, h) = (12, 8);
        let g: Vec<u8> = (0..w * h)
            .map(|i| if i % w < 6 { 100 } else { 130 })
            .collect();
        assert!(canny_gray(&g, w, h, 50.0, 200.0).iter().all(|&v| v == 0));
        // Joined to a strong step in the lower rows, its upper part (rows 0..3) is kept too.
        let g: Vec<u8> = (0..w * h)
            .map(|i| match (i % w < 6, i / w < 4) {
                (true, _) => 100,
                (false, true) => 130,
                (false, false) => 250,
            })
            .collect();
        let e = canny_gray(&g, w, h, 50.0, 200.0);
        assert!((0..3).all(|y| e[y * w + 5] == 255), "{e:?}");
        assert!((5..h).all(|y| e[y * w + 5] == 255), "{e:?}");
    }

    #[test]
    fn the_strongest_channel_wins() {
        // Red has a weak vertical step, blue a strong one: the blue edge is found.
        let (w, h) = (10, 6);
        let mut img = vec![0u8; w * h * 3];
        for i in 0..w * h {
            let right = i % w >= 5;
            img[i * 3] = if right { 30 } else { 0 };
            img[i * 3 + 2] = if right { 255 } else { 0 };
        }
        let e = canny_rgb(&img, w, h, 50.0, 200.0);
        assert!((0..h).all(|y| e[y * w + 4] == 255));
        assert_eq!(e.iter().filter(|&&v| v == 255).count(), h);
    }

    #[test]
    fn thresholds_are_floored_swapped_and_strict() {
        // |dx| = 4·50 = 200 exactly: not above a high threshold of 200 (or 200.9).
        let (w, h) = (8, 4);
        let g: Vec<u8> = (0..w * h).map(|i| if i % w < 4 { 0 } else { 50 }).collect();
        assert!(canny_gray(&g, w, h, 50.0, 200.9).iter().all(|&v| v == 0));
        assert!(canny_gray(&g, w, h, 200.9, 50.0).iter().all(|&v| v == 0));
        assert!(canny_gray(&g, w, h, 50.0, 199.9).contains(&255));
    }

    #[test]
    fn degenerate_sizes_do_not_panic() {
        assert!(canny_rgb(&[], 0, 0, 50.0, 200.0).is_empty());
        assert!(canny_rgb(&[], 0, 5, 50.0, 200.0).is_empty());
        assert_eq!(canny_rgb(&[255, 0, 7], 1, 1, 50.0, 200.0), vec![0]);
        // A 1×5 row 0,255,0,255,0: the replicated border makes dx = ±4·255 only at the two ends
        // (inside, x−1 and x+1 are equal), and border pixels can be edges; cv2 agrees.
        let row = rgb_from_gray(&[0, 255, 0, 255, 0]);
        assert_eq!(canny_rgb(&row, 5, 1, 50.0, 200.0), vec![255, 0, 0, 0, 255]);
        assert_eq!(canny_rgb(&row, 1, 5, 50.0, 200.0), vec![255, 0, 0, 0, 255]);
        assert_eq!(canny_gray(&[9; 4], 2, 2, 50.0, 200.0), vec![0; 4]);
    }

    #[test]
    #[should_panic(expected = "needs 12 bytes")]
    fn wrong_buffer_length_panics() {
        canny_rgb(&[0; 11], 2, 2, 50.0, 200.0);
    }
}
