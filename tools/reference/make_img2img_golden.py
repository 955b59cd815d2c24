#!/usr/bin/env python3
"""Golden for img2img (demo_st.py's rule, docs/flux.md §3) on the tiny dev fixture, in float32.

Run after make_fixtures.py (it reads tests/fixtures/tiny-diffusers and golden/e2e_dev.*):
    tools/reference/.venv/bin/python tools/reference/make_img2img_golden.py

Writes tests/fixtures/img2img_init.png (a 96x64 synthetic RGB image) and
tests/fixtures/golden/img2img_dev.{safetensors,json}. The text embeddings, noise and schedule are
e2e_dev's (prompt "a tiny red fox in the snow", seed 42, 96x64, 3 steps, guidance 3.5).

demo_st.py: init = 2 * ToTensor(image) - 1 (in [-1, 1]); z = ae.encode(init) (the posterior
mean, scaled: (mean - shift) * scale), in fp32; t_idx = int((1 - strength) * steps);
t = timesteps[t_idx]; x = t * noise + (1 - t) * z; denoise over timesteps[t_idx:].
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

from diffusers import AutoencoderKL, FluxTransformer2DModel  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bfl_math  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "tests", "fixtures")
GOLD = os.path.join(FIX, "golden")
DIFF_DIR = os.path.join(FIX, "tiny-diffusers")
STRENGTH = 0.6


def main():
    e2e = load_file(os.path.join(GOLD, "e2e_dev.safetensors"))
    with open(os.path.join(GOLD, "e2e_dev.json")) as f:
        params = json.load(f)
    width, height, steps = params["width"], params["height"], params["num_steps"]

    # A deterministic init image: smooth colour gradients with a few stripes.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127.5 + 127.5 * np.sin(xx / 9.0)
    g = 255.0 * yy / (height - 1)
    b = 127.5 + 127.5 * np.cos((xx + yy) / 13.0)
    rgb = np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)
    png = os.path.join(FIX, "img2img_init.png")
    Image.fromarray(rgb, "RGB").save(png, optimize=True)

    img = Image.open(png).convert("RGB")
    init = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[None] / 255.0
    init = 2.0 * init - 1.0

    vae = AutoencoderKL.from_pretrained(os.path.join(DIFF_DIR, "vae"), torch_dtype=torch.float32).eval()
    flow = FluxTransformer2DModel.from_pretrained(os.path.join(DIFF_DIR, "transformer"),
                                                  torch_dtype=torch.float32).eval()
    with torch.no_grad():
        mean = vae.encode(init).latent_dist.mode()
    z = (mean - vae.config.shift_factor) * vae.config.scaling_factor

    noise = e2e["noise"]
    timesteps = params["timesteps"]
    t_idx = int((1 - STRENGTH) * steps)
    t = timesteps[t_idx]
    timesteps = timesteps[t_idx:]
    start = t * noise + (1.0 - t) * z

    img_tok = bfl_math.pack(start)
    h16, w16 = (height + 15) // 16, (width + 15) // 16
    img_ids = bfl_math.img_ids_grid(h16, w16)
    txt, vec = e2e["txt"], e2e["vec"]
    txt_ids = torch.zeros(1, txt.shape[1], 3)
    g = torch.full((1,), params["guidance"], dtype=torch.float32)
    for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:]):
        t_vec = torch.full((1,), t_curr, dtype=torch.float32)
        with torch.no_grad():
            pred = flow(hidden_states=img_tok, encoder_hidden_states=txt, pooled_projections=vec,
                        timestep=t_vec, img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=g,
                        return_dict=False)[0]
        img_tok = img_tok + (t_prev - t_curr) * pred
    final_latents = bfl_math.unpack(img_tok, height, width)

    save_file({"init": init.contiguous(), "init_latent": z.contiguous(), "start": start.contiguous(),
               "final_latents": final_latents.contiguous()},
              os.path.join(GOLD, "img2img_dev.safetensors"))
    out = dict(params)
    out.update({"strength": STRENGTH, "t_idx": t_idx, "timesteps": timesteps,
                "init_image": "img2img_init.png",
                "rule": "demo_st.py: init in [-1,1]; x = t*noise + (1-t)*ae.encode(init); "
                        "timesteps[int((1-strength)*steps):]; float32 throughout"})
    with open(os.path.join(GOLD, "img2img_dev.json"), "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print(f"t_idx {t_idx}, t {t:.6f}, start std {start.std():.4f}, final std {final_latents.std():.4f}")
    for p in (png, os.path.join(GOLD, "img2img_dev.safetensors")):
        print(f"{os.path.relpath(p, ROOT)}: {os.path.getsize(p)} bytes")


if __name__ == "__main__":
    main()
