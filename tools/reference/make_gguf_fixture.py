#!/usr/bin/env python3
"""Quantized-checkpoint fixtures for fluxfit's tests, written by independent tools.

Run (after make_fixtures.py, whose tiny checkpoints this script reads):
    tools/reference/.venv/bin/python tools/reference/make_gguf_fixture.py

Writes tests/fixtures/quant/:
  types.gguf               one small tensor per storage type, written with the `gguf` package:
                           Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 quantized by gguf-py, K-quant blocks made of
                           seeded random bytes (gguf-py cannot quantize K-quants; every bit
                           pattern decodes, so random blocks with sane scales test the decoder
                           fully), F16/BF16/F32, a 3-D tensor (GGUF's reversed dimension order)
                           and one with ComfyUI-GGUF's `comfy.gguf.orig_shape` metadata.
  types_golden.safetensors the same tensors dequantized by gguf-py (numpy, float32), PyTorch
                           shapes: fluxfit must match them bit for bit; and `<type>.source`, the
                           float32 input of each gguf-py quantization.
  flux1-tiny-dev-Q8_0.gguf the tiny dev flow model as city96's convert.py lays FLUX out:
                           architecture `flux`, BFL names, 1-D tensors in F32, the embedder and
                           final layer weights in F16 (F32 in city96's files; F16 here keeps the
                           fixture small and reads that path too), the other matrices Q8_0.
  t5-tiny-encoder-Q8_0.gguf the tiny T5 encoder in llama.cpp names (`enc.blk.N.attn_q.weight`,
                           architecture `t5encoder`), as city96's T5 GGUFs: matrices Q8_0, token
                           embedding F16, norms and relative attention bias F32.
  fp8.safetensors          fp8 tensors as torch writes them: e4m3fn with a per-tensor
                           `scale_weight` (ComfyUI scaled fp8, with its `scaled_fp8` marker), with
                           a per-channel and a 128×128 block `weight_scale`, unscaled e4m3fn and
                           e5m2, and a bf16 bias.
  fp8_golden.safetensors   their float32 values (`w.float() * scale`).

Deterministic: fixed seeds, no threads involved; two runs give byte-identical files.
"""

import os

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants
from safetensors.torch import load_file, save_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "quant")

# Byte offsets of the f16 super-block scales (d, and dmin where there is one) in each K-quant
# block of 256 weights (ggml's block_qN_K layouts).
K_BLOCKS = {
    Q.Q2_K: (84, [80, 82]),   # scales[16] qs[64] d dmin
    Q.Q3_K: (110, [108]),     # hmask[32] qs[64] scales[12] d
    Q.Q4_K: (144, [0, 2]),    # d dmin scales[12] qs[128]
    Q.Q5_K: (176, [0, 2]),    # d dmin scales[12] qh[32] qs[128]
    Q.Q6_K: (210, [208]),     # ql[128] qh[64] scales[16] d
}


def k_blocks(qtype, rows, rng):
    size, scale_offsets = K_BLOCKS[qtype]
    raw = rng.integers(0, 256, size=(rows, size), dtype=np.uint8)
    for off in scale_offsets:
        # Small positive scales, so values are finite and of modest size.
        d = rng.uniform(0.001, 0.05, size=rows).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(rows, 2)
    return raw


def write_types():
    rng = np.random.default_rng(1234)
    w = gguf.GGUFWriter(os.path.join(OUT, "types.gguf"), arch="fluxfit-test")
    golden = {}

    def add(name, data, qtype, shape):
        # `data` is the stored array: quantized bytes as uint8 rows, or a float array.
        w.add_tensor(name, data, raw_dtype=qtype)
        values = quants.dequantize(data, qtype).astype(np.float32).reshape(shape)
        golden[name] = torch.from_numpy(np.ascontiguousarray(values))

    for qtype in [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]:
        x = rng.standard_normal((8, 64)).astype(np.float32)
        add(qtype.name.lower(), quants.quantize(x, qtype), qtype, (8, 64))
        # The input too: fluxfit's quantizer must produce gguf-py's bytes from it.
        golden[qtype.name.lower() + ".source"] = torch.from_numpy(x)
    for qtype in K_BLOCKS:
        add(qtype.name.lower(), k_blocks(qtype, 2, rng), qtype, (2, 256))
    x = rng.standard_normal((4, 16)).astype(np.float32)
    add("f16", x.astype(np.float16), Q.F16, (4, 16))
    add("bf16", quants.quantize(x, Q.BF16), Q.BF16, (4, 16))
    add("f32", rng.standard_normal((3, 5)).astype(np.float32), Q.F32, (3, 5))
    # 3-D: GGUF stores the dimensions innermost first.
    x = rng.standard_normal((2, 4, 32)).astype(np.float32)
    add("q8_0_3d", quants.quantize(x, Q.Q8_0), Q.Q8_0, (2, 4, 32))
    # Stored flat, with its PyTorch shape in ComfyUI-GGUF's metadata (used for 5-D tensors).
    x = rng.standard_normal((64,)).astype(np.float32)
    w.add_array("comfy.gguf.orig_shape.reshaped", [4, 2, 2, 4])
    add("reshaped", x.astype(np.float16), Q.F16, (4, 2, 2, 4))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(golden, os.path.join(OUT, "types_golden.safetensors"))


def write_flow():
    sd = load_file(os.path.join(FIX, "tiny-bfl", "flux1-tiny-dev.safetensors"))
    w = gguf.GGUFWriter(os.path.join(OUT, "flux1-tiny-dev-Q8_0.gguf"), arch="flux")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    keep = ("time_in.", "txt_in.", "vector_in.", "img_in.", "guidance_in.", "final_layer.")
    for name in sorted(sd):
        x = sd[name].float().numpy()
        if x.ndim == 1:
            w.add_tensor(name, x, raw_dtype=Q.F32)
        elif name.startswith(keep):
            w.add_tensor(name, x.astype(np.float16), raw_dtype=Q.F16)
        else:
            w.add_tensor(name, quants.quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


T5_BLOCK = {
    "layer.0.SelfAttention.q": "attn_q",
    "layer.0.SelfAttention.k": "attn_k",
    "layer.0.SelfAttention.v": "attn_v",
    "layer.0.SelfAttention.o": "attn_o",
    "layer.0.SelfAttention.relative_attention_bias": "attn_rel_b",
    "layer.0.layer_norm": "attn_norm",
    "layer.1.DenseReluDense.wi_0": "ffn_gate",
    "layer.1.DenseReluDense.wi_1": "ffn_up",
    "layer.1.DenseReluDense.wo": "ffn_down",
    "layer.1.layer_norm": "ffn_norm",
}


def llama_name(hf):
    stem, suffix = hf.rsplit(".", 1)
    if stem == "shared":
        return f"token_embd.{suffix}"
    if stem == "encoder.final_layer_norm":
        return f"enc.output_norm.{suffix}"
    _, _, idx, part = stem.split(".", 3)
    return f"enc.blk.{idx}.{T5_BLOCK[part]}.{suffix}"


def write_t5():
    sd = load_file(os.path.join(FIX, "tiny-diffusers", "text_encoder_2", "model.safetensors"))
    w = gguf.GGUFWriter(os.path.join(OUT, "t5-tiny-encoder-Q8_0.gguf"), arch="t5encoder")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for name in sorted(sd):
        if name == "encoder.embed_tokens.weight":
            continue
        x = sd[name].float().numpy()
        if name == "shared.weight":
            w.add_tensor(llama_name(name), x.astype(np.float16), raw_dtype=Q.F16)
        elif x.ndim == 1 or "relative_attention_bias" in name:
            w.add_tensor(llama_name(name), x, raw_dtype=Q.F32)
        else:
            w.add_tensor(llama_name(name), quants.quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2


def write_fp8():
    g = torch.Generator().manual_seed(99)
    t, golden = {}, {}
    # Per-tensor scale (ComfyUI scaled fp8): weight in units of the scale.
    a = torch.randn(4, 8, generator=g) * 0.1
    sa = a.abs().max() / 448.0
    t["a.weight"] = (a / sa).to(E4M3)
    t["a.scale_weight"] = sa.reshape(())
    golden["a.weight"] = t["a.weight"].float() * sa
    # Per-output-channel scale, [out, 1].
    b = torch.randn(4, 8, generator=g) * torch.tensor([[0.01], [0.1], [1.0], [10.0]])
    sb = b.abs().amax(dim=1, keepdim=True) / 448.0
    t["b.weight"] = (b / sb).to(E4M3)
    t["b.weight_scale"] = sb
    golden["b.weight"] = t["b.weight"].float() * sb
    # 128×128 block scales (DeepSeek-style), a ragged edge in both dimensions.
    c = torch.randn(136, 150, generator=g)
    sc = torch.rand(2, 2, generator=g) + 0.5
    full = sc.repeat_interleave(128, 0)[:136].repeat_interleave(128, 1)[:, :150]
    t["c.weight"] = c.to(E4M3)
    t["c.weight_scale"] = sc
    golden["c.weight"] = t["c.weight"].float() * full
    # Unscaled e4m3fn over its whole byte range, and e5m2.
    codes = torch.arange(256, dtype=torch.uint8).view(E4M3).reshape(16, 16)
    t["d.weight"] = codes
    golden["d.weight"] = codes.float()
    codes5 = torch.arange(256, dtype=torch.uint8).view(E5M2).reshape(16, 16)
    t["e.weight"] = codes5
    golden["e.weight"] = codes5.float()
    t["a.bias"] = torch.randn(4, generator=g).to(torch.bfloat16)
    golden["a.bias"] = t["a.bias"].float()
    t["scaled_fp8"] = torch.empty(0, dtype=E4M3)
    save_file(t, os.path.join(OUT, "fp8.safetensors"))
    save_file(golden, os.path.join(OUT, "fp8_golden.safetensors"))



def main():
    os.makedirs(OUT, exist_ok=True)
    write_types()
    write_flow()
    write_t5()
    write_fp8()
    total = 0
    for f in sorted(os.listdir(OUT)):
        n = os.path.getsize(os.path.join(OUT, f))
        total += n
        print(f"{n:>9}  {f}")
    print(f"{total:>9}  total")
    # Read back with gguf-py: the files it wrote must parse.
    for f in ("types.gguf", "flux1-tiny-dev-Q8_0.gguf", "t5-tiny-encoder-Q8_0.gguf"):
        r = gguf.GGUFReader(os.path.join(OUT, f))
        assert len(r.tensors) > 0, f


if __name__ == "__main__":
    main()
