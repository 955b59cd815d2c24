#!/usr/bin/env python3
"""Build fluxfit's tiny checkpoints and the golden outputs the Rust tests compare against.

Run (after make_tokenizers.py, whose tokenizer files this script reads):
    tools/reference/.venv/bin/python tools/reference/make_fixtures.py

Everything is deterministic (fixed seeds, one CPU thread): two runs give byte-identical files.
The golden math is done in float32 with diffusers / transformers modules as the reference
implementation; bfl_math.py (written from docs/flux.md) cross-checks it on the BFL-layout files.
See README.md for the list of files.
"""

import contextlib
import json
import math
import os
import shutil
import sys
import zlib

import torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bfl_math  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "tests", "fixtures")
BFL_DIR = os.path.join(FIX, "tiny-bfl")
DIFF_DIR = os.path.join(FIX, "tiny-diffusers")
GOLD = os.path.join(FIX, "golden")

# ---------------------------------------------------------------------------- tiny configs
CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
FLOW = dict(in_channels=64, vec_in_dim=CLIP["hidden_size"], context_in_dim=32, hidden_size=64,
            mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(4, 14, 14),
            theta=10000, qkv_bias=True)
AE = dict(ch=32, ch_mult=(1, 1, 1, 2), num_res_blocks=1, z_channels=16,
          scale_factor=0.3611, shift_factor=0.1159)
T5_MAXLEN_E2E = 16

SEED_FLOW_DEV = 1000
SEED_FLOW_SCHNELL = 2000
SEED_AE = 3000
SEED_CLIP = 4000
SEED_T5 = 5000
SEED_INPUTS = 6000


def bf16r(x):
    return x.to(torch.bfloat16).to(torch.float32)


def f16r(x):
    return x.to(torch.float16).to(torch.float32)


def gen_for(name, base):
    """Independent generator per parameter name, so init does not depend on module order."""
    return torch.Generator("cpu").manual_seed(base + zlib.crc32(name.encode("utf-8")))


def randn(shape, g):
    return torch.randn(shape, generator=g, dtype=torch.float32)


def ensure(path):
    os.makedirs(path, exist_ok=True)
    return path


def write_json(path, obj):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def save_st(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, path,
              metadata=metadata or {"format": "pt"})


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def check_close(what, a, b, tol):
    d = maxdiff(a, b)
    scale = b.float().abs().max().item()
    status = "ok" if d <= tol else "MISMATCH"
    print(f"  check {what}: max|diff| = {d:.3e} (max|ref| = {scale:.3f}) {status}")
    if d > tol:
        raise SystemExit(f"cross-check failed: {what}")


# ---------------------------------------------------------------------------- flow
def init_flow(guidance, seed):
    model = bfl_math.Flux(guidance_embed=guidance, **FLOW)
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = gen_for(name, seed)
            if name.endswith(".scale"):  # RMSNorm scales, distinct for q and k
                v = 1.0 + 0.25 * randn(p.shape, g)
            elif name.endswith(".bias"):
                # modulation biases larger so shift/scale/gate are clearly non-trivial
                std = 0.25 if ("_mod." in name or "modulation" in name) else 0.1
                v = std * randn(p.shape, g)
            else:
                fan_in = p.shape[1]
                v = randn(p.shape, g) / math.sqrt(fan_in)
            p.copy_(bf16r(v))
    return model.eval()


class diffusers_flux_inner_dim(contextlib.ContextDecorator):
    """diffusers' convert_flux_transformer_checkpoint_to_diffusers hard-codes inner_dim = 3072
    (mlp 12288) for splitting single_blocks.N.linear1 into q/k/v/mlp. For the tiny model we let
    that one torch.split use the tiny sizes; everything else in the converter runs unchanged."""

    def __init__(self, hidden):
        self.hidden = hidden

    def __enter__(self):
        self.orig = torch.split
        hidden, orig = self.hidden, self.orig

        def split(t, split_size_or_sections, dim=0):
            if isinstance(split_size_or_sections, (tuple, list)) and \
                    tuple(split_size_or_sections) == (3072, 3072, 3072, 12288):
                split_size_or_sections = (hidden, hidden, hidden, 4 * hidden)
            return orig(t, split_size_or_sections, dim)

        torch.split = split
        return self

    def __exit__(self, *exc):
        torch.split = self.orig
        return False


def diffusers_flux_from_bfl(sd_bfl, guidance):
    with diffusers_flux_inner_dim(FLOW["hidden_size"]):
        conv = convert_flux_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in sd_bfl.items()})
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, out_channels=None, num_layers=FLOW["depth"],
        num_single_layers=FLOW["depth_single_blocks"],
        attention_head_dim=FLOW["hidden_size"] // FLOW["num_heads"],
        num_attention_heads=FLOW["num_heads"], joint_attention_dim=FLOW["context_in_dim"],
        pooled_projection_dim=FLOW["vec_in_dim"], guidance_embeds=guidance,
        axes_dims_rope=list(FLOW["axes_dim"]),
    )
    model.load_state_dict(conv, strict=True)
    return model.float().eval(), conv


def run_diffusers_flow(model, img, img_ids, txt, txt_ids, t, y, guidance):
    with torch.no_grad():
        return model(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y,
                     timestep=t, img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=guidance,
                     return_dict=False)[0]


# ---------------------------------------------------------------------------- autoencoder
def init_ae(seed):
    model = bfl_math.AutoEncoder(**AE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = gen_for(name, seed)
            if "norm" in name and name.endswith(".weight"):
                v = 1.0 + 0.1 * randn(p.shape, g)
            elif name.endswith(".bias"):
                v = 0.05 * randn(p.shape, g)
            else:
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                v = randn(p.shape, g) / math.sqrt(fan_in)
            p.copy_(bf16r(v))
    return model.eval()


def diffusers_vae_config():
    n = len(AE["ch_mult"])
    return dict(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[AE["ch"] * m for m in AE["ch_mult"]],
        layers_per_block=AE["num_res_blocks"], act_fn="silu", latent_channels=AE["z_channels"],
        norm_num_groups=32, sample_size=1024, scaling_factor=AE["scale_factor"],
        shift_factor=AE["shift_factor"], latents_mean=None, latents_std=None, force_upcast=True,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    )


def diffusers_vae_from_bfl(sd_bfl):
    cfg = diffusers_vae_config()
    conv = convert_ldm_vae_checkpoint({k: v.clone() for k, v in sd_bfl.items()}, cfg)
    model = AutoencoderKL(**cfg)
    model.load_state_dict(conv, strict=True)
    return model.float().eval()


# ---------------------------------------------------------------------------- text encoders
def make_clip(seed):
    cfg = CLIPTextConfig(
        vocab_size=49408, **CLIP, max_position_embeddings=77, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        attention_dropout=0.0, dropout=0.0, initializer_factor=1.0, initializer_range=0.02,
    )
    model = CLIPTextModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = gen_for(name, seed)
            if "layer_norm" in name and name.endswith(".weight"):
                v = 1.0 + 0.1 * randn(p.shape, g)
            elif name.endswith(".bias"):
                v = 0.05 * randn(p.shape, g)
            elif "embedding" in name:
                v = 0.1 * randn(p.shape, g)
            else:
                v = randn(p.shape, g) / math.sqrt(p.shape[1])
            p.copy_(f16r(v))  # f16-exact (stored f16)
    return model.float().eval()


def make_t5(seed, vocab_size):
    cfg = T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, layer_norm_epsilon=1e-6, initializer_factor=1.0,
        feed_forward_proj="gated-gelu", is_encoder_decoder=True, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
    )
    cfg.architectures = ["T5EncoderModel"]
    model = T5EncoderModel(cfg)
    d_model, d_kv, nh, d_ff = 32, 8, 4, 64
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = gen_for(name, seed)
            if "layer_norm" in name:
                v = 1.0 + 0.2 * randn(p.shape, g)
            elif "relative_attention_bias" in name:
                v = 0.5 * randn(p.shape, g)
            elif name == "shared.weight":
                v = randn(p.shape, g)
            elif name.endswith(".q.weight"):
                v = randn(p.shape, g) * (d_model * d_kv) ** -0.5
            elif name.endswith((".k.weight", ".v.weight", "wi_0.weight", "wi_1.weight")):
                v = randn(p.shape, g) * d_model ** -0.5
            elif name.endswith(".o.weight"):
                v = randn(p.shape, g) * (nh * d_kv) ** -0.5
            elif name.endswith("wo.weight"):
                v = randn(p.shape, g) * d_ff ** -0.5
            else:
                raise SystemExit(f"unexpected T5 parameter {name}")
            p.copy_(bf16r(v))
    return model.float().eval()


def save_clip(model, out_dir):
    """Write the CLIP text encoder as the real openai / FLUX.1 repos hold it: keys `text_model.*`,
    f16. (transformers 5 keeps the module without the `text_model` wrapper and would save bare
    keys; on load it strips the prefix again.)"""
    ensure(out_dir)
    sd = {f"text_model.{k}": v.detach().to(torch.float16) for k, v in model.state_dict().items()
          if not k.endswith("position_ids")}
    save_st(os.path.join(out_dir, "model.safetensors"), sd)
    cfg = model.config.to_dict()
    cfg = {k: cfg[k] for k in (
        "attention_dropout", "bos_token_id", "dropout", "eos_token_id", "hidden_act", "hidden_size",
        "initializer_factor", "initializer_range", "intermediate_size", "layer_norm_eps",
        "max_position_embeddings", "model_type", "num_attention_heads", "num_hidden_layers",
        "pad_token_id", "projection_dim", "vocab_size")}
    cfg.update({"architectures": ["CLIPTextModel"], "torch_dtype": "float16",
                "transformers_version": transformers.__version__})
    write_json(os.path.join(out_dir, "config.json"), dict(sorted(cfg.items())))
    return CLIPTextModel.from_pretrained(out_dir, dtype=torch.float32).eval()


def save_t5(model, out_dir):
    """T5EncoderModel in bf16 via save_pretrained (keys shared.weight, encoder.block.N...), with the
    config fields of google/t5-v1_1-xxl (FLUX.1 text_encoder_2) restored where transformers 5
    rewrites them."""
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    model.float()
    path = os.path.join(out_dir, "config.json")
    cfg = json.load(open(path))
    cfg.update({"is_encoder_decoder": True, "tie_word_embeddings": False, "torch_dtype": "bfloat16"})
    write_json(path, dict(sorted(cfg.items())))
    return T5EncoderModel.from_pretrained(out_dir, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------- pipeline
def encode_t5(tok, model, prompts, max_length):
    ids = tok(prompts, padding="max_length", max_length=max_length, truncation=True,
              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=None).last_hidden_state
    return ids, out


def encode_clip(tok, model, prompts):
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True,
              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=None)
    return ids, out.last_hidden_state, out.pooler_output


def e2e(name, *, flow, flow_bfl, vae, vae_bfl, t5_tok, t5, clip_tok, clip, prompt, width, height,
        steps, guidance, seed, shift, t5_len):
    h16, w16 = math.ceil(height / 16), math.ceil(width / 16)
    noise = torch.randn([1, 16, 2 * h16, 2 * w16], dtype=torch.bfloat16,
                        generator=torch.Generator("cpu").manual_seed(seed)).float()
    t5_ids, txt = encode_t5(t5_tok, t5, [prompt], t5_len)
    clip_ids, _, vec = encode_clip(clip_tok, clip, [prompt])
    txt, vec = bf16r(txt), bf16r(vec)
    img = bfl_math.pack(noise)
    packed_noise = img.clone()
    img_ids = bfl_math.img_ids_grid(h16, w16)
    txt_ids = torch.zeros(1, txt.shape[1], 3)
    timesteps = bfl_math.get_schedule(steps, img.shape[1], shift=shift)
    g = torch.full((1,), guidance, dtype=torch.float32) if guidance is not None else None
    img_bfl = img.clone()
    for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:]):
        t_vec = torch.full((1,), t_curr, dtype=torch.float32)
        pred = run_diffusers_flow(flow, img, img_ids, txt, txt_ids, t_vec, vec, g)
        img = img + (t_prev - t_curr) * pred
        with torch.no_grad():
            pred_b = flow_bfl(img_bfl, img_ids, txt, txt_ids, t_vec, vec, g)
        img_bfl = img_bfl + (t_prev - t_curr) * pred_b
    check_close(f"{name}: final latents diffusers vs bfl_math", img_bfl, img, 2e-4)
    final_latents = bfl_math.unpack(img, height, width)
    with torch.no_grad():
        zin = final_latents / AE["scale_factor"] + AE["shift_factor"]
        decoded = vae.decode(zin, return_dict=False)[0]
        decoded_b = vae_bfl.decode(final_latents)
    check_close(f"{name}: decode diffusers vs bfl_math", decoded_b, decoded, 2e-4)
    x = decoded.clamp(-1, 1)[0].permute(1, 2, 0)
    pixels = (127.5 * (x + 1.0)).to(torch.uint8)
    tensors = {
        "noise": noise, "packed_noise": packed_noise, "txt": txt, "vec": vec,
        "timesteps": torch.tensor(timesteps, dtype=torch.float32), "img_ids": img_ids,
        "final_packed": img, "final_latents": final_latents, "decoded": decoded,
        "pixels_u8": pixels.contiguous(),
    }
    params = {
        "prompt": prompt, "width": width, "height": height, "num_steps": steps,
        "guidance": guidance, "seed": seed, "shift": shift, "t5_max_length": t5_len,
        "noise": "torch.randn([1,16,2*ceil(h/16),2*ceil(w/16)], dtype=bfloat16, "
                 "generator=torch.Generator('cpu').manual_seed(seed)).float()  (torch 2.6.0)",
        "ae_scale_factor": AE["scale_factor"], "ae_shift_factor": AE["shift_factor"],
        "timesteps": timesteps,
        "t5_ids": t5_ids[0].tolist(), "clip_ids": clip_ids[0].tolist(),
        "pixels_u8": "clamp(decoded,-1,1) -> (127.5*(x+1)) truncated to uint8, HWC, no watermark",
        "dtype": "float32 throughout; txt and vec rounded to bf16 and back",
    }
    return tensors, params


# ---------------------------------------------------------------------------- main
def main():
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    assert torch.__version__.startswith("2.6.0"), "torch 2.6.0 required (bf16 randn parity)"
    for d in (BFL_DIR, DIFF_DIR, GOLD):
        ensure(d)

    # ---- flow models (BFL layout, bf16 files)
    flows = {}
    for variant, guidance, seed in (("dev", True, SEED_FLOW_DEV), ("schnell", False, SEED_FLOW_SCHNELL)):
        m = init_flow(guidance, seed)
        sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
        n_expected = 16 + 24 * FLOW["depth"] + 8 * FLOW["depth_single_blocks"] + 4 - (0 if guidance else 4)
        assert len(sd) == n_expected, (len(sd), n_expected)
        # One flow model per folder (a folder with several is ambiguous): schnell lives apart.
        folder = BFL_DIR if variant == "dev" else os.path.join(FIX, "tiny-variants")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"flux1-tiny-{variant}.safetensors")
        save_st(path, {k: v.to(torch.bfloat16) for k, v in sd.items()})
        # reload from disk so everything downstream uses exactly the stored weights
        sd = {k: v.float() for k, v in load_file(path).items()}
        m.load_state_dict(sd, strict=True)
        dm, _ = diffusers_flux_from_bfl(sd, guidance)
        flows[variant] = (m, dm)
        print(f"wrote {path} ({len(sd)} tensors)")

    # ---- autoencoder (BFL/LDM layout, bf16 file)
    ae = init_ae(SEED_AE)
    ae_path = os.path.join(BFL_DIR, "ae.safetensors")
    ae_f32 = {k: v.detach().clone() for k, v in ae.state_dict().items()}
    save_st(ae_path, {k: v.to(torch.bfloat16) for k, v in ae_f32.items()})
    ae_sd = load_file(ae_path)
    assert all(v.dtype == torch.bfloat16 for v in ae_sd.values())
    # reload from disk so everything downstream uses exactly the stored weights (lossless:
    # init_ae already rounded every value to bf16)
    ae_sd = {k: v.float() for k, v in ae_sd.items()}
    assert all(torch.equal(ae_sd[k], ae_f32[k]) for k in ae_f32)
    ae.load_state_dict(ae_sd, strict=True)
    vae = diffusers_vae_from_bfl(ae_sd)
    print(f"wrote {ae_path} ({len(ae_sd)} tensors)")

    # ---- diffusers layout (dev transformer + vae), stored bf16
    write_json(os.path.join(DIFF_DIR, "model_index.json"), {
        "_class_name": "FluxPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    sched.save_pretrained(os.path.join(DIFF_DIR, "scheduler"))
    dev_diff = flows["dev"][1]
    dev_diff.to(torch.bfloat16).save_pretrained(os.path.join(DIFF_DIR, "transformer"), safe_serialization=True)
    dev_diff.float()
    vae.to(torch.bfloat16).save_pretrained(os.path.join(DIFF_DIR, "vae"), safe_serialization=True)
    vae.float()

    # reload the diffusers-layout copies (sanity: identical to the BFL-converted ones)
    dev_reloaded = FluxTransformer2DModel.from_pretrained(os.path.join(DIFF_DIR, "transformer"),
                                                          dtype=torch.float32).eval()
    vae_reloaded = AutoencoderKL.from_pretrained(os.path.join(DIFF_DIR, "vae"), dtype=torch.float32).eval()

    # ---- text encoders
    t5_tok = T5TokenizerFast.from_pretrained(os.path.join(DIFF_DIR, "tokenizer_2"))
    clip_tok = CLIPTokenizer.from_pretrained(os.path.join(DIFF_DIR, "tokenizer"))
    probe = clip_tok(["a tiny red fox in the snow", "a photo of a cat"], padding="max_length",
                     max_length=77, return_tensors="pt")["input_ids"]
    clip_mem = make_clip(SEED_CLIP)
    clip = save_clip(clip_mem, os.path.join(DIFF_DIR, "text_encoder"))
    with torch.no_grad():
        check_close("clip reloaded (text_model.* keys) vs in-memory",
                    clip(input_ids=probe).last_hidden_state, clip_mem(input_ids=probe).last_hidden_state, 0.0)
    t5_mem = make_t5(SEED_T5, len(t5_tok))
    t5 = save_t5(t5_mem, os.path.join(DIFF_DIR, "text_encoder_2"))
    probe = t5_tok(["a tiny red fox in the snow"], padding="max_length", max_length=16,
                   return_tensors="pt")["input_ids"]
    with torch.no_grad():
        check_close("t5 reloaded vs in-memory",
                    t5(input_ids=probe).last_hidden_state, t5_mem(input_ids=probe).last_hidden_state, 0.0)
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        print(f"wrote {os.path.join(DIFF_DIR, sub)}")

    # ---- golden: flow
    g = torch.Generator("cpu").manual_seed(SEED_INPUTS)
    img = bf16r(torch.randn(1, 24, 64, generator=g))
    txt = bf16r(torch.randn(1, 8, FLOW["context_in_dim"], generator=g))
    y = bf16r(torch.randn(1, FLOW["vec_in_dim"], generator=g))
    img_ids = bfl_math.img_ids_grid(4, 6)
    txt_ids = torch.zeros(1, 8, 3)
    t = torch.tensor([0.7])
    gd = torch.tensor([3.5])
    for variant, guidance in (("dev", gd), ("schnell", None)):
        m_bfl, m_diff = flows[variant]
        out = run_diffusers_flow(m_diff, img, img_ids, txt, txt_ids, t, y, guidance)
        with torch.no_grad():
            out_b = m_bfl(img, img_ids, txt, txt_ids, t, y, guidance)
        check_close(f"flow_{variant} diffusers vs bfl_math", out_b, out, 1e-4)
        if variant == "dev":
            out_r = run_diffusers_flow(dev_reloaded, img, img_ids, txt, txt_ids, t, y, guidance)
            check_close("flow_dev diffusers(saved dir) vs diffusers(from BFL)", out_r, out, 0.0)
        print(f"  flow_{variant} out std {out.std():.3f}")
        tens = {"img": img, "img_ids": img_ids, "txt": txt, "txt_ids": txt_ids, "timesteps": t, "y": y, "out": out}
        if guidance is not None:
            tens["guidance"] = guidance
        save_st(os.path.join(GOLD, f"flow_{variant}.safetensors"), tens)

    # ---- golden: vae
    g = torch.Generator("cpu").manual_seed(SEED_INPUTS + 1)
    image = bf16r(torch.rand(1, 3, 64, 96, generator=g) * 2 - 1)
    z_in = bf16r(torch.randn(1, 16, 8, 12, generator=g))
    with torch.no_grad():
        mean = vae.encode(image).latent_dist.mean
        z = AE["scale_factor"] * (mean - AE["shift_factor"])
        decoded = vae.decode(z_in / AE["scale_factor"] + AE["shift_factor"], return_dict=False)[0]
        check_close("vae encode diffusers vs bfl_math", ae.encode(image), z, 1e-4)
        check_close("vae decode diffusers vs bfl_math", ae.decode(z_in), decoded, 1e-4)
        check_close("vae decode diffusers(saved dir) vs diffusers(from BFL)",
                    vae_reloaded.decode(z_in / AE["scale_factor"] + AE["shift_factor"], return_dict=False)[0],
                    decoded, 0.0)
    print(f"  vae z std {z.std():.3f}, decoded std {decoded.std():.3f}")
    save_st(os.path.join(GOLD, "vae.safetensors"), {"image": image, "z": z, "z_in": z_in, "decoded": decoded})

    # ---- golden: t5
    t5_prompts = ["a tiny red fox in the snow",
                  "A breathtaking, highly detailed photograph of an ancient castle on a snowy mountain at sunset"]
    t5_ids, t5_out = encode_t5(t5_tok, t5, t5_prompts, 16)
    print(f"  t5 last_hidden_state std {t5_out.std():.3f}")
    save_st(os.path.join(GOLD, "t5.safetensors"), {"input_ids": t5_ids.to(torch.int64), "last_hidden_state": t5_out})

    # ---- golden: clip
    clip_prompts = ["a tiny red fox in the snow", "A photo of a cat, don't you think? 42 cats!"]
    clip_ids, clip_last, clip_pooled = encode_clip(clip_tok, clip, clip_prompts)
    eos_pos = (clip_ids == 49407).int().argmax(-1)
    check_close("clip pooled == final hidden at first EOS", clip_last[torch.arange(2), eos_pos], clip_pooled, 0.0)
    print(f"  clip last_hidden_state std {clip_last.std():.3f}")
    save_st(os.path.join(GOLD, "clip.safetensors"), {
        "input_ids": clip_ids.to(torch.int64), "last_hidden_state": clip_last, "pooler_output": clip_pooled})

    # ---- golden: schedules
    sched_cases = []
    for steps, seq, shift in ((4, 24, False), (4, 24, True), (50, 4080, True), (28, 1024, True), (1, 4096, True)):
        sched_cases.append({"steps": steps, "image_seq_len": seq, "shift": shift,
                            "timesteps": bfl_math.get_schedule(steps, seq, shift=shift)})
    write_json(os.path.join(GOLD, "schedule.json"), sched_cases)

    # ---- golden: end to end
    common = dict(vae=vae, vae_bfl=ae, t5_tok=t5_tok, t5=t5, clip_tok=clip_tok, clip=clip)
    for name, kw in (
        ("e2e_dev", dict(flow=flows["dev"][1], flow_bfl=flows["dev"][0], prompt="a tiny red fox in the snow",
                         width=96, height=64, steps=3, guidance=3.5, seed=42, shift=True, t5_len=T5_MAXLEN_E2E)),
        ("e2e_schnell", dict(flow=flows["schnell"][1], flow_bfl=flows["schnell"][0],
                             prompt="a tiny red fox in the snow", width=64, height=64, steps=4, guidance=None,
                             seed=7, shift=False, t5_len=T5_MAXLEN_E2E)),
    ):
        tensors, params = e2e(name, **kw, **common)
        params["model"] = "tiny-bfl/flux1-tiny-dev.safetensors" if name == "e2e_dev" else \
            "tiny-variants/flux1-tiny-schnell.safetensors"
        save_st(os.path.join(GOLD, f"{name}.safetensors"), tensors)
        write_json(os.path.join(GOLD, f"{name}.json"), params)
        if name == "e2e_dev":
            cross_check_diffusers_pipeline(tensors, params)
        print(f"wrote golden {name}")

    total = 0
    for dp, _, fns in os.walk(FIX):
        for fn in fns:
            total += os.path.getsize(os.path.join(dp, fn))
    print(f"tests/fixtures total: {total / 1e6:.2f} MB")


def cross_check_diffusers_pipeline(tensors, params):
    """Run diffusers' own FluxPipeline from tests/fixtures/tiny-diffusers with our prompt
    embeddings and noise; its scheduler arithmetic differs only in rounding."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(DIFF_DIR, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(prompt_embeds=tensors["txt"], pooled_prompt_embeds=tensors["vec"],
                   latents=tensors["packed_noise"].clone(), num_inference_steps=params["num_steps"],
                   guidance_scale=params["guidance"], height=params["height"], width=params["width"],
                   output_type="latent", return_dict=False)[0]
    check_close("e2e_dev final latents: our loop vs diffusers FluxPipeline", out, tensors["final_packed"], 2e-3)
    # the pipeline's own text encoding path (fp32, no bf16 rounding)
    with torch.no_grad():
        pe, ppe, _ = pipe.encode_prompt(params["prompt"], params["prompt"], max_sequence_length=params["t5_max_length"])
    check_close("FluxPipeline T5 embeds vs ours (bf16-rounded)", pe, tensors["txt"], 0.05)
    check_close("FluxPipeline CLIP pooled vs ours (bf16-rounded)", ppe, tensors["vec"], 0.05)


if __name__ == "__main__":
    main()
