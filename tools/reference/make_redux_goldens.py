#!/usr/bin/env python3
"""Tiny FLUX.1 Redux fixtures (SigLIP vision tower, image processor config, Redux projector) and
their goldens (docs/flux.md §3 prepare_redux / denoise), all float32 unless stated.

Run after make_fixtures.py (it reads tiny-bfl/, tiny-diffusers/ and golden/e2e_dev.*):
    tools/reference/.venv/bin/python tools/reference/make_redux_goldens.py
Deterministic (fixed seeds, one thread): two runs give byte-identical files.

The reference's Redux encoder takes a PIL RGB image, runs SiglipImageProcessor.preprocess(images=[img],
do_resize=True, return_tensors="pt", do_convert_rgb=True) (resize to the processor size with BICUBIC,
x/255, (x - 0.5)/0.5), SiglipVisionModel(...).last_hidden_state [1, N, D], then
redux_down(silu(redux_up(h))) -> [1, N, txt_dim]. prepare_redux rounds those tokens to bf16 and
appends them to the T5 sequence: txt = cat([t5_txt, tokens], 1), txt_ids all zeros, vec unchanged.
The rest is text-to-image.

Writes
  tests/fixtures/redux/image_encoder/{config.json, model.safetensors}
      SiglipVisionModel (transformers SiglipVisionConfig: hidden 32, intermediate 48, 2 layers,
      4 heads, image 56, patch 14 -> 16 patches, gelu_pytorch_tanh, eps 1e-6, vision_use_head
      true), f32, every value bf16-exact, seed 1600. config.json is save_pretrained's; the
      weights are written with `vision_model.` key names as the real (transformers 4.x) repos
      hold them (transformers 5 saves this class without the wrapper, i.e. bare keys; it loads
      both). The file includes vision_model.head.* (attention-pooling head), which Redux
      does not use.
  tests/fixtures/redux/feature_extractor/preprocessor_config.json
      SiglipImageProcessor.save_pretrained: size 56x56, resample 3 (bicubic), rescale 1/255,
      mean = std = [0.5]*3, do_convert_rgb.
  tests/fixtures/redux/flux1-tiny-redux.safetensors
      redux_up.{weight [96,32], bias [96]}, redux_down.{weight [32,96], bias [32]}, bf16, seed 1700
      (txt_dim 32 = the tiny T5 width).
  tests/fixtures/redux_a.png   80x60 (WxH) RGB, downscaled to 56x56 by the processor.
  tests/fixtures/redux_b.png   36x44 (WxH) RGB, upscaled to 56x56 (both change aspect).
  tests/fixtures/golden/redux_dev.{safetensors,json}
      pixels_{a,b} [1,3,56,56]      transformers' PIL backend SiglipImageProcessorPil (what
                                    transformers 4.x's SiglipImageProcessor did) from the saved
                                    feature_extractor folder.
      (transformers 5's default SiglipImageProcessor, the torchvision backend, is compared in
       the json only: it differs by up to one level in a few values.)
      hidden_{a,b} [1,16,32]        SiglipVisionModel.from_pretrained(image_encoder).last_hidden_state
                                    on the PIL pixels.
      tokens_{a,b} [1,16,32]        redux_down(silu(redux_up(hidden))) in f32 with the bf16 file's weights.
      txt [1,32,32]                 cat([e2e_dev txt, bf16(tokens_a)], 1).
      final_latents [1,16,8,12]     e2e_dev's f32 Euler loop (noise seed 42, 96x64, 3 steps,
                                    guidance 3.5, shifted schedule L = 24) on the tiny dev flow with
                                    txt above, txt_ids zeros [1,32,3], vec = e2e_dev vec.
      final_latents_mix [1,16,8,12] the same with txt = cat([t5 txt, bf16(tokens_a) * 1.0,
                                    bf16(tokens_b) * 0.5], 1) (48 tokens): two images, the second
                                    at strength 0.5 (strength multiplies that image's rounded tokens).

Cross-checks: the processor against our own PIL resize + rescale + normalize; the SigLIP
output against our own float64 implementation (patchify, + position embedding, two pre-norm
layers with tanh-GELU MLP, post_layernorm) and against transformers' eager attention; the tokens
against diffusers' ReduxImageEncoder and FluxPriorReduxPipeline; the denoise against bfl_math and
diffusers' FluxPipeline given the concatenated prompt_embeds.
"""

import copy
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bfl_math  # noqa: E402
from make_cond_goldens import (  # noqa: E402
    BFL_DIR, DIFF_DIR, FIX, GOLD, ROOT, Ctx, bfl_flow, diffusers_flow, pipe_from,
)
from make_fixtures import (  # noqa: E402  (also sets one thread + deterministic algorithms)
    bf16r, check_close, ensure, gen_for, maxdiff, randn, save_st, write_json,
)

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import FluxPipeline  # noqa: E402
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder  # noqa: E402
from transformers import (  # noqa: E402
    SiglipImageProcessor, SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel,
)

REDUX_DIR = os.path.join(FIX, "redux")
ENC_DIR = os.path.join(REDUX_DIR, "image_encoder")
FE_DIR = os.path.join(REDUX_DIR, "feature_extractor")
REDUX_FILE = os.path.join(REDUX_DIR, "flux1-tiny-redux.safetensors")

SEED_SIGLIP = 1600
SEED_REDUX = 1700
SEED_IMAGES = 1800

SIGLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_channels=3,
              image_size=56, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
TXT_DIM = 32  # the tiny T5's d_model = e2e_dev's txt width
IMAGES = {"a": (80, 60), "b": (36, 44)}  # (W, H)
STRENGTH_B = 0.5

written = []


# ---------------------------------------------------------------------------- SigLIP tower
def init_siglip():
    """SiglipVisionModel with every parameter set from its own generator (keyed by the saved name)."""
    model = SiglipVisionModel(SiglipVisionConfig(**SIGLIP))
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = f"vision_model.{name}"
            g = gen_for(key, SEED_SIGLIP)
            leaf = name.rsplit(".", 1)[-1]
            if "layer_norm" in name or "layernorm" in name:
                v = (1.0 + 0.25 * randn(p.shape, g)) if leaf == "weight" else 0.1 * randn(p.shape, g)
            elif name == "embeddings.position_embedding.weight" or name == "head.probe":
                v = 0.5 * randn(p.shape, g)
            elif leaf in ("bias", "in_proj_bias"):
                v = 0.1 * randn(p.shape, g)
            elif leaf in ("weight", "in_proj_weight"):
                fan_in = p[0].numel()  # Linear: in; Conv2d: in * kh * kw
                v = randn(p.shape, g) / math.sqrt(fan_in)
            else:
                raise SystemExit(f"unexpected SigLIP parameter {name}")
            p.copy_(bf16r(v))
    return model.float().eval()


def save_siglip(model):
    """save_pretrained (config.json), then the weights with `vision_model.` names, f32."""
    ensure(ENC_DIR)
    model.save_pretrained(ENC_DIR, safe_serialization=True)
    files = sorted(os.listdir(ENC_DIR))
    assert files == ["config.json", "model.safetensors"], files
    with safe_open(os.path.join(ENC_DIR, "model.safetensors"), "pt") as f:
        native = sorted(f.keys())
    sd = {f"vision_model.{k}": v.detach().float() for k, v in model.state_dict().items()
          if not k.endswith("position_ids")}
    save_st(os.path.join(ENC_DIR, "model.safetensors"), sd)
    written.extend([os.path.join(ENC_DIR, "config.json"), os.path.join(ENC_DIR, "model.safetensors")])
    return native, sorted(sd)


def expected_siglip_keys():
    keys = ["vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.patch_embedding.bias",
            "vision_model.embeddings.position_embedding.weight",
            "vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"]
    for i in range(SIGLIP["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        for n in ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
            keys += [p + n + ".weight", p + n + ".bias"]
    return keys


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def own_siglip(sd, pixels):
    """Our own SigLIP vision forward in float64 from the saved file's tensors (no transformers code)."""
    sd = {k[len("vision_model."):]: v.double() for k, v in sd.items()}
    ps, d = SIGLIP["patch_size"], SIGLIP["hidden_size"]
    nh, eps = SIGLIP["num_attention_heads"], SIGLIP["layer_norm_eps"]
    x = pixels.double()
    b, c, hh, ww = x.shape
    gh, gw = hh // ps, ww // ps
    # patchify row-major over the (gh, gw) grid; each patch flattened as (c, kh, kw) like the conv weight
    patches = x.reshape(b, c, gh, ps, gw, ps).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ps * ps)
    w = sd["embeddings.patch_embedding.weight"].reshape(d, -1)
    h = patches @ w.T + sd["embeddings.patch_embedding.bias"] + sd["embeddings.position_embedding.weight"][None]
    hd = d // nh
    for i in range(SIGLIP["num_hidden_layers"]):
        p = f"encoder.layers.{i}."

        def lin(t, n):
            return t @ sd[p + n + ".weight"].T + sd[p + n + ".bias"]

        y = layer_norm(h, sd[p + "layer_norm1.weight"], sd[p + "layer_norm1.bias"], eps)
        q, k, v = (lin(y, f"self_attn.{n}_proj").reshape(b, -1, nh, hd).transpose(1, 2) for n in "qkv")
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        h = h + lin((att @ v).transpose(1, 2).reshape(b, -1, d), "self_attn.out_proj")
        y = layer_norm(h, sd[p + "layer_norm2.weight"], sd[p + "layer_norm2.bias"], eps)
        h = h + lin(gelu_tanh(lin(y, "mlp.fc1")), "mlp.fc2")
    return layer_norm(h, sd["post_layernorm.weight"], sd["post_layernorm.bias"], eps)


# ---------------------------------------------------------------------------- processor, projector, images
def make_processor():
    ensure(FE_DIR)
    proc = SiglipImageProcessor(size={"height": SIGLIP["image_size"], "width": SIGLIP["image_size"]}, resample=3,
                                rescale_factor=1 / 255, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                do_convert_rgb=True, do_resize=True, do_rescale=True, do_normalize=True)
    proc.save_pretrained(FE_DIR)
    files = sorted(os.listdir(FE_DIR))
    assert files == ["preprocessor_config.json"], files
    written.append(os.path.join(FE_DIR, "preprocessor_config.json"))


def preprocess(proc, img):
    """The reference's call."""
    out = proc.preprocess(images=[img], do_resize=True, return_tensors="pt", do_convert_rgb=True)
    return out["pixel_values"].float()


def own_pixels(img):
    """PIL resize (BICUBIC, no reducing_gap) -> u8 -> x/255 in float64 -> f32 -> (x - 0.5)/0.5 in f32."""
    s = SIGLIP["image_size"]
    u8 = np.asarray(img.convert("RGB").resize((s, s), Image.BICUBIC))
    x = (u8.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous(), u8


def make_redux():
    dims = {"redux_up": (SIGLIP["hidden_size"], 3 * TXT_DIM), "redux_down": (3 * TXT_DIM, TXT_DIM)}
    sd = {}
    for name, (fin, fout) in dims.items():
        sd[f"{name}.weight"] = bf16r(randn([fout, fin], gen_for(f"{name}.weight", SEED_REDUX)) / math.sqrt(fin))
        sd[f"{name}.bias"] = bf16r(0.1 * randn([fout], gen_for(f"{name}.bias", SEED_REDUX)))
    ensure(REDUX_DIR)
    save_st(REDUX_FILE, {k: v.to(torch.bfloat16) for k, v in sd.items()})
    written.append(REDUX_FILE)
    back = {k: v.float() for k, v in load_file(REDUX_FILE).items()}
    assert all(torch.equal(back[k], sd[k]) for k in sd), "not bf16-exact"
    return back


def project(sd, hidden):
    """redux_down(silu(redux_up(h))), f32."""
    return F.linear(F.silu(F.linear(hidden, sd["redux_up.weight"], sd["redux_up.bias"])),
                    sd["redux_down.weight"], sd["redux_down.bias"])


def make_image(path, w, h, tag):
    """A smooth colour pattern (ramps, a tilted sine, a soft blob) plus seeded noise, RGB u8."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = xx / (w - 1), yy / (h - 1)
    blob = np.exp(-(((u - 0.35) / 0.22) ** 2 + ((v - 0.6) / 0.3) ** 2))
    r = 40.0 + 170.0 * u + 40.0 * blob
    g = 128.0 + 90.0 * np.sin(2 * math.pi * (1.3 * u + 0.7 * v)) - 60.0 * blob
    b = 220.0 - 150.0 * v + 30.0 * np.cos(2 * math.pi * 2.0 * u)
    noise = randn([h, w, 3], gen_for(f"redux_{tag}", SEED_IMAGES)).double().numpy()
    rgb = np.stack([r, g, b], -1) + 12.0 * noise
    Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB").save(path, optimize=True)
    written.append(path)


# ---------------------------------------------------------------------------- main
def main():
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, diffusers {diffusers.__version__}")
    assert torch.__version__.startswith("2.6.0")
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    ctx = Ctx()
    assert ctx.txt.shape == (1, 16, TXT_DIM)
    report = {}

    # ------------------------------------------------------------------ fixtures
    print("siglip")
    mem = init_siglip()
    native_keys, keys = save_siglip(mem)
    assert len(native_keys) == len(keys) and all(k.startswith("vision_model.") for k in keys)
    extra = sorted(set(keys) - set(expected_siglip_keys()))
    assert set(expected_siglip_keys()) <= set(keys), set(expected_siglip_keys()) - set(keys)
    assert all(k.startswith("vision_model.head.") for k in extra), extra
    print(f"  {len(keys)} tensors; besides the encoder: {extra}")
    print(f"  (save_pretrained alone writes bare names, e.g. {native_keys[0]}; position_ids is a "
          f"non-persistent buffer and is not saved)")
    enc, info = SiglipVisionModel.from_pretrained(ENC_DIR, dtype=torch.float32, output_loading_info=True)
    enc.eval()
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), mem.state_dict().values()))
    attn_impl = enc.config._attn_implementation
    print(f"  reloaded from vision_model.* names: no missing/unexpected keys; attention implementation {attn_impl!r}")
    make_processor()
    redux_sd = make_redux()

    pil_proc = SiglipImageProcessorPil.from_pretrained(FE_DIR)
    tv_proc = SiglipImageProcessor.from_pretrained(FE_DIR)
    assert pil_proc.backend == "pil" and tv_proc.backend == "torchvision", (pil_proc.backend, tv_proc.backend)
    enc_eager = SiglipVisionModel.from_pretrained(ENC_DIR, dtype=torch.float32, attn_implementation="eager").eval()
    file_sd = load_file(os.path.join(ENC_DIR, "model.safetensors"))
    diff_redux = ReduxImageEncoder(redux_dim=SIGLIP["hidden_size"], txt_in_features=TXT_DIM)
    diff_redux.load_state_dict(redux_sd, strict=True)
    diff_redux = diff_redux.float().eval()

    # ------------------------------------------------------------------ per image
    tensors, imgs = {}, {}
    for tag, (w, h) in IMAGES.items():
        print(f"image {tag} ({w}x{h})")
        path = os.path.join(FIX, f"redux_{tag}.png")
        make_image(path, w, h, tag)
        img = Image.open(path).convert("RGB")
        assert img.size == (w, h)
        imgs[tag] = img
        px = preprocess(pil_proc, img)
        px_tv = preprocess(tv_proc, img)
        assert px.shape == (1, 3, 56, 56) and px.dtype == torch.float32
        own, u8 = own_pixels(img)
        check_close(f"pixels_{tag} SiglipImageProcessorPil vs own PIL resize + rescale + normalize", px, own, 0.0)
        simple = torch.from_numpy(u8.astype(np.float32) / np.float32(127.5) - 1).permute(2, 0, 1)[None]
        d_simple = maxdiff(px, simple)
        d_tv = maxdiff(px, px_tv) * 127.5
        n_tv = int(((px - px_tv).abs() * 127.5 > 0.5).sum())
        print(f"  pixels PIL vs torchvision backend: max {d_tv:.3f} levels of 1/127.5, {n_tv} of {px.numel()} "
              f"values differ by a level or more; PIL vs u8/127.5 - 1: {d_simple:.1e}")
        with torch.no_grad():
            hid = enc(pixel_values=px).last_hidden_state
            hid_eager = enc_eager(pixel_values=px).last_hidden_state
            hid_tv = enc(pixel_values=px_tv).last_hidden_state
        assert hid.shape == (1, 16, SIGLIP["hidden_size"])
        check_close(f"hidden_{tag} transformers vs own float64 SigLIP", own_siglip(file_sd, px), hid, 1e-4)
        d_own = maxdiff(own_siglip(file_sd, px), hid)
        check_close(f"hidden_{tag} {attn_impl} vs eager attention", hid_eager, hid, 1e-5)
        tok = project(redux_sd, hid)
        with torch.no_grad():
            tok_diff = diff_redux(hid).image_embeds
        check_close(f"tokens_{tag} ours vs diffusers ReduxImageEncoder", tok_diff, tok, 1e-5)
        tok_tv = project(redux_sd, hid_tv)
        print(f"  torchvision pixels move hidden by {maxdiff(hid_tv, hid):.2e} and tokens by "
              f"{maxdiff(tok_tv, tok):.2e} "
              f"(max|tokens| {tok.abs().max():.3f}, bf16 rounding moves them by {maxdiff(bf16r(tok), tok):.2e})")
        tensors.update({f"pixels_{tag}": px, f"hidden_{tag}": hid, f"tokens_{tag}": tok})
        report[tag] = {
            "size_wh": [w, h], "pixels_pil_vs_own_pil_numpy": maxdiff(px, own),
            "pixels_pil_vs_u8_over_127_5_minus_1": d_simple,
            "pixels_pil_vs_torchvision_max_levels": d_tv, "pixels_pil_vs_torchvision_values_differing": n_tv,
            "hidden_transformers_vs_own_float64": d_own,
            f"hidden_{attn_impl}_vs_eager": maxdiff(hid_eager, hid),
            "tokens_ours_vs_diffusers_ReduxImageEncoder": maxdiff(tok_diff, tok),
            "hidden_from_torchvision_pixels_vs_pil": maxdiff(hid_tv, hid),
            "tokens_from_torchvision_pixels_vs_pil": maxdiff(tok_tv, tok),
            "tokens_bf16_rounding": maxdiff(bf16r(tok), tok),
            "_tokens_tv": tok_tv,
        }

    # diffusers' FluxPriorReduxPipeline, given e2e_dev's embeddings (it then skips the text encoders),
    # on the PIL image: transformers 5 gives it the torchvision processor.
    from diffusers import FluxPriorReduxPipeline
    from transformers import CLIPTextModel

    prior = FluxPriorReduxPipeline(image_encoder=enc, feature_extractor=tv_proc, image_embedder=diff_redux,
                                   text_encoder=CLIPTextModel.from_pretrained(os.path.join(DIFF_DIR, "text_encoder"),
                                                                              dtype=torch.float32).eval())
    prior.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pe, ppe = prior(image=imgs["a"], prompt_embeds=ctx.txt, pooled_prompt_embeds=ctx.vec, return_dict=False)
    assert pe.shape == (1, 32, TXT_DIM) and torch.equal(pe[:, :16], ctx.txt) and torch.equal(ppe, ctx.vec)
    check_close("FluxPriorReduxPipeline image tokens vs ours on torchvision pixels", pe[:, 16:],
                report["a"]["_tokens_tv"], 1e-5)
    report["a"]["prior_pipeline_tokens_vs_ours_torchvision_pixels"] = maxdiff(pe[:, 16:], report["a"]["_tokens_tv"])
    report["a"]["prior_pipeline_tokens_vs_golden_tokens"] = maxdiff(pe[:, 16:], tensors["tokens_a"])
    del prior
    for r in report.values():
        r.pop("_tokens_tv")

    # ------------------------------------------------------------------ denoise
    dev_sd = {k: v.float() for k, v in load_file(os.path.join(BFL_DIR, "flux1-tiny-dev.safetensors")).items()}
    dev_diff, dev_bfl = diffusers_flow(dev_sd, 64), bfl_flow(dev_sd, 64)

    def with_txt(txt):
        c = copy.copy(ctx)
        c.txt, c.txt_ids = txt, torch.zeros(1, txt.shape[1], 3)
        return c

    finals = {}
    cases = {
        "final_latents": torch.cat([ctx.txt, bf16r(tensors["tokens_a"])], dim=1),
        "final_latents_mix": torch.cat([ctx.txt, bf16r(tensors["tokens_a"]) * 1.0,
                                        bf16r(tensors["tokens_b"]) * STRENGTH_B], dim=1),
    }
    for name, txt in cases.items():
        print(name)
        c = with_txt(txt)
        final, _ = c.denoise(c.diff_fn(dev_diff))
        final_b, _ = c.denoise(c.bfl_fn(dev_bfl))
        check_close(f"{name} diffusers vs bfl_math", final_b, final, 2e-4)
        pipe = pipe_from(FluxPipeline, dev_diff)
        with torch.no_grad():
            out = pipe(prompt_embeds=txt, pooled_prompt_embeds=ctx.vec, latents=ctx.packed_noise.clone(),
                       num_inference_steps=ctx.steps, guidance_scale=ctx.guidance, height=ctx.height,
                       width=ctx.width, output_type="latent", return_dict=False)[0]
        del pipe
        check_close(f"{name} ours vs diffusers FluxPipeline (prompt_embeds = our txt)", out, final, 2e-3)
        report[name] = {"txt_tokens": txt.shape[1], "diffusers_vs_bfl_math": maxdiff(final_b, final),
                        "ours_vs_diffusers_FluxPipeline": maxdiff(out, final),
                        "effect_vs_e2e_dev_final": maxdiff(final, ctx.e2e["final_packed"])}
        print(f"  effect: max|final - e2e_dev final (no image tokens)| = {report[name]['effect_vs_e2e_dev_final']:.3f}")
        finals[name] = final
        tensors[name] = bfl_math.unpack(final, ctx.height, ctx.width)
    mix_effect = maxdiff(finals["final_latents_mix"], finals["final_latents"])
    report["final_latents_mix"]["effect_vs_single_image"] = mix_effect
    print(f"  second image effect: max|mix - single| = {report['final_latents_mix']['effect_vs_single_image']:.3f}")
    tensors["txt"] = cases["final_latents"]

    # ------------------------------------------------------------------ golden
    params = ctx.common_json()
    params.update({
        "model": "tiny-bfl/flux1-tiny-dev.safetensors", "in_channels": 64,
        "image_encoder": "redux/image_encoder (SiglipVisionModel, f32)",
        "image_encoder_config": SIGLIP, "image_encoder_keys": keys,
        "image_encoder_keys_unused": extra,
        "image_encoder_attn_implementation": attn_impl,
        "feature_extractor": "redux/feature_extractor/preprocessor_config.json",
        "redux": "redux/flux1-tiny-redux.safetensors (bf16)",
        "redux_keys": {k: list(v.shape) for k, v in sorted(redux_sd.items())},
        "images": {f"redux_{t}.png": list(wh) for t, wh in IMAGES.items()},
        "preprocess": "SiglipImageProcessorPil.preprocess(images=[rgb], do_resize=True, return_tensors='pt', "
                      "do_convert_rgb=True): PIL resize to 56x56 BICUBIC (u8) -> x/255 (float64, then f32) -> "
                      "(x - 0.5)/0.5 (f32)",
        "hidden": "SiglipVisionModel.last_hidden_state (post_layernorm applied; the head is not used)",
        "tokens": "redux_down(silu(redux_up(hidden))), f32 with the bf16 weights",
        "prepare_redux": "txt = cat([t5 txt [1,16,32], bf16(tokens) * strength, ...], 1); txt_ids zeros; vec unchanged",
        "final_latents": "txt = cat([txt, bf16(tokens_a)], 1) (32 tokens) = the saved `txt`",
        "final_latents_mix": f"txt = cat([txt, bf16(tokens_a) * 1.0, bf16(tokens_b) * {STRENGTH_B}], 1) (48 tokens)",
        "strength_rule": "strength multiplies that image's bf16-rounded tokens only (the T5 tokens are unscaled); "
                         "several images are concatenated in order",
        "diffusers_differences": "FluxPriorReduxPipeline does not round the tokens to bf16; its prompt_embeds_scale "
                                 "multiplies the whole cat([t5, tokens]) of an image, and several images are summed "
                                 "with those weights (same length), not concatenated",
        "shapes": {k: list(v.shape) for k, v in sorted(tensors.items())},
        "measured": report,
        "transformers": transformers.__version__, "diffusers": diffusers.__version__,
    })
    path = os.path.join(GOLD, "redux_dev.safetensors")
    save_st(path, tensors)
    write_json(os.path.join(GOLD, "redux_dev.json"), params)
    written.extend([path, os.path.join(GOLD, "redux_dev.json")])
    for k, v in sorted(tensors.items()):
        print(f"    redux_dev.{k:<20} {str(list(v.shape)):<16} max|v| {v.abs().max().item():8.4f}  "
              f"std {v.std().item():.4f}")

    total = 0
    for p in written:
        total += os.path.getsize(p)
        print(f"{os.path.relpath(p, ROOT)}: {os.path.getsize(p)} bytes")
    print(f"total: {total} bytes")


if __name__ == "__main__":
    main()
