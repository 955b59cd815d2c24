#!/usr/bin/env python3
"""Goldens for fluxfit's Pillow-exact LANCZOS and BICUBIC resampler (crates/fluxfit/src/resample.rs).

Run (needs only numpy and Pillow from the venv; about a second):
    tools/reference/.venv/bin/python tools/reference/make_resample_golden.py

The FLUX.1 reference resizes its conditioning images with PIL's
`Image.resize((w, h), Image.LANCZOS)` (default box, reducing_gap=None). This writes small
synthetic sources and Pillow's results for a set of target sizes, all as PNGs under
tests/fixtures/resample/:

    <source>.png         the sources: rgb (37x23 RGB), l (37x23 L), rgb_small (12x8 RGB, the
                         96x64 image shrunk 8x), l_col (1x9 L) and rgb_row (11x1 RGB); gradients,
                         0/255 steps (so Lanczos ringing is clipped) and seeded noise
    <source>-<W>x<H>.png Image.open(<source>.png).resize((W, H), Image.LANCZOS)
    <source>-<W>x<H>-bicubic.png   the same with Image.BICUBIC (a few cases)

The cases cover upscaling (x2.7), downscaling (/3.1, /7.4, to 1x1), mixed up/down, non-integer
ratios, one side unchanged (Pillow skips that pass), 1-pixel sides and sources, the identity,
the 96x64 -> 720x1456 aspect change scaled down 8x (12x8 -> 90x182), and both pass orders.
Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first when h - H > 2 * (w - W)
for a w x h source resized to W x H with H < h (before 13 it was always horizontal first, and
the 8-bit intermediate makes the order visible); the script checks every case that resizes both
sides against that rule by composing two one-pass resizes. Generated with
Pillow 13.0.0 (x86-64 wheel); the script warns when another version runs it. Deterministic:
numpy's PCG64 with a fixed seed and PNG writes without timestamps.
"""

import os

import numpy as np
import PIL
from PIL import Image

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "resample")
PILLOW = "13.0.0"

# (source, target sizes (W, H)); crates/fluxfit/tests/resample_parity.rs lists the same cases.
BIG = [
    (37, 23),  # identity
    (100, 62),  # up x2.7
    (12, 7),  # down /3.1
    (5, 3),  # down /7.4
    (29, 17),  # slight non-integer down
    (53, 29),  # non-integer up
    (20, 50),  # x down, y up
    (80, 11),  # x up, y down: vertical pass first (Pillow >= 13)
    (33, 7),  # both down, height loses > 2x the width's pixels: vertical first
    (35, 18),  # 5 > 2*2: vertical first
    (34, 18),  # 5 <= 2*3: horizontal first
    (41, 23),  # height unchanged: horizontal pass only
    (37, 31),  # width unchanged: vertical pass only
    (64, 48),
    (1, 1),
    (37, 1),
    (1, 23),
]
CASES = [
    ("rgb", BIG),
    ("l", BIG),
    ("rgb_small", [(90, 182), (45, 91)]),  # 96x64 -> 720x1456 over 8, and over 16
    ("l_col", [(4, 20), (1, 3), (3, 1), (1, 1)]),
    ("rgb_row", [(25, 2), (4, 1), (1, 1)]),
]
# BICUBIC (Redux's SigLIP processor resizes with it): rgb-<W>x<H>-bicubic.png.
BICUBIC = [("rgb", [(100, 62), (12, 7), (56, 56), (33, 7), (20, 50), (41, 23), (1, 1)]),
           ("rgb_small", [(56, 56)])]


def sources():
    rng = np.random.default_rng(20240917)
    yy, xx = np.mgrid[0:23, 0:37].astype(np.float64)
    r = 255.0 * xx / 36.0  # horizontal ramp
    g = np.where(xx < 18, 0.0, 255.0)  # a hard vertical edge
    g[(yy > 6) & (yy < 15) & (xx > 24) & (xx < 32)] = 0.0  # a black box on the white side
    b = rng.integers(0, 256, size=(23, 37)).astype(np.float64)  # noise
    b[:, :4] = 255.0
    rgb = np.stack([r, g, b], -1)
    # A checkerboard corner with full-range steps, for ringing in both directions.
    checker = ((xx // 2 + yy // 2) % 2) * 255.0
    rgb[16:, :12, :] = checker[16:, :12, None]

    ell = 127.5 + 127.5 * np.sin((xx + 2 * yy) / 5.0)  # smooth waves
    ell[(xx - 25) ** 2 + (yy - 11) ** 2 < 36] = 255.0  # a white disc (mask-like)
    ell[:, 30:] = rng.integers(0, 256, size=(23, 7))  # a noisy band
    ell[20:, :] = 0.0

    small = rng.integers(0, 256, size=(8, 12, 3)).astype(np.float64)
    small[:, :6, 0] = 255.0
    small[4:, :, 1] = 0.0

    col = np.array([0, 255, 255, 0, 40, 200, 90, 255, 0], np.float64)[:, None]
    row = rng.integers(0, 256, size=(1, 11, 3)).astype(np.float64)
    row[0, 5] = (255, 0, 255)

    def u8(a):
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)

    return {
        "rgb": Image.fromarray(u8(rgb), "RGB"),
        "l": Image.fromarray(u8(ell), "L"),
        "rgb_small": Image.fromarray(u8(small), "RGB"),
        "l_col": Image.fromarray(u8(col), "L"),
        "rgb_row": Image.fromarray(u8(row), "RGB"),
    }


def vertical_first(w, h, out_w, out_h):
    return out_h < h and (h - out_h) > 2 * (w - out_w)


def check_pass_order(src, w, h, out):
    """Pillow's result must be the two one-pass resizes composed in the order of the rule."""
    (sw, sh), lz = src.size, Image.LANCZOS
    if w == sw or h == sh:
        return "one pass" if (w, h) != (sw, sh) else "copy"
    hv = np.array(src.resize((w, sh), lz).resize((w, h), lz))
    vh = np.array(src.resize((sw, h), lz).resize((w, h), lz))
    got = np.array(out)
    want, other = (vh, hv) if vertical_first(sw, sh, w, h) else (hv, vh)
    assert (got == want).all(), f"{src.size} -> {(w, h)}: Pillow's pass order is not the rule's"
    order = "vertical first" if vertical_first(sw, sh, w, h) else "horizontal first"
    return order + ("" if (got != other).any() else " (same either way)")


def main():
    if PIL.__version__ != PILLOW:
        print(f"warning: the goldens were made with Pillow {PILLOW}, this is {PIL.__version__}")
    os.makedirs(OUT, exist_ok=True)
    total = 0
    for name, img in sources().items():
        path = os.path.join(OUT, f"{name}.png")
        img.save(path, optimize=True)
        total += os.path.getsize(path)
    for name, sizes in CASES:
        src = Image.open(os.path.join(OUT, f"{name}.png"))
        src.load()
        for w, h in sizes:
            out = src.resize((w, h), Image.LANCZOS)
            assert out.mode == src.mode and out.size == (w, h)
            print(f"{name} {src.size[0]}x{src.size[1]} -> {w}x{h}: {check_pass_order(src, w, h, out)}")
            path = os.path.join(OUT, f"{name}-{w}x{h}.png")
            out.save(path, optimize=True)
            total += os.path.getsize(path)
    for name, sizes in BICUBIC:
        src = Image.open(os.path.join(OUT, f"{name}.png"))
        src.load()
        for w, h in sizes:
            out = src.resize((w, h), Image.BICUBIC)
            path = os.path.join(OUT, f"{name}-{w}x{h}-bicubic.png")
            out.save(path, optimize=True)
            total += os.path.getsize(path)
    n = sum(len(s) for _, s in CASES) + sum(len(s) for _, s in BICUBIC)
    print(f"wrote {n} cases from {len(CASES)} sources to {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
