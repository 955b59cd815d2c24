#!/usr/bin/env python3
"""Tiny LoRAs in every common FLUX.1 layout for the tiny dev model, and their goldens.

Run after make_fixtures.py (it reads tiny-bfl/, tiny-diffusers/ and golden/e2e_dev.*):
    tools/reference/.venv/bin/python tools/reference/make_lora_goldens.py
Needs peft (pip install peft; 0.21.2 was used). Deterministic: fixed seeds, one thread.

Every LoRA adapts the tiny dev model (hidden 64, 1 double + 1 single block). The golden is the
reference with the LoRA **merged into the BFL weights** by the layout's documented rule,
W' = W + s * (alpha / rank) * up @ down placed in the rows the module adapts, run through
diffusers' FluxTransformer2DModel (weights converted with diffusers' own checkpoint converter)
in e2e_dev's f32 Euler loop from e2e_dev's embeddings and noise (96x64, 3 steps, guidance 3.5).
Each golden is cross-checked against diffusers' own LoRA loading where diffusers reads the
layout (load_lora_weights + FluxPipeline, PEFT's unmerged forward).

Writes tests/fixtures/lora/
  kohya.safetensors        sd-scripts: lora_unet_<BFL name with _>.{lora_down,lora_up}.weight and
                           .alpha (rank/2, so alpha/rank = 0.5; rank for the final layer), every
                           Linear of the flow model; plus lora_te1_ CLIP
                           layers (q/k/v/out proj, fc1, fc2 of both layers), alpha rank/2.
  kohya-diffusers.safetensors  sd-scripts with diffusers module names (lora_unet_transformer_blocks_0_attn_to_q ...):
                           slices of fused weights (to_q, add_k_proj, proj_mlp), norm_out.linear, x_embedder.
  peft.safetensors         diffusers save_lora_weights of a PEFT adapter on every Linear of the diffusers
                           model (transformer.<module>.lora_A/B.weight), r 4, lora_alpha 8 in the
                           `lora_adapter_metadata` header (scale 2).
  aitoolkit.safetensors    diffusion_model.<BFL name>.lora_A/lora_B.weight, no alpha (ComfyUI / ai-toolkit).
  xlabs.safetensors        double_blocks.0.processor.{qkv,proj}_lora{1,2}.{down,up}.weight and
                           single_blocks.0.processor.qkv_lora.{down,up}.weight.
  kohya-t5.safetensors     sd-scripts' FLUX text-encoder-2 (T5) layout, prefix lora_te3_ (ComfyUI-compatible;
                           older sd-scripts files used lora_te2_): lora_te3_<T5EncoderModel module path
                           with _>.{lora_down,lora_up}.weight and .alpha (rank/2) for all 14 Linears of
                           the tiny T5 (encoder.block.{0,1}.layer.0.SelfAttention.{q,k,v,o},
                           encoder.block.{0,1}.layer.1.DenseReluDense.{wi_0,wi_1,wo}); no lora_unet_ keys.
and tests/fixtures/golden/lora_<case>.{safetensors,json}: final_latents [1,16,12,8] (and for kohya
`vec`, CLIP's pooled output with the merged text-encoder LoRA, bf16-rounded), for the cases kohya,
kohya_diffusers, peft, aitoolkit, xlabs, and stacked (kohya at 0.7 + peft at 1.0);
and golden/lora_kohya_t5.{safetensors,json}: the tiny T5 encoder's last_hidden_state for e2e_dev's
T5 token row (`t5_ids` of golden/e2e_dev.json, [1,16], also stored as `input_ids`) with the
kohya-t5 updates merged into the T5 weights (W + 1.0 * (alpha/rank) * up @ down), transformers'
T5EncoderModel in f32 with eager attention: `txt_f32` [1,16,32] and `txt`, its bf16 rounding (as
the pipeline rounds T5's output). Without the LoRA the same computation gives e2e_dev's txt exactly;
checked against the unmerged update added by forward hooks on the Linears.
"""

import json
import math
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bfl_math  # noqa: E402
from make_cond_goldens import (  # noqa: E402
    BFL_DIR, DIFF_DIR, FIX, FLOW, GOLD, H, Ctx, diffusers_flow, diffusers_targets, pipe_from, stats_and_save,
)
from make_fixtures import bf16r, check_close, gen_for, maxdiff, randn  # noqa: E402

import diffusers  # noqa: E402
from diffusers import FluxPipeline  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast  # noqa: E402

OUT = os.path.join(FIX, "lora")
RANK = 4
SEED = 1500
SEED_T5 = 1550
T5_DIR = os.path.join(DIFF_DIR, "text_encoder_2")


def pair(name, fin, fout, r=RANK, seed=SEED):
    """(down [r, in], up [out, r]), bf16-exact: an update about half the base weight's size."""
    down = bf16r(randn([r, fin], gen_for(f"{name}.down", seed)) / math.sqrt(fin))
    up = bf16r(0.5 * randn([fout, r], gen_for(f"{name}.up", seed)) / math.sqrt(r))
    return down, up


def flow_linears():
    m = bfl_math.Flux(guidance_embed=True, **FLOW)
    return [(n, mod.in_features, mod.out_features) for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]


def save(name, sd, metadata=None):
    path = os.path.join(OUT, name)
    save_file({k: v.to(torch.bfloat16) if v.dim() > 0 else v.float() for k, v in sd.items()}, path,
              metadata=metadata)
    return path


def merge(sd, updates):
    """updates: [(BFL layer, rows slice, swap halves, scale, down, up)] -> merged BFL state dict."""
    sd = {k: v.clone() for k, v in sd.items()}
    for layer, rows, swap, s, down, up in updates:
        delta = s * (up.float() @ down.float())
        if swap:
            delta = torch.cat(delta.chunk(2, 0)[::-1], 0)
        sd[f"{layer}.weight"][rows] += delta
    return sd


def final_of(ctx, sd):
    final, _ = ctx.denoise(ctx.diff_fn(diffusers_flow(sd, 64)))
    return final


def diffusers_lora_final(ctx, path):
    """diffusers' own reading of a LoRA file: load_lora_weights on a FluxPipeline, PEFT forward."""
    pipe = pipe_from(FluxPipeline, diffusers_flow(ctx.dev_sd, 64))
    pipe.load_lora_weights(path)
    with torch.no_grad():
        out = pipe(prompt_embeds=ctx.txt, pooled_prompt_embeds=ctx.vec, latents=ctx.packed_noise.clone(),
                   num_inference_steps=ctx.steps, guidance_scale=ctx.guidance, height=ctx.height,
                   width=ctx.width, output_type="latent", return_dict=False)[0]
    return out


def golden(ctx, case, final, params, extra=None):
    tensors = {"final_packed": final, "final_latents": bfl_math.unpack(final, ctx.height, ctx.width)}
    tensors.update(extra or {})
    p = ctx.common_json()
    p.update(params)
    stats_and_save(f"lora_{case}", tensors, p)


def kohya(ctx):
    sd, updates = {}, []
    for name, fin, fout in flow_linears():
        down, up = pair(name, fin, fout)
        key = "lora_unet_" + name.replace(".", "_")
        alpha = RANK if name.startswith("final_layer") else RANK / 2
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        sd[f"{key}.alpha"] = torch.tensor(float(alpha))
        updates.append((name, slice(None), False, alpha / RANK, down, up))
    clip_updates = []
    clip = CLIPTextModel.from_pretrained(os.path.join(DIFF_DIR, "text_encoder"), dtype=torch.float32).eval()
    for name, mod in clip.named_modules():
        if isinstance(mod, nn.Linear) and ".layers." in name:
            down, up = pair("te1." + name, mod.in_features, mod.out_features)
            key = "lora_te1_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            sd[f"{key}.alpha"] = torch.tensor(RANK / 2)
            clip_updates.append((name, 0.5, down, up))
    return sd, updates, clip, clip_updates


def clip_vec(clip, clip_updates, scale, prompt):
    with torch.no_grad():
        for name, s, down, up in clip_updates:
            clip.get_submodule(name).weight += scale * s * (up.float() @ down.float())
        tok = CLIPTokenizer.from_pretrained(os.path.join(DIFF_DIR, "tokenizer"))
        ids = tok([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
        return bf16r(clip(input_ids=ids).pooler_output)


def t5_encoder(attn="eager"):
    """The tiny T5 encoder in f32. Eager attention is T5's own formulation (transformers 4's only one)
    and reproduces e2e_dev's txt bit for bit; transformers 5's default sdpa differs by ~1e-6 (checked)."""
    return T5EncoderModel.from_pretrained(T5_DIR, dtype=torch.float32, attn_implementation=attn).eval()


def kohya_t5():
    """sd-scripts' FLUX text-encoder-2 LoRA: lora_te3_ + the T5EncoderModel module path with '_'
    (the names sd-scripts' networks/lora_flux.py gives T5Attention / T5DenseGatedActDense Linears),
    alpha rank/2, on every Linear of the tiny T5 encoder."""
    sd, updates = {}, []
    for name, mod in t5_encoder().named_modules():
        if isinstance(mod, nn.Linear):
            down, up = pair("te3." + name, mod.in_features, mod.out_features, seed=SEED_T5)
            key = "lora_te3_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            sd[f"{key}.alpha"] = torch.tensor(RANK / 2)
            updates.append((name, 0.5, down, up))
    return sd, updates


def t5_module_of_key():
    """sd-scripts' own lookup (flux_merge_lora.py): lora_te3_ + T5 file key without .weight, '.' -> '_'."""
    from safetensors import safe_open
    with safe_open(os.path.join(T5_DIR, "model.safetensors"), framework="pt") as f:
        keys = [k[: -len(".weight")] for k in f.keys() if k.endswith(".weight")]
    return {"lora_te3_" + k.replace(".", "_"): k for k in keys}


def t5_txt(ids, updates, scale, merged=True, attn="eager"):
    """Tiny T5 last_hidden_state (f32, no attention mask, as the pipeline runs it) with each update
    merged into its Linear's weight, or added unmerged by a forward hook."""
    t5, hooks = t5_encoder(attn), []
    with torch.no_grad():
        for name, s, down, up in updates:
            lin = t5.get_submodule(name)
            if merged:
                lin.weight += scale * s * (up.float() @ down.float())
            else:
                hooks.append(lin.register_forward_hook(
                    lambda m, args, out, k=scale * s, d=down.float(), u=up.float(): out + k * ((args[0] @ d.T) @ u.T)))
        out = t5(input_ids=ids, attention_mask=None).last_hidden_state
    for h in hooks:
        h.remove()
    return out


def kohya_diffusers(ctx):
    """A few modules under diffusers names, each a slice or a swapped layer in BFL terms."""
    modules = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
               "transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_mlp",
               "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.norm.linear",
               "norm_out.linear", "x_embedder"]
    model = diffusers_flow(ctx.dev_sd, 64)
    sd, updates = {}, []
    bfl_of = {path: (bfl, rows, swap) for bfl, _, _ in flow_linears() for path, rows, swap in diffusers_targets(bfl)}
    for m in modules:
        lin = model.get_submodule(m)
        down, up = pair("kd." + m, lin.in_features, lin.out_features)
        key = "lora_unet_" + m.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        bfl, rows, swap = bfl_of[m]
        updates.append((bfl, rows, swap, 1.0, down, up))
    return sd, updates


def peft_lora(ctx):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = diffusers_flow(ctx.dev_sd, 64)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets, init_lora_weights=False)
    model.add_adapter(config)
    bfl_of = {path: (bfl, rows, swap) for bfl, _, _ in flow_linears() for path, rows, swap in diffusers_targets(bfl)}
    updates = []
    with torch.no_grad():
        for name in targets:
            mod = model.get_submodule(name)
            down, up = pair("peft." + name, mod.base_layer.in_features, mod.base_layer.out_features)
            mod.lora_A["default"].weight.copy_(down)
            mod.lora_B["default"].weight.copy_(up)
            bfl, rows, swap = bfl_of[name]
            updates.append((bfl, rows, swap, 2.0, down, up))
    tmp = os.path.join(OUT, "_peft")
    FluxPipeline.save_lora_weights(tmp, transformer_lora_layers=get_peft_model_state_dict(model),
                                   transformer_lora_adapter_metadata=config.to_dict())
    os.replace(os.path.join(tmp, "pytorch_lora_weights.safetensors"), os.path.join(OUT, "peft.safetensors"))
    os.rmdir(tmp)
    # PEFT's own unmerged forward, in the same loop.
    final, _ = ctx.denoise(ctx.diff_fn(model))
    return updates, final


def aitoolkit():
    sd, updates = {}, []
    for name, fin, fout in flow_linears():
        down, up = pair("ait." + name, fin, fout)
        sd[f"diffusion_model.{name}.lora_A.weight"], sd[f"diffusion_model.{name}.lora_B.weight"] = down, up
        updates.append((name, slice(None), False, 1.0, down, up))
    return sd, updates


def xlabs():
    sd, updates = {}, []
    procs = [("double_blocks.0.processor.qkv_lora1", "double_blocks.0.img_attn.qkv", slice(None), H, 3 * H),
             ("double_blocks.0.processor.qkv_lora2", "double_blocks.0.txt_attn.qkv", slice(None), H, 3 * H),
             ("double_blocks.0.processor.proj_lora1", "double_blocks.0.img_attn.proj", slice(None), H, H),
             ("double_blocks.0.processor.proj_lora2", "double_blocks.0.txt_attn.proj", slice(None), H, H),
             ("single_blocks.0.processor.qkv_lora", "single_blocks.0.linear1", slice(0, 3 * H), H, 3 * H)]
    for key, layer, rows, fin, fout in procs:
        down, up = pair("xl." + key, fin, fout)
        sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = down, up
        updates.append((layer, rows, False, 1.0, down, up))
    return sd, updates


def main():
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    diffusers.utils.logging.disable_progress_bar()
    os.makedirs(OUT, exist_ok=True)
    ctx = Ctx()
    ctx.dev_sd = {k: v.float() for k, v in load_file(os.path.join(BFL_DIR, "flux1-tiny-dev.safetensors")).items()}
    base_final = final_of(ctx, ctx.dev_sd)
    check_close("no LoRA: e2e_dev final", base_final, ctx.e2e["final_packed"], 2e-4)
    cases = {}

    print("kohya")
    sd, upd, clip, clip_upd = kohya(ctx)
    path = save("kohya.safetensors", sd)
    final = final_of(ctx, merge(ctx.dev_sd, upd))
    vec = clip_vec(clip, clip_upd, 1.0, ctx.params["prompt"])
    print(f"  LoRA effect: max|final - no LoRA| = {maxdiff(final, base_final):.3f}; "
          f"CLIP pooled effect {maxdiff(vec, ctx.vec):.3f}")
    # diffusers 0.42.1 reads sd-scripts files only inside the blocks (it names the embedders' and
    # the final layer's updates without the `transformer.` prefix, so they are dropped) and splits
    # linear1 with FLUX.1's hard-coded sizes: compare on the block layers but linear1.
    def in_cut(name):
        return name.startswith(("double_blocks.", "single_blocks.")) and name != "single_blocks.0.linear1"
    sd_cut = {k: v for k, v in sd.items()
              if any(k.startswith("lora_unet_" + n.replace(".", "_") + ".") for n, *_ in upd if in_cut(n))}
    cut_path = os.path.join(OUT, "_kohya_cut.safetensors")
    save_file({k: v.to(torch.bfloat16) if v.dim() else v.float() for k, v in sd_cut.items()}, cut_path)
    ours_cut = final_of(ctx, merge(ctx.dev_sd, [u for u in upd if in_cut(u[0])]))
    check_close("  kohya (block layers but linear1) merged vs diffusers load_lora_weights",
                diffusers_lora_final(ctx, cut_path), ours_cut, 2e-4)
    os.remove(cut_path)
    golden(ctx, "kohya", final, {"lora": "lora/kohya.safetensors", "lora_scale": 1.0,
                                 "rule": "W + scale*(alpha/rank)*up@down; alpha rank/2 (rank for final_layer)",
                                 "vec_rule": "CLIP pooled output with the lora_te1_ updates merged, bf16"},
           {"vec": vec})
    cases["kohya"] = (upd, 1.0)

    print("kohya_diffusers")
    sd, upd = kohya_diffusers(ctx)
    path = save("kohya-diffusers.safetensors", sd)
    final = final_of(ctx, merge(ctx.dev_sd, upd))
    # diffusers 0.42.1 refuses this spelling ("Incompatible keys"): the golden rests on the merge.
    golden(ctx, "kohya_diffusers", final, {"lora": "lora/kohya-diffusers.safetensors", "lora_scale": 1.0,
                                           "rule": "slices of fused BFL weights; norm_out.linear swapped halves"})

    print("peft")
    upd, peft_final = peft_lora(ctx)
    path = os.path.join(OUT, "peft.safetensors")
    final = final_of(ctx, merge(ctx.dev_sd, upd))
    check_close("  merged vs PEFT's unmerged forward", peft_final, final, 2e-4)
    check_close("  merged vs diffusers load_lora_weights", diffusers_lora_final(ctx, path), final, 2e-4)
    golden(ctx, "peft", final, {"lora": "lora/peft.safetensors", "lora_scale": 1.0,
                                "rule": "lora_alpha/r = 8/4 from lora_adapter_metadata"})
    cases["peft"] = (upd, 1.0)

    print("aitoolkit")
    sd, upd = aitoolkit()
    path = save("aitoolkit.safetensors", sd)
    final = final_of(ctx, merge(ctx.dev_sd, upd))
    golden(ctx, "aitoolkit", final, {"lora": "lora/aitoolkit.safetensors", "lora_scale": 1.0, "rule": "W + up@down"})

    print("xlabs")
    sd, upd = xlabs()
    path = save("xlabs.safetensors", sd)
    final = final_of(ctx, merge(ctx.dev_sd, upd))
    check_close("  merged vs diffusers load_lora_weights", diffusers_lora_final(ctx, path), final, 2e-4)
    golden(ctx, "xlabs", final, {"lora": "lora/xlabs.safetensors", "lora_scale": 1.0,
                                 "rule": "W + up@down; single qkv_lora on linear1 rows 0..3H"})

    print("stacked")
    k_upd, _ = cases["kohya"]
    p_upd, _ = cases["peft"]
    stacked = [(l, r, sw, 0.7 * s, d, u) for l, r, sw, s, d, u in k_upd] + p_upd
    final = final_of(ctx, merge(ctx.dev_sd, stacked))
    golden(ctx, "stacked", final, {"loras": ["lora/kohya.safetensors:0.7", "lora/peft.safetensors:1.0"],
                                   "rule": "both merged: kohya at 0.7, peft at 1.0"})

    print("kohya_t5")
    sd, upd = kohya_t5()
    path = save("kohya-t5.safetensors", sd)
    back = load_file(path)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k].float(), sd[k].float()) for k in sd)
    # Read the file back as sd-scripts' merge does: module from the T5 file's keys, alpha / rank.
    key_map = t5_module_of_key()
    file_upd = []
    for key in sorted(k for k in back if k.endswith(".lora_down.weight")):
        lora = key[: -len(".lora_down.weight")]
        down, up = back[key].float(), back[f"{lora}.lora_up.weight"].float()
        file_upd.append((key_map[lora], back[f"{lora}.alpha"].item() / down.shape[0], down, up))
    mem = {u[0]: u for u in upd}
    assert sorted(mem) == sorted(u[0] for u in file_upd)
    assert all(s == mem[n][1] and torch.equal(d, mem[n][2]) and torch.equal(u, mem[n][3]) for n, s, d, u in file_upd)
    ids = torch.tensor([ctx.params["t5_ids"]], dtype=torch.int64)
    tok = T5TokenizerFast.from_pretrained(os.path.join(DIFF_DIR, "tokenizer_2"))
    tok_ids = tok([ctx.params["prompt"]], padding="max_length", max_length=ctx.params["t5_max_length"],
                  truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(tok_ids, ids), (tok_ids, ids)
    base = t5_txt(ids, [], 1.0)
    check_close("  no LoRA: bf16(T5) vs e2e_dev txt", bf16r(base), ctx.txt, 0.0)
    txt_f32 = t5_txt(ids, file_upd, 1.0)
    unmerged = t5_txt(ids, file_upd, 1.0, merged=False)
    cross = maxdiff(unmerged, txt_f32)
    check_close("  merged vs unmerged (forward hooks)", unmerged, txt_f32, 1e-5)
    txt_sdpa = t5_txt(ids, file_upd, 1.0, attn="sdpa")
    sdpa = maxdiff(txt_sdpa, txt_f32)
    check_close("  eager vs sdpa attention (merged)", txt_sdpa, txt_f32, 1e-5)
    txt = bf16r(txt_f32)
    moved = maxdiff(txt, ctx.txt)
    print(f"  LoRA effect: max|txt - e2e_dev txt| = {moved:.3f}")
    assert moved > 1e-2, moved
    stats_and_save("lora_kohya_t5", {"input_ids": ids, "txt_f32": txt_f32, "txt": txt}, {
        "lora": "lora/kohya-t5.safetensors", "lora_scale": 1.0, "rank": RANK, "alpha": RANK / 2,
        "text_encoder": "tiny-diffusers/text_encoder_2 (transformers T5EncoderModel, float32, eager attention)",
        "rule": "W + scale*(alpha/rank)*up@down on the T5 Linear named by the key: lora_te3_ + module path "
                "with '_' for '.'; alpha rank/2",
        "prompt": ctx.params["prompt"], "t5_max_length": ctx.params["t5_max_length"],
        "t5_ids": ids[0].tolist(),
        "input": "golden/e2e_dev.json t5_ids [1,16] (= the prompt through tokenizer_2, max_length 16); "
                 "last_hidden_state with attention_mask None",
        "txt": "bf16 rounding of txt_f32, as the pipeline rounds T5's output; with no LoRA it equals "
               "golden/e2e_dev.safetensors txt",
        "modules": [u[0] for u in upd],
        "max_abs_merged_vs_unmerged_f32": cross,
        "max_abs_eager_vs_sdpa_f32": sdpa,
        "max_abs_txt_vs_e2e_dev_txt": moved,
    })
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"lora fixtures: {total} bytes")


if __name__ == "__main__":
    main()
