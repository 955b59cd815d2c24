#!/usr/bin/env python3
"""Golden for Fill's conditioning (docs/flux.md §3 prepare_fill) on the tiny fixture autoencoder.

Run after make_fixtures.py:
    tools/reference/.venv/bin/python tools/reference/make_fill_golden.py

Writes tests/fixtures/fill_image.png (96x64 RGB), tests/fixtures/fill_mask.png (96x64 "L", a
soft mask: a hard rectangle plus a horizontal ramp) and tests/fixtures/golden/fill_cond.safetensors:
  img_cond = [ae.encode(img*(1-mask)) -> bf16 -> pack (64) || mask -> bf16 ->
              "b (h 8) (w 8) -> b (8 8) h w" -> pack (256)]  = [1, L, 320]
with img = u8/127.5 - 1 and mask = u8/255, exactly as flux/sampling.py prepare_fill does it.
"""

import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

from diffusers import AutoencoderKL  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bfl_math  # noqa: E402


def rearrange(x, pattern, **_):
    """The four einops patterns prepare_fill uses (einops is not in the venv)."""
    if pattern == "h w c -> 1 c h w":
        return x.permute(2, 0, 1)[None]
    if pattern == "h w -> 1 1 h w":
        return x[None, None]
    if pattern == "b (h ph) (w pw) -> b (ph pw) h w":
        b, hh, ww = x.shape
        return x.reshape(b, hh // 8, 8, ww // 8, 8).permute(0, 2, 4, 1, 3).reshape(b, 64, hh // 8, ww // 8)
    if pattern == "b c (h ph) (w pw) -> b (h w) (c ph pw)":
        return bfl_math.pack(x)
    raise ValueError(pattern)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "tests", "fixtures")
GOLD = os.path.join(FIX, "golden")
W, H = 96, 64


def main():
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    rgb = np.stack([255.0 * xx / (W - 1), 127.5 + 127.5 * np.sin(yy / 7.0),
                    127.5 + 127.5 * np.cos((xx - yy) / 11.0)], -1)
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    mask = np.zeros((H, W), np.float32)
    mask[16:48, 24:64] = 255.0
    mask[:, 72:] = np.clip((xx[:, 72:] - 72) * 12.0, 0, 255)
    mask = mask.astype(np.uint8)
    img_path, mask_path = os.path.join(FIX, "fill_image.png"), os.path.join(FIX, "fill_mask.png")
    Image.fromarray(rgb, "RGB").save(img_path, optimize=True)
    Image.fromarray(mask, "L").save(mask_path, optimize=True)

    vae = AutoencoderKL.from_pretrained(os.path.join(FIX, "tiny-diffusers", "vae"),
                                        torch_dtype=torch.float32).eval()

    def ae_encode(x):
        with torch.no_grad():
            mean = vae.encode(x).latent_dist.mode()
        return (mean - vae.config.shift_factor) * vae.config.scaling_factor

    # prepare_fill, as the reference writes it.
    img_cond = torch.from_numpy(np.array(Image.open(img_path).convert("RGB"))).float() / 127.5 - 1.0
    img_cond = rearrange(img_cond, "h w c -> 1 c h w")
    m = torch.from_numpy(np.array(Image.open(mask_path).convert("L"))).float() / 255.0
    m = rearrange(m, "h w -> 1 1 h w")
    with torch.no_grad():
        img_cond = img_cond * (1 - m)
        img_cond = ae_encode(img_cond)
        m = m[:, 0, :, :]
        m = m.to(torch.bfloat16)
        m = rearrange(m, "b (h ph) (w pw) -> b (ph pw) h w", ph=8, pw=8)
        m = rearrange(m, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)
    latent = img_cond.clone()
    img_cond = img_cond.to(torch.bfloat16)
    img_cond = rearrange(img_cond, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)
    img_cond = torch.cat((img_cond, m), dim=-1).float()
    save_file({"cond": img_cond.contiguous(), "masked_latent": latent.contiguous()},
              os.path.join(GOLD, "fill_cond.safetensors"))
    print(f"cond {tuple(img_cond.shape)}, std {img_cond.std():.4f}")
    for p in (img_path, mask_path, os.path.join(GOLD, "fill_cond.safetensors")):
        print(f"{os.path.relpath(p, ROOT)}: {os.path.getsize(p)} bytes")


if __name__ == "__main__":
    main()
