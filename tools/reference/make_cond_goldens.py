#!/usr/bin/env python3
"""Tiny Fill / Control (canny-depth, full and LoRA) / Kontext checkpoints and their end-to-end
goldens (docs/flux.md §1.2, §2.1 "LoRA", §3 prepare_fill / prepare_control / prepare_kontext /
denoise), all float32.

Run after make_fixtures.py and make_fill_golden.py (it reads tiny-bfl/, tiny-diffusers/vae,
golden/e2e_dev.* and golden/fill_cond.safetensors):
    tools/reference/.venv/bin/python tools/reference/make_cond_goldens.py
Deterministic (fixed seeds, one thread): two runs give byte-identical files.

Every golden reuses e2e_dev's text embeddings (`txt` [1,16,32], `vec` [1,16]), noise (seed 42,
packed [1,24,64]), 96x64 target, 3 steps, guidance 3.5 and its shifted schedule (L = 24). The
goldens come from diffusers' FluxTransformer2DModel (weights converted from the BFL files with
diffusers' own checkpoint converter) in a plain Euler loop x <- x + (t_prev - t_curr)*pred,
model called at t_curr; each is cross-checked against bfl_math (our implementation of docs/flux.md) and
against diffusers' own pipeline (FluxFillPipeline / FluxControlPipeline / FluxKontextPipeline).

Writes
  tests/fixtures/tiny-variants/flux1-tiny-fill-dev.safetensors   BFL keys, bf16, 52 tensors, the tiny
      dev architecture with in_channels 384 (img_in.weight [64, 384]); own seed.
  tests/fixtures/tiny-variants/flux1-tiny-canny-dev.safetensors  the same with in_channels 128.
  tests/fixtures/tiny-bfl/flux1-tiny-canny-dev-lora.safetensors
      A control LoRA for the tiny dev base in the BFL format of FLUX.1-{Canny,Depth}-dev-lora
      (the format diffusers' `_convert_bfl_flux_control_lora_to_diffusers` reads), bf16,
      75 tensors. For each of the 23 nn.Linear layers X of the in_channels-128 model:
        X.lora_A.weight [r, in] (no lora_A bias), X.lora_B.weight [out, r], X.lora_B.bias [out],
        r = min(20, in, out), i.e. 20 everywhere except vector_in.in_layer (in 16) where r = 16.
      X ranges over: img_in (in 128), txt_in, time_in.{in,out}_layer, vector_in.{in,out}_layer,
        guidance_in.{in,out}_layer, double_blocks.0.{img,txt}_mod.lin,
        double_blocks.0.{img,txt}_attn.{qkv,proj}, double_blocks.0.{img,txt}_mlp.{0,2},
        single_blocks.0.{linear1,linear2,modulation.lin}, final_layer.linear,
        final_layer.adaLN_modulation.1.
      Plus 6 QK-norm scales that replace the base's: double_blocks.0.{img,txt}_attn.norm.
        {query,key}_norm.scale and single_blocks.0.norm.{query,key}_norm.scale [32].
      Nothing else (no base weights, no alphas). Rule: the dev base's img_in.weight [64,64] is
      zero-padded to [64,128] (bias unchanged), the norm scales are replaced, and every Linear
      gives base(x) + s*(B(A(x)) + b_B), the LoRA bias scaled with B (s = 0.85, the CLI default).
  tests/fixtures/control_image.png   96x64 RGB, white lines on black (an edge / depth-like map).
  tests/fixtures/kontext_image.png   64x80 (WxH) RGB, used as is (no Kontext resolution snapping).
  tests/fixtures/golden/fill_dev.{safetensors,json}
  tests/fixtures/golden/control_dev.{safetensors,json}
  tests/fixtures/golden/control_lora_dev.{safetensors,json}
  tests/fixtures/golden/kontext_dev.{safetensors,json}

Conditioning, as the reference prepares it (ae = posterior mean, (mean - 0.1159)*0.3611, f32):
  fill     img_cond = golden/fill_cond.safetensors `cond` [1,24,320] (make_fill_golden.py);
           model input cat([img 64, img_cond 320], -1).
  control  x = u8/127.5 - 1 -> ae.encode -> bf16 -> pack = control_latent [1,24,64];
           model input cat([img 64, control_latent 64], -1) = 128 channels.
  kontext  x = u8/127.5 - 1 (64x80) -> ae.encode [1,16,10,8] -> bf16 -> pack = cond_seq [1,20,64],
           cond_ids (1, r, c), r < 5, c < 4; model input is the sequence [img ; cond_seq] with
           ids [img_ids ; cond_ids] (text first inside the model), prediction sliced to the first
           24 tokens; schedule L = 24 (target tokens only).
The bf16 rounding of the conditioning latents is the reference's (docs/flux.md §3); the tensors before
rounding are saved too (`*_f32`).

diffusers' LoRA cross-check needs peft (not in requirements.txt); without it that one check is
skipped and the goldens are unchanged (they do not use peft).
"""

import json
import math
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bfl_math  # noqa: E402
from make_fixtures import (  # noqa: E402  (also sets one thread + deterministic algorithms)
    AE, FLOW, bf16r, check_close, diffusers_flux_inner_dim, gen_for, maxdiff, randn, save_st,
    write_json,
)

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, FluxTransformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "tests", "fixtures")
BFL_DIR = os.path.join(FIX, "tiny-bfl")
# Fill and Canny flows live apart so that tiny-bfl/ keeps one flow model per variant folder rule.
VAR_DIR = os.path.join(FIX, "tiny-variants")
DIFF_DIR = os.path.join(FIX, "tiny-diffusers")
GOLD = os.path.join(FIX, "golden")

SEED_FLOW_FILL = 1100
SEED_FLOW_CANNY = 1200
SEED_LORA = 1300
LORA_RANK = 20
LORA_SCALE = 0.85
H = FLOW["hidden_size"]

written = []


# ---------------------------------------------------------------------------- helpers
def init_flow_c(in_channels, seed):
    """make_fixtures.init_flow's rule with another in_channels."""
    model = bfl_math.Flux(guidance_embed=True, **{**FLOW, "in_channels": in_channels})
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = gen_for(name, seed)
            if name.endswith(".scale"):
                v = 1.0 + 0.25 * randn(p.shape, g)
            elif name.endswith(".bias"):
                std = 0.25 if ("_mod." in name or "modulation" in name) else 0.1
                v = std * randn(p.shape, g)
            else:
                v = randn(p.shape, g) / math.sqrt(p.shape[1])
            p.copy_(bf16r(v))
    return model.eval()


def save_bf16(path, sd):
    save_st(path, {k: v.to(torch.bfloat16) for k, v in sd.items()})
    written.append(path)
    back = {k: v.float() for k, v in load_file(path).items()}
    assert all(torch.equal(back[k], sd[k].float()) for k in sd), "not bf16-exact"
    return back


def bfl_flow(sd, in_channels):
    m = bfl_math.Flux(guidance_embed=True, **{**FLOW, "in_channels": in_channels})
    m.load_state_dict(sd, strict=True)
    return m.eval()


def diffusers_flow(sd_bfl, in_channels):
    with diffusers_flux_inner_dim(H):
        conv = convert_flux_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in sd_bfl.items()})
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=64, num_layers=FLOW["depth"],
        num_single_layers=FLOW["depth_single_blocks"], attention_head_dim=H // FLOW["num_heads"],
        num_attention_heads=FLOW["num_heads"], joint_attention_dim=FLOW["context_in_dim"],
        pooled_projection_dim=FLOW["vec_in_dim"], guidance_embeds=True,
        axes_dims_rope=list(FLOW["axes_dim"]),
    )
    model.load_state_dict(conv, strict=True)
    return model.float().eval()


class Ctx:
    """e2e_dev's embeddings, noise, ids and schedule."""

    def __init__(self):
        self.e2e = load_file(os.path.join(GOLD, "e2e_dev.safetensors"))
        with open(os.path.join(GOLD, "e2e_dev.json")) as f:
            self.params = json.load(f)
        p = self.params
        self.width, self.height, self.steps = p["width"], p["height"], p["num_steps"]
        self.txt, self.vec = self.e2e["txt"], self.e2e["vec"]
        self.txt_ids = torch.zeros(1, self.txt.shape[1], 3)
        self.noise = self.e2e["noise"]
        self.packed_noise = self.e2e["packed_noise"]
        assert torch.equal(bfl_math.pack(self.noise), self.packed_noise)
        self.h16, self.w16 = math.ceil(self.height / 16), math.ceil(self.width / 16)
        self.img_ids = bfl_math.img_ids_grid(self.h16, self.w16)
        self.L = self.packed_noise.shape[1]
        self.timesteps = bfl_math.get_schedule(self.steps, self.L, shift=True)
        assert self.timesteps == p["timesteps"], (self.timesteps, p["timesteps"])
        self.guidance = p["guidance"]
        self.g = torch.full((1,), self.guidance, dtype=torch.float32)

    def diff_fn(self, model, **extra):
        def fn(x, ids, t):
            with torch.no_grad():
                return model(hidden_states=x, encoder_hidden_states=self.txt, pooled_projections=self.vec,
                             timestep=t, img_ids=ids[0], txt_ids=self.txt_ids[0], guidance=self.g,
                             return_dict=False, **extra)[0]
        return fn

    def bfl_fn(self, model):
        def fn(x, ids, t):
            with torch.no_grad():
                return model(x, ids, self.txt, self.txt_ids, t, self.vec, self.g)
        return fn

    def denoise(self, fn, img_cond=None, cond_seq=None, cond_ids=None):
        """docs/flux.md §3 denoise in f32. Returns (final packed latents, the first step's prediction)."""
        img = self.packed_noise.clone()
        v0 = None
        for i, (t_curr, t_prev) in enumerate(zip(self.timesteps[:-1], self.timesteps[1:])):
            x, ids = img, self.img_ids
            if img_cond is not None:
                x = torch.cat([x, img_cond], dim=-1)
            if cond_seq is not None:
                x = torch.cat([x, cond_seq], dim=1)
                ids = torch.cat([ids, cond_ids], dim=1)
            pred = fn(x, ids, torch.full((1,), t_curr, dtype=torch.float32))[:, : self.L]
            if i == 0:
                v0 = pred
            img = img + (t_prev - t_curr) * pred
        return img, v0

    def common_json(self):
        p = self.params
        return {
            "width": self.width, "height": self.height, "num_steps": self.steps, "guidance": self.guidance,
            "seed": p["seed"], "shift": True, "image_seq_len": self.L, "timesteps": self.timesteps,
            "prompt": p["prompt"],
            "embeddings": "txt [1,16,32] and vec [1,16] from golden/e2e_dev.safetensors (T5 length 16)",
            "noise": "golden/e2e_dev.safetensors noise / packed_noise (seed 42)",
            "img_ids": "(0, r, c) over the 4x6 target token grid",
            "loop": "f32 Euler x <- x + (t_prev - t_curr)*pred, model at t_curr, guidance as a [1] f32 tensor",
            "dtype": "float32 throughout; conditioning latents rounded to bf16 as the reference does",
        }


def load_u8(path, mode="RGB"):
    return torch.from_numpy(np.array(Image.open(path).convert(mode)))


def to_pm1(u8_hwc):
    """u8 HWC -> [1,3,H,W] in [-1,1] as the reference: x/127.5 - 1."""
    return (u8_hwc.float() / 127.5 - 1.0).permute(2, 0, 1)[None].contiguous()


def stats_and_save(name, tensors, params):
    path = os.path.join(GOLD, f"{name}.safetensors")
    save_st(path, tensors)
    write_json(os.path.join(GOLD, f"{name}.json"), params)
    written.extend([path, os.path.join(GOLD, f"{name}.json")])
    for k, v in sorted(tensors.items()):
        vf = v.float()
        print(f"    {name}.{k:<20} {str(list(v.shape)):<16} {str(v.dtype):<14} "
              f"max|v| {vf.abs().max().item():8.4f}  std {vf.std().item():.4f}")


def pipe_from(cls, transformer):
    pipe = cls.from_pretrained(DIFF_DIR, transformer=transformer, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------- LoRA
def lora_layers(in_channels=128):
    """(name, in, out) of every nn.Linear of the BFL model, in module order."""
    m = bfl_math.Flux(guidance_embed=True, **{**FLOW, "in_channels": in_channels})
    return [(n, mod.in_features, mod.out_features) for n, mod in m.named_modules() if isinstance(mod, nn.Linear)], \
        [n for n, _ in m.named_parameters() if n.endswith(".scale")]


def make_lora():
    linears, scales = lora_layers()
    sd = {}
    for name, fin, fout in linears:
        r = min(LORA_RANK, fin, fout)
        sd[f"{name}.lora_A.weight"] = bf16r(randn([r, fin], gen_for(f"{name}.lora_A.weight", SEED_LORA)) / math.sqrt(fin))
        sd[f"{name}.lora_B.weight"] = bf16r(0.5 * randn([fout, r], gen_for(f"{name}.lora_B.weight", SEED_LORA))
                                            / math.sqrt(r))
        sd[f"{name}.lora_B.bias"] = bf16r(0.1 * randn([fout], gen_for(f"{name}.lora_B.bias", SEED_LORA)))
    for name in scales:
        sd[name] = bf16r(1.0 + 0.25 * randn([H // FLOW["num_heads"]], gen_for(name, SEED_LORA)))
    return sd, linears, scales


class LoraLinear(nn.Module):
    """base(x) + scale * (x A^T B^T + b_B): the reference's LoRA Linear (docs/flux.md §2.1), unmerged."""

    def __init__(self, base, a, b, bias, scale):
        super().__init__()
        self.base, self.scale = base, scale
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.register_buffer("bias", bias)

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.a), self.b, self.bias)


def replace_module(model, path, new):
    parent, _, child = path.rpartition(".")
    model.get_submodule(parent)._modules[child] = new


def padded_base(dev_sd):
    sd = dict(dev_sd)
    w = sd["img_in.weight"]
    sd["img_in.weight"] = torch.cat([w, torch.zeros_like(w)], dim=1)  # [H,64] -> [H,128]
    return sd


def bfl_with_lora(dev_sd, lora, scale):
    """bfl_math model, padded img_in, norm scales replaced, every Linear wrapped (BFL names)."""
    sd = padded_base(dev_sd)
    for k, v in lora.items():
        if k.endswith(".scale"):
            sd[k] = v
    m = bfl_flow(sd, 128)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, nn.Linear) and f"{name}.lora_A.weight" in lora:
            replace_module(m, name, LoraLinear(mod, lora[f"{name}.lora_A.weight"], lora[f"{name}.lora_B.weight"],
                                               lora[f"{name}.lora_B.bias"], scale))
    return m


def diffusers_targets(name):
    """Our own BFL -> diffusers map for LoRA targets: [(module path, row slice of B, swap halves)]."""
    top = {
        "img_in": "x_embedder", "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer.linear": "proj_out",
    }
    if name in top:
        return [(top[name], slice(None), False)]
    if name == "final_layer.adaLN_modulation.1":
        return [("norm_out.linear", slice(None), True)]  # AdaLayerNormContinuous: (scale, shift)
    m = re.fullmatch(r"double_blocks\.(\d+)\.(img|txt)_(mod\.lin|attn\.qkv|attn\.proj|mlp\.0|mlp\.2)", name)
    if m:
        i, s, part = m.groups()
        p = f"transformer_blocks.{i}."
        img = s == "img"
        if part == "attn.qkv":
            names = ["attn.to_q", "attn.to_k", "attn.to_v"] if img else \
                ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
            return [(p + n, slice(j * H, (j + 1) * H), False) for j, n in enumerate(names)]
        path = {
            "mod.lin": "norm1.linear" if img else "norm1_context.linear",
            "attn.proj": "attn.to_out.0" if img else "attn.to_add_out",
            "mlp.0": "ff.net.0.proj" if img else "ff_context.net.0.proj",
            "mlp.2": "ff.net.2" if img else "ff_context.net.2",
        }[part]
        return [(p + path, slice(None), False)]
    m = re.fullmatch(r"single_blocks\.(\d+)\.(linear1|linear2|modulation\.lin)", name)
    if m:
        i, part = m.groups()
        p = f"single_transformer_blocks.{i}."
        if part == "linear1":
            bounds = [0, H, 2 * H, 3 * H, 3 * H + int(H * FLOW["mlp_ratio"])]
            names = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
            return [(p + n, slice(bounds[j], bounds[j + 1]), False) for j, n in enumerate(names)]
        return [(p + ("proj_out" if part == "linear2" else "norm.linear"), slice(None), False)]
    raise KeyError(name)


def diffusers_norm_key(name):
    m = re.fullmatch(r"double_blocks\.(\d+)\.(img|txt)_attn\.norm\.(query|key)_norm\.scale", name)
    if m:
        i, s, qk = m.groups()
        return f"transformer_blocks.{i}.attn.norm_{'added_' if s == 'txt' else ''}{qk[0]}.weight"
    m = re.fullmatch(r"single_blocks\.(\d+)\.norm\.(query|key)_norm\.scale", name)
    i, qk = m.groups()
    return f"single_transformer_blocks.{i}.attn.norm_{qk[0]}.weight"


def diffusers_with_lora(dev_sd, lora, scale):
    """diffusers model from the padded base (diffusers' checkpoint converter), our unmerged wrapper."""
    model = diffusers_flow(padded_base(dev_sd), 128)
    with torch.no_grad():
        for k, v in lora.items():
            if k.endswith(".scale"):
                model.get_parameter(diffusers_norm_key(k)).copy_(v)
    n = 0
    for k in [k for k in lora if k.endswith(".lora_A.weight")]:
        name = k[: -len(".lora_A.weight")]
        a, b, bias = lora[k], lora[f"{name}.lora_B.weight"], lora[f"{name}.lora_B.bias"]
        for path, rows, swap in diffusers_targets(name):
            bb, bbias = b[rows], bias[rows]
            if swap:
                bb = torch.cat(bb.chunk(2, 0)[::-1], 0)
                bbias = torch.cat(bbias.chunk(2, 0)[::-1], 0)
            base = model.get_submodule(path)
            assert isinstance(base, nn.Linear) and base.out_features == bb.shape[0] and base.in_features == a.shape[1]
            replace_module(model, path, LoraLinear(base, a, bb.contiguous(), bbias.contiguous(), scale))
            n += 1
    return model, n


def merged_bfl_sd(dev_sd, lora, scale):
    """W + s*B@A, b + s*b_B, norm scales replaced (for the merged-vs-unmerged check)."""
    sd = padded_base(dev_sd)
    for k, v in lora.items():
        if k.endswith(".scale"):
            sd[k] = v
        elif k.endswith(".lora_A.weight"):
            name = k[: -len(".lora_A.weight")]
            sd[f"{name}.weight"] = sd[f"{name}.weight"] + scale * (lora[f"{name}.lora_B.weight"] @ v)
            sd[f"{name}.bias"] = sd[f"{name}.bias"] + scale * lora[f"{name}.lora_B.bias"]
    return sd


def diffusers_lora_state_dict(lora):
    """diffusers' own BFL-control-LoRA converter. It hard-codes 19 double / 38 single blocks and
    inner_dim 3072: the tiny LoRA is padded with copies of block 0 for the conversion (the copies
    are dropped afterwards) and the one torch.split uses the tiny sizes (as in make_fixtures)."""
    from diffusers.loaders.lora_conversion_utils import _convert_bfl_flux_control_lora_to_diffusers

    padded = {k: v.clone() for k, v in lora.items()}
    for k, v in lora.items():
        for prefix, n in (("double_blocks.0.", 19), ("single_blocks.0.", 38)):
            if k.startswith(prefix):
                for i in range(1, n):
                    padded[k.replace(prefix, prefix.replace(".0.", f".{i}."), 1)] = v.clone()
    with diffusers_flux_inner_dim(H):
        conv = _convert_bfl_flux_control_lora_to_diffusers(padded)
    out = {}
    for k, v in conv.items():
        m = re.match(r"transformer\.(single_)?transformer_blocks\.(\d+)\.", k)
        if m and int(m.group(2)) != 0:
            continue
        out[k] = v
    return out


# ---------------------------------------------------------------------------- images
def make_control_image(path, w, h):
    """White lines on black, RGB: a rectangle outline, two diagonals, a circle and a grid line."""
    img = np.zeros((h, w), np.uint8)
    img[10, 8:88] = 255
    img[54, 8:88] = 255
    img[10:55, 8] = 255
    img[10:55, 87] = 255
    for x in range(0, w):
        y = int(round(0.55 * x)) + 3
        if 0 <= y < h:
            img[y, x] = 255
        y2 = h - 1 - int(round(0.4 * x))
        if 0 <= y2 < h:
            img[y2, x] = 255
    yy, xx = np.mgrid[0:h, 0:w]
    rr = np.sqrt((xx - 60.0) ** 2 + (yy - 30.0) ** 2)
    img[np.abs(rr - 14.0) < 0.7] = 255
    img[20:46, 30:32] = 255
    Image.fromarray(np.stack([img] * 3, -1), "RGB").save(path, optimize=True)
    written.append(path)


def make_kontext_image(path, w, h):
    """A smooth colour field with a dark disc and a bright bar (64x80, portrait)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255.0 * yy / (h - 1)
    g = 127.5 + 127.5 * np.sin(xx / 6.0 + yy / 17.0)
    b = 255.0 * (1.0 - xx / (w - 1))
    rgb = np.stack([r, g, b], -1)
    disc = (xx - 24.0) ** 2 + (yy - 50.0) ** 2 < 13.0 ** 2
    rgb[disc] = [20.0, 30.0, 40.0]
    rgb[8:16, 10:56] = [250.0, 240.0, 230.0]
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(path, optimize=True)
    written.append(path)


# ---------------------------------------------------------------------------- main
def main():
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    assert torch.__version__.startswith("2.6.0")
    try:
        import peft  # noqa: F401
        have_peft = True
    except ImportError:
        have_peft = False
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    ctx = Ctx()

    vae = AutoencoderKL.from_pretrained(os.path.join(DIFF_DIR, "vae"), dtype=torch.float32).eval()
    ae = bfl_math.AutoEncoder(**AE)
    ae.load_state_dict({k: v.float() for k, v in load_file(os.path.join(BFL_DIR, "ae.safetensors")).items()})
    ae.eval()

    def ae_encode(x):
        with torch.no_grad():
            mean = vae.encode(x).latent_dist.mode()
            z = (mean - vae.config.shift_factor) * vae.config.scaling_factor
            check_close("  ae.encode diffusers vs bfl_math", ae.encode(x), z, 1e-4)
        return z

    dev_sd = {k: v.float() for k, v in load_file(os.path.join(BFL_DIR, "flux1-tiny-dev.safetensors")).items()}

    # ------------------------------------------------------------------ Fill
    print("fill")
    m = init_flow_c(384, SEED_FLOW_FILL)
    fill_sd = save_bf16(os.path.join(VAR_DIR, "flux1-tiny-fill-dev.safetensors"), m.state_dict())
    assert len(fill_sd) == 52 and fill_sd["img_in.weight"].shape == (H, 384)
    fill_diff, fill_bfl = diffusers_flow(fill_sd, 384), bfl_flow(fill_sd, 384)
    cond = load_file(os.path.join(GOLD, "fill_cond.safetensors"))["cond"]
    assert cond.shape == (1, ctx.L, 320) and torch.equal(bf16r(cond), cond)
    final, v0 = ctx.denoise(ctx.diff_fn(fill_diff), img_cond=cond)
    final_b, v0_b = ctx.denoise(ctx.bfl_fn(fill_bfl), img_cond=cond)
    check_close("fill velocity0 diffusers vs bfl_math", v0_b, v0, 1e-4)
    check_close("fill final diffusers vs bfl_math", final_b, final, 2e-4)
    nocond, _ = ctx.denoise(ctx.diff_fn(fill_diff), img_cond=torch.zeros_like(cond))
    print(f"  conditioning effect: max|final(cond) - final(zero cond)| = {maxdiff(final, nocond):.3f}")
    from diffusers import FluxFillPipeline

    pipe = pipe_from(FluxFillPipeline, fill_diff)
    pipe.check_inputs = lambda *a, **k: None  # it refuses image + masked_image_latents together
    with torch.no_grad():
        out = pipe(image=Image.open(os.path.join(FIX, "fill_image.png")).convert("RGB"), masked_image_latents=cond,
                   prompt_embeds=ctx.txt, pooled_prompt_embeds=ctx.vec, latents=ctx.packed_noise.clone(),
                   num_inference_steps=ctx.steps, guidance_scale=ctx.guidance, height=ctx.height,
                   width=ctx.width, output_type="latent", return_dict=False)[0]
    check_close("fill final ours vs diffusers FluxFillPipeline (masked_image_latents = our cond)", out, final, 2e-3)
    del pipe
    params = ctx.common_json()
    params.update({
        "model": "tiny-variants/flux1-tiny-fill-dev.safetensors", "in_channels": 384,
        "fill_image": "fill_image.png", "fill_mask": "fill_mask.png",
        "img_cond": "golden/fill_cond.safetensors cond [1,24,320] (make_fill_golden.py): "
                    "bf16(pack(ae.encode(img*(1-mask)))) || bf16(pack(unshuffle8(mask)))",
        "model_input": "cat([img 64, img_cond 320], -1) = 384 channels",
        "guidance_note": "e2e_dev's 3.5, not the fill CLI default 30",
    })
    stats_and_save("fill_dev", {"img_cond": cond, "velocity0": v0, "final_packed": final,
                                "final_latents": bfl_math.unpack(final, ctx.height, ctx.width)}, params)

    # ------------------------------------------------------------------ Control: conditioning
    print("control")
    cpath = os.path.join(FIX, "control_image.png")
    make_control_image(cpath, ctx.width, ctx.height)
    cu8 = load_u8(cpath)
    assert cu8.shape == (ctx.height, ctx.width, 3)
    cx = to_pm1(cu8)
    cz = ae_encode(cx)
    control_f32 = bfl_math.pack(cz)
    control = bf16r(control_f32)
    print(f"  control latent: max|bf16 - f32| = {maxdiff(control, control_f32):.2e}")

    # ------------------------------------------------------------------ Control: full model
    m = init_flow_c(128, SEED_FLOW_CANNY)
    canny_sd = save_bf16(os.path.join(VAR_DIR, "flux1-tiny-canny-dev.safetensors"), m.state_dict())
    assert len(canny_sd) == 52 and canny_sd["img_in.weight"].shape == (H, 128)
    canny_diff, canny_bfl = diffusers_flow(canny_sd, 128), bfl_flow(canny_sd, 128)
    final, v0 = ctx.denoise(ctx.diff_fn(canny_diff), img_cond=control)
    final_b, v0_b = ctx.denoise(ctx.bfl_fn(canny_bfl), img_cond=control)
    check_close("control velocity0 diffusers vs bfl_math", v0_b, v0, 1e-4)
    check_close("control final diffusers vs bfl_math", final_b, final, 2e-4)
    nocond, _ = ctx.denoise(ctx.diff_fn(canny_diff), img_cond=torch.zeros_like(control))
    print(f"  conditioning effect: max|final(control) - final(zero control)| = {maxdiff(final, nocond):.3f}")
    from diffusers import FluxControlPipeline

    pipe = pipe_from(FluxControlPipeline, canny_diff)
    with torch.no_grad():
        out = pipe(control_image=control, prompt_embeds=ctx.txt, pooled_prompt_embeds=ctx.vec,
                   latents=ctx.packed_noise.clone(), num_inference_steps=ctx.steps,
                   guidance_scale=ctx.guidance, height=ctx.height, width=ctx.width, output_type="latent",
                   return_dict=False)[0]
    check_close("control final ours vs diffusers FluxControlPipeline (packed control latent)", out, final, 2e-3)
    del pipe
    control_json = {
        "control_image": "control_image.png", "control_image_size": [ctx.width, ctx.height],
        "prepare_control": "x = u8/127.5 - 1 (no resize: the image is already 96x64; no Canny/Depth step, "
                           "the image is the control map) -> ae.encode (posterior mean, (mean-0.1159)*0.3611, f32) "
                           "-> pack = control_latent_f32 [1,24,64] -> bf16 = control_latent [1,24,64]",
        "model_input": "cat([img 64, control_latent 64], -1) = 128 channels",
    }
    params = ctx.common_json()
    params.update({"model": "tiny-variants/flux1-tiny-canny-dev.safetensors", "in_channels": 128, **control_json,
                   "guidance_note": "e2e_dev's 3.5, not the canny/depth CLI defaults 30/10"})
    stats_and_save("control_dev", {"control_latent": control, "control_latent_f32": control_f32, "velocity0": v0,
                                   "final_packed": final,
                                   "final_latents": bfl_math.unpack(final, ctx.height, ctx.width)}, params)

    # ------------------------------------------------------------------ Control LoRA
    print("control lora")
    lora, linears, scales = make_lora()
    lora_path = os.path.join(BFL_DIR, "flux1-tiny-canny-dev-lora.safetensors")
    lora = save_bf16(lora_path, lora)
    assert len(lora) == 3 * len(linears) + len(scales) == 75, len(lora)
    ranks = sorted({lora[f"{n}.lora_A.weight"].shape[0] for n, _, _ in linears})
    lora_diff, n_wrapped = diffusers_with_lora(dev_sd, lora, LORA_SCALE)
    lora_bfl = bfl_with_lora(dev_sd, lora, LORA_SCALE)
    final, v0 = ctx.denoise(ctx.diff_fn(lora_diff), img_cond=control)
    final_b, v0_b = ctx.denoise(ctx.bfl_fn(lora_bfl), img_cond=control)
    check_close("lora velocity0 diffusers+our unmerged wrapper vs bfl_math+wrapper", v0_b, v0, 1e-4)
    check_close("lora final diffusers+wrapper vs bfl_math+wrapper", final_b, final, 2e-4)
    merged = diffusers_flow(merged_bfl_sd(dev_sd, lora, LORA_SCALE), 128)
    final_m, v0_m = ctx.denoise(ctx.diff_fn(merged), img_cond=control)
    check_close("lora velocity0 unmerged vs merged weights (diffusers)", v0_m, v0, 1e-4)
    check_close("lora final unmerged vs merged weights (diffusers)", final_m, final, 2e-4)
    # the LoRA must matter: base = padded dev with its own norm scales and no LoRA
    base_bfl = bfl_flow(padded_base(dev_sd), 128)
    _, v0_base = ctx.denoise(ctx.bfl_fn(base_bfl), img_cond=control)
    print(f"  LoRA effect on velocity0: max|lora - base| = {maxdiff(v0, v0_base):.3f} "
          f"(max|velocity0| {v0.abs().max():.3f}, std of the difference {(v0 - v0_base).std():.3f})")
    zero_ctl, _ = ctx.denoise(ctx.diff_fn(lora_diff), img_cond=torch.zeros_like(control))
    print(f"  conditioning effect: max|final(control) - final(zero control)| = {maxdiff(final, zero_ctl):.3f}")
    if have_peft:
        def diffusers_lora_run(state_dict):
            pipe = pipe_from(FluxControlPipeline, diffusers_flow(dev_sd, 64))
            pipe.load_lora_weights(state_dict)
            assert pipe.transformer.config.in_channels == 128
            with torch.no_grad():
                return pipe(control_image=control, prompt_embeds=ctx.txt, pooled_prompt_embeds=ctx.vec,
                            latents=ctx.packed_noise.clone(), num_inference_steps=ctx.steps,
                            guidance_scale=ctx.guidance, height=ctx.height, width=ctx.width, output_type="latent",
                            joint_attention_kwargs={"scale": LORA_SCALE}, return_dict=False)[0]

        conv = diffusers_lora_state_dict(lora)
        d_asis = maxdiff(diffusers_lora_run(dict(conv)), final)
        print(f"  diffusers load_lora_weights as is: max|diff| = {d_asis:.3e} (its converter also applies "
              f"swap_scale_shift to final_layer.adaLN_modulation.1.lora_A, whose rows are rank components)")
        k = "transformer.norm_out.linear.lora_A.weight"
        conv[k] = torch.cat(conv[k].chunk(2, 0)[::-1], 0)  # undo that swap: only B and its bias are (shift, scale)
        out = diffusers_lora_run(conv)
        d = maxdiff(out, final)
        check_close("lora final ours vs diffusers load_lora_weights + FluxControlPipeline (lora_A swap undone)",
                    out, final, 2e-3)
        print(f"  (peft {peft.__version__}: agrees to {d:.1e} once the lora_A swap is undone, {d_asis:.2f} as is)")
    else:
        print("  diffusers LoRA path: skipped (peft not installed)")
    params = ctx.common_json()
    params.update({
        "base_model": "tiny-bfl/flux1-tiny-dev.safetensors", "lora": "tiny-bfl/flux1-tiny-canny-dev-lora.safetensors",
        "lora_scale": LORA_SCALE, "lora_rank": LORA_RANK, "lora_ranks_present": ranks,
        "lora_rank_rule": "r = min(rank, in, out): 20 everywhere, 16 for vector_in.in_layer (in 16)",
        "lora_keys": len(lora), "lora_layers": len(linears), "lora_norm_scales": scales,
        "lora_rule": "base img_in.weight [64,64] zero-padded to [64,128] (bias unchanged); the file's QK-norm "
                     "scales replace the base's; every Linear: base(x) + scale*(B(A(x)) + lora_B.bias) "
                     "(the bias is scaled with B); unmerged",
        "in_channels": 128, **control_json,
        "velocity0": "the model's output on the first step's input: cat([packed_noise, control_latent], -1), "
                     "t = timesteps[0] = 1.0, guidance 3.5",
        "cross_checks": "bfl_math with the same unmerged wrapper (~1e-6); merged weights W + s*B@A, b + s*b_B "
                        "(~3e-6); diffusers load_lora_weights + FluxControlPipeline when peft is installed (~1e-5 "
                        "once its swap of norm_out.linear.lora_A is undone, see README)",
        "guidance_note": "e2e_dev's 3.5, not the canny/depth CLI defaults 30/10",
    })
    stats_and_save("control_lora_dev", {"control_latent": control, "velocity0": v0, "final_packed": final,
                                        "final_latents": bfl_math.unpack(final, ctx.height, ctx.width)}, params)

    # ------------------------------------------------------------------ Kontext
    print("kontext")
    kpath = os.path.join(FIX, "kontext_image.png")
    KW, KH = 64, 80
    make_kontext_image(kpath, KW, KH)
    ku8 = load_u8(kpath)
    assert ku8.shape == (KH, KW, 3)
    kz = ae_encode(to_pm1(ku8))
    assert kz.shape == (1, 16, KH // 8, KW // 8)
    cond_f32 = bfl_math.pack(kz)
    cond_seq = bf16r(cond_f32)
    kh16, kw16 = math.ceil(KH / 16), math.ceil(KW / 16)
    cond_ids = bfl_math.img_ids_grid(kh16, kw16)
    cond_ids[..., 0] = 1.0
    dev_diff, dev_bfl = diffusers_flow(dev_sd, 64), bfl_flow(dev_sd, 64)
    final, v0 = ctx.denoise(ctx.diff_fn(dev_diff), cond_seq=cond_seq, cond_ids=cond_ids)
    final_b, v0_b = ctx.denoise(ctx.bfl_fn(dev_bfl), cond_seq=cond_seq, cond_ids=cond_ids)
    check_close("kontext velocity0 diffusers vs bfl_math", v0_b, v0, 1e-4)
    check_close("kontext final diffusers vs bfl_math", final_b, final, 2e-4)
    t2i = ctx.e2e["final_packed"]
    print(f"  conditioning effect: max|final(kontext) - e2e_dev final| = {maxdiff(final, t2i):.3f}")
    ids0 = cond_ids.clone()
    ids0[..., 0] = 0.0
    final0, _ = ctx.denoise(ctx.diff_fn(dev_diff), cond_seq=cond_seq, cond_ids=ids0)
    print(f"  id convention effect: max|final(ids (1,r,c)) - final(ids (0,r,c))| = {maxdiff(final, final0):.3f}")
    from diffusers import FluxKontextPipeline

    pipe = pipe_from(FluxKontextPipeline, dev_diff)
    with torch.no_grad():
        out = pipe(image=bfl_math.unpack(cond_seq, KH, KW), prompt_embeds=ctx.txt, pooled_prompt_embeds=ctx.vec,
                   latents=ctx.packed_noise.clone(), num_inference_steps=ctx.steps, guidance_scale=ctx.guidance,
                   height=ctx.height, width=ctx.width, max_area=ctx.height * ctx.width, output_type="latent",
                   return_dict=False)[0]
    check_close("kontext final ours vs diffusers FluxKontextPipeline (image = our bf16 cond latent)", out, final, 2e-3)
    del pipe
    params = ctx.common_json()
    params.update({
        "model": "tiny-bfl/flux1-tiny-dev.safetensors (Kontext is architecturally dev)", "in_channels": 64,
        "kontext_image": "kontext_image.png", "cond_size": [KW, KH], "cond_latent_hw": [KH // 8, KW // 8],
        "cond_tokens": kh16 * kw16, "cond_grid_hw": [kh16, kw16],
        "prepare_kontext": "cond = u8/127.5 - 1 (used as is: no resolution snapping, no resize) -> ae.encode "
                           "(posterior mean, scaled, f32) -> pack = cond_seq_f32 -> bf16 = cond_seq [1,20,64]; "
                           "cond_ids (1, r, c), r < 5, c < 4, row-major",
        "model_input": "sequence [img (24) ; cond_seq (20)] with ids [img_ids ; cond_ids], 64 channels; "
                       "pred[:, :24]; schedule L = 24 (target tokens only)",
        "guidance_note": "e2e_dev's 3.5 and 3 steps (the kontext CLI defaults are 2.5 and 30)",
    })
    stats_and_save("kontext_dev", {"cond_seq": cond_seq, "cond_seq_f32": cond_f32, "cond_ids": cond_ids,
                                   "velocity0": v0, "final_packed": final,
                                   "final_latents": bfl_math.unpack(final, ctx.height, ctx.width)}, params)

    total = 0
    for p in written:
        total += os.path.getsize(p)
        print(f"{os.path.relpath(p, ROOT)}: {os.path.getsize(p)} bytes")
    print(f"total: {total} bytes")


if __name__ == "__main__":
    main()
