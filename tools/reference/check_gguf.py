#!/usr/bin/env python3
"""Reads a GGUF written by `fluxfit quantize` with the `gguf` package, as other tools would.

    tools/reference/.venv/bin/python tools/reference/check_gguf.py OUT.gguf [SOURCE.safetensors]

Prints the architecture and each type's tensor count; with the source checkpoint (BFL or
transformers names), dequantizes every tensor with gguf-py and prints the worst relative error
per type (‖w_q − w‖ / ‖w‖), failing if a tensor is missing, misshapen or off by more than its
type allows. T5 files use llama.cpp names, mapped back here.
"""

import sys

import numpy as np
from gguf import GGUFReader
from gguf import quants
from safetensors import safe_open

T5 = {
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "attn_norm": "layer.0.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_norm": "layer.1.layer_norm",
}

# Worst relative error a tensor may have per type (per-tensor, on weights of any distribution).
LIMIT = {"F32": 1e-7, "F16": 1e-3, "BF16": 4e-3, "Q8_0": 1e-2, "Q6_K": 2e-2, "Q5_K": 5e-2,
         "Q5_1": 6e-2, "Q5_0": 6e-2, "Q4_K": 1e-1, "Q4_1": 1.2e-1, "Q4_0": 1.2e-1, "Q3_K": 2.5e-1,
         "Q2_K": 5e-1}


def source_name(name, arch):
    if arch != "t5encoder":
        return name
    stem, suffix = name.rsplit(".", 1)
    if stem == "token_embd":
        return f"shared.{suffix}"
    if stem == "enc.output_norm":
        return f"encoder.final_layer_norm.{suffix}"
    _, _, idx, part = stem.split(".", 3)
    return f"encoder.block.{idx}.{T5[part]}.{suffix}"


def main():
    r = GGUFReader(sys.argv[1])
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    print(f"{sys.argv[1]}: architecture {arch}, {len(r.tensors)} tensors")
    counts = {}
    for t in r.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    print("  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if len(sys.argv) < 3:
        return
    worst = {}
    with safe_open(sys.argv[2], "pt") as src:
        for t in r.tensors:
            ref = src.get_tensor(source_name(t.name, arch)).float().numpy()
            got = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            got = got.reshape(tuple(int(d) for d in reversed(t.shape)))
            assert got.shape == ref.shape, (t.name, got.shape, ref.shape)
            err = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
            kind = t.tensor_type.name
            assert err <= LIMIT[kind], (t.name, kind, err)
            worst[kind] = max(worst.get(kind, 0.0), err)
    for k, v in sorted(worst.items()):
        print(f"  {k}: worst relative error {v:.2e}")


if __name__ == "__main__":
    main()
