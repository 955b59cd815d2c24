#!/usr/bin/env python3
"""Golden edge maps for fluxfit's Canny (the FLUX.1-Canny control image, docs/flux.md §2.3).

Run (needs only numpy, Pillow, torch and opencv-python-headless from requirements.txt):
    tools/reference/.venv/bin/python tools/reference/make_canny_golden.py

Writes small synthetic RGB images as tests/fixtures/canny_<name>.png and, for each,
cv2.Canny(img, 50, 200) (apertureSize 3, L1 gradient: the reference's call) as the greyscale
PNG tests/fixtures/golden/canny_<name>.png with values 0 / 255. Deterministic: fixed seeds, PIL
drawing, no threads involved in the results (cv2.Canny's result does not depend on threads).

Images: `shapes` (gradient + filled shapes + thin lines), `stripes` (hard and soft stripes at
eight angles, one per tile, to hit every suppression sector), `noise` (uniform and low-contrast
Gaussian noise beside smooth areas: hysteresis at work), `border` (shapes cut by every side and
corner, lines on the first/last row and column), `ties` (channels whose gradient magnitudes tie
while their directions differ: cv2 keeps the first of the tied channels), `small` (37x23, odd sizes),
`row` (48x1) and `col` (1x40), and `reference`.

`reference` is made the way the reference pipeline makes Canny's input (cli_control.py,
CannyImageEncoder): PIL RGB image -> torch.from_numpy(np.array(img)).float() / 127.5 - 1 ->
clamp(-1, 1) -> ((x + 1.0) * 127.5).numpy().astype(np.uint8) -> cv2.Canny. The fixture PNG holds
the PIL image; the golden is the edge map of the round-tripped uint8 array. The float32 round trip
is NOT the identity: it maps v -> v - 1 for v in 1..63 (63 of 256 values; 0 and 64..255 are
unchanged), because v/127.5 - 1 loses low bits near -1 and astype truncates. The parity test
repeats it in f32. On this image the round trip changes the edge map (the script prints by how
many pixels): e.g. a step 14 -> 64 has |dx| = 4·50 = 200, not above 200, but after the round
trip 13 -> 64 gives 204.
"""

import os

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "tests", "fixtures")
GOLD = os.path.join(FIX, "golden")
LOW, HIGH = 50, 200
W, H = 96, 64


def grid(w=W, h=H):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return yy, xx


def to_u8(a):
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def shapes():
    yy, xx = grid()
    bg = np.stack([40 + 150 * xx / (W - 1), 60 + 120 * yy / (H - 1), 200 - 80 * (xx + yy) / (W + H)], -1)
    im = Image.fromarray(to_u8(bg), "RGB")
    d = ImageDraw.Draw(im)
    d.rectangle([8, 6, 34, 28], fill=(230, 40, 40))
    d.ellipse([44, 10, 80, 40], fill=(30, 200, 90))
    d.polygon([(10, 58), (30, 36), (50, 60)], fill=(20, 20, 160))
    d.line([(56, 50), (92, 44)], fill=(250, 250, 250), width=1)
    d.line([(60, 60), (90, 30)], fill=(0, 0, 0), width=2)
    d.ellipse([70, 46, 84, 60], outline=(255, 220, 0), width=1)
    return np.array(im)


def stripes():
    yy, xx = grid()
    out = np.zeros((H, W, 3))
    tw, th = W // 4, H // 2
    for k, deg in enumerate([0, 22.5, 30, 45, 60, 67.5, 90, 135]):
        t = np.deg2rad(deg)
        sl = (slice((k // 4) * th, (k // 4 + 1) * th), slice((k % 4) * tw, (k % 4 + 1) * tw))
        u = xx[sl] * np.cos(t) + yy[sl] * np.sin(t)
        wave = np.sin(2 * np.pi * u / 7.0)
        hard = np.sign(wave)
        # Hard stripes in red, soft ones in green, a slower soft wave in blue.
        out[sl + (0,)] = 127.5 + 110 * hard
        out[sl + (1,)] = 127.5 + 120 * wave
        out[sl + (2,)] = 127.5 + 100 * np.sin(2 * np.pi * u / 13.0 + 1.0)
    return to_u8(out)


def noise():
    rng = np.random.default_rng(1234)
    yy, xx = grid()
    out = np.stack([80 + 100 * xx / (W - 1)] * 3, -1)
    out[8:40, 8:40] = rng.integers(0, 256, (32, 32, 3))
    out[20:56, 48:88] = 128 + rng.normal(0, 18, (36, 40, 3))
    out[44:60, 10:40] = np.where(rng.random((16, 30, 1)) < 0.3, 230, 60)
    return to_u8(out)


def border():
    im = Image.new("RGB", (W, H), (90, 110, 130))
    d = ImageDraw.Draw(im)
    d.rectangle([-5, -5, 20, 14], fill=(240, 240, 240))       # top-left corner
    d.ellipse([80, 20, 110, 50], fill=(10, 10, 10))           # cut by the right side
    d.polygon([(30, 63), (45, 40), (60, 63)], fill=(250, 30, 30))  # sits on the bottom row
    d.line([(0, 30), (0, 50)], fill=(255, 255, 0))            # on the first column
    d.line([(40, 0), (70, 0)], fill=(0, 255, 255))            # on the first row
    d.line([(95, 0), (95, 12)], fill=(0, 0, 0))               # on the last column
    d.rectangle([88, 56, 95, 63], fill=(0, 200, 0))           # bottom-right corner
    d.point([(0, 63), (50, 20)], fill=(255, 255, 255))        # single pixels
    return np.array(im)


def ties():
    """Three shifted copies of one random 4x4-block pattern of {50, 200}.

    Shifted copies give equal magnitudes (multiples of 150) with different directions at many
    pixels. With seed 1, taking the last tied channel instead of the first would change 112 of
    the 734 edge pixels (checked against a variant of the Rust port).
    """
    rng = np.random.default_rng(1)
    base = np.where(rng.random((H // 4 + 3, W // 4 + 3)) < 0.5, 200, 50).repeat(4, 0).repeat(4, 1)
    chans = []
    for _ in range(3):
        dy, dx = rng.integers(0, 3, 2)
        chans.append(base[dy:dy + H, dx:dx + W])
    return np.stack(chans, -1).astype(np.uint8)


def small():
    rng = np.random.default_rng(37)
    im = Image.new("RGB", (37, 23), (120, 60, 200))
    d = ImageDraw.Draw(im)
    d.ellipse([-6, 3, 15, 30], fill=(250, 240, 10))
    d.rectangle([18, 4, 30, 12], fill=(5, 90, 20))
    a = np.array(im).astype(np.float64)
    a[14:22, 20:36] += rng.normal(0, 40, (8, 16, 3))
    return to_u8(a)


def row():
    x = np.arange(48, dtype=np.float64)
    v = np.stack([np.where(x % 12 < 6, 220, 30), 128 + 100 * np.sin(x / 3), (x * 37) % 256], -1)
    # From x = 28 on: grey 100, then 150 from x = 38. That lone step has |dx| = 4·50 = 200 at
    # x = 37 and 38, exactly the high threshold: not above it, so no edge (`m > high`).
    v[28:] = np.where(x[28:, None] < 38, 100.0, 150.0)
    return to_u8(v[None])


def col():
    y = np.arange(40, dtype=np.float64)
    v = np.stack([np.where(y % 10 < 3, 255, 0), 128 + 120 * np.cos(y / 2.5), 255 - 6 * y], -1)
    return to_u8(v[:, None])


def reference_source():
    """A scene with dark areas, where the float round trip changes values."""
    yy, xx = grid()
    bg = np.stack([10 + 80 * xx / (W - 1), 30 + 60 * yy / (H - 1), 5 + 70 * (xx + yy) / (W + H)], -1)
    im = Image.fromarray(to_u8(bg), "RGB")
    d = ImageDraw.Draw(im)
    d.rectangle([6, 6, 40, 30], fill=(64, 70, 60))
    d.rectangle([14, 12, 32, 24], fill=(14, 20, 10))         # step of 50 that turns into 51
    d.ellipse([50, 8, 88, 40], fill=(63, 1, 40))
    d.polygon([(48, 60), (70, 42), (92, 62)], fill=(200, 150, 64))
    d.line([(4, 58), (40, 36)], fill=(120, 64, 30), width=2)
    a = np.array(im).astype(np.float64)
    rng = np.random.default_rng(7)
    a[40:60, 4:44] = np.clip(a[40:60, 4:44] + rng.normal(0, 12, (20, 40, 3)), 0, 255)
    return Image.fromarray(to_u8(a), "RGB")


def round_trip(img):
    """The reference's [-1, 1] tensor and back (cli_control.py + CannyImageEncoder), float32."""
    x = torch.from_numpy(np.array(img)).float() / 127.5 - 1.0
    x = torch.clamp(x, -1.0, 1.0)
    return ((x + 1.0) * 127.5).numpy().astype(np.uint8)


def save(name, rgb, edges):
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert edges.shape == rgb.shape[:2] and set(np.unique(edges)) <= {0, 255}
    Image.fromarray(rgb, "RGB").save(os.path.join(FIX, f"canny_{name}.png"), optimize=True)
    Image.fromarray(edges, "L").save(os.path.join(GOLD, f"canny_{name}.png"), optimize=True)
    print(f"canny_{name}: {rgb.shape[1]}x{rgb.shape[0]}, {int((edges == 255).sum())} edge pixels")


def main():
    print("opencv", cv2.__version__)
    inputs = {}
    for name, make in [("shapes", shapes), ("stripes", stripes), ("noise", noise), ("border", border),
                       ("ties", ties), ("small", small), ("row", row), ("col", col)]:
        rgb = np.ascontiguousarray(make())
        save(name, rgb, cv2.Canny(rgb, LOW, HIGH))
        inputs[name] = rgb

    img = reference_source()
    src = np.array(img)
    rt = round_trip(img)
    changed = rt != src
    assert np.array_equal(src[changed].astype(int) - 1, rt[changed].astype(int))
    assert set(np.unique(src[changed])) <= set(range(1, 64))
    edges = cv2.Canny(rt, LOW, HIGH)
    direct = cv2.Canny(src, LOW, HIGH)
    print(f"reference: round trip changed {int(changed.sum())} channel values (all v -> v-1, v in 1..63); "
          f"edge map differs from Canny of the PIL image in {int((edges != direct).sum())} pixels")
    save("reference", src, edges)
    inputs["reference"] = src

    # The PNGs read back to exactly the arrays the goldens were computed from.
    for name, rgb in inputs.items():
        back = np.array(Image.open(os.path.join(FIX, f"canny_{name}.png")).convert("RGB"))
        assert np.array_equal(back, rgb), name
    total = sum(os.path.getsize(os.path.join(d, f)) for d in (FIX, GOLD)
                for f in os.listdir(d) if f.startswith("canny_"))
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
