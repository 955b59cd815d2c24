#!/usr/bin/env python3
"""Build the golden noise for fluxfit's `torch_randn` parity test.

Writes tests/fixtures/golden/noise.safetensors (relative to the repository root):
one float32 tensor per (dtype, seed, shape), named like `bf16_s42_1x16x8x12`, holding
`torch.randn(shape, dtype=dtype, generator=torch.Generator("cpu").manual_seed(seed))`
cast to float32 (exact for bf16).

The shapes cover all three code paths of torch's CPU `normal_`: the scalar path below
16 elements ([5]), the 16-block fill with whole blocks ([1,16,8,12], [1,16,2,2],
[1,16,3,5]) and with the tail redrawn ([17], [33], [2,3,7]). Seed 2**32+5 checks that
only the low 32 bits seed mt19937. The f32 fill goes through torch's AVX2 kernel,
which torch also uses on AVX-512 CPUs; it needs an x86-64 CPU with AVX2.

Run with tools/reference/.venv/bin/python tools/reference/make_noise_golden.py (from anywhere).
Deterministic: running it twice gives byte-identical files.
"""

import os

import torch
from safetensors.torch import save_file

assert torch.__version__.startswith("2.6.0"), (
    f"bf16 noise must come from torch 2.6.0 (the reference's pin), not {torch.__version__}"
)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "golden", "noise.safetensors")

SEEDS = [0, 1, 42, 2**32 + 5, 123456789]
SHAPES = [[1, 16, 8, 12], [1, 16, 2, 2], [5], [17], [33], [1, 16, 3, 5], [2, 3, 7]]
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def main():
    tensors = {}
    for prefix, dtype in DTYPES.items():
        for seed in SEEDS:
            for shape in SHAPES:
                gen = torch.Generator("cpu").manual_seed(seed)
                noise = torch.randn(shape, dtype=dtype, generator=gen)
                name = f"{prefix}_s{seed}_{'x'.join(map(str, shape))}"
                tensors[name] = noise.to(torch.float32).contiguous()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(tensors, OUT, metadata={"torch": torch.__version__})
    print(f"wrote {len(tensors)} tensors to {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
