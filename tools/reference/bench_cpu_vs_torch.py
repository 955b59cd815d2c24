"""fluxfit against PyTorch eager on the CPU, f32, on the same mid-size FLUX model.

Builds FLUX.1's transformer with diffusers' classes (the reference's architecture at hidden
1024, 8 heads of 128, 2 double + 4 single blocks: about 145 M parameters), saves it, then times
PyTorch's forward and denoising step and `fluxfit bench-cpu --flow` on the saved weights,
alternately, round after round, so that a machine that slows down slows both. Writes the
figures as JSON for `fluxfit bench-cpu --torch FILE` and prints the comparison.

    tools/reference/.venv/bin/python tools/reference/bench_cpu_vs_torch.py \
        [--sizes 256,512,1024] [--rounds 3] [--threads N] [--fluxfit target/release/fluxfit] \
        [--out target/bench-cpu/torch.json]

`--avx2` measures both on their AVX2 code paths on an AVX-512 machine: PyTorch through
ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS and ONEDNN_MAX_CPU_ISA, fluxfit through
FLUXFIT_CPU=avx2 (its own kernels; its matmuls are AVX2 unless built with `--features avx512`).
"""

import argparse
import json
import os
import subprocess
import sys
import time

if "--avx2" in sys.argv:
    # Read by PyTorch, MKL and oneDNN when they load: set before the import.
    os.environ.update(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2",
                      ONEDNN_MAX_CPU_ISA="AVX2", FLUXFIT_CPU="avx2")

import torch  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402


def build(hidden, heads, depth, depth_single, folder):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=depth,
        num_single_layers=depth_single,
        attention_head_dim=hidden // heads,
        num_attention_heads=heads,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56) if hidden // heads == 128 else None,
    ).eval()
    # Weights of a trained model's spread, not diffusers' zero-initialised output layers.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    return model


def inputs(side, txt_tokens):
    g = torch.Generator().manual_seed(1)
    n = (side // 16) ** 2
    h = w = side // 16
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        hidden_states=torch.randn(1, n, 64, generator=g),
        encoder_hidden_states=torch.randn(1, txt_tokens, 4096, generator=g),
        pooled_projections=torch.randn(1, 768, generator=g),
        timestep=torch.tensor([0.7]),
        img_ids=img_ids.reshape(n, 3),
        txt_ids=torch.zeros(txt_tokens, 3),
        guidance=torch.tensor([3.5]),
        return_dict=False,
    )


def fastest(rounds, f):
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--depth-single", type=int, default=4)
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--txt-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two")
    ap.add_argument("--per-round", type=int, default=2, help="timed runs of each per round")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--fluxfit", default="target/release/fluxfit")
    ap.add_argument("--out", default="target/bench-cpu/torch.json")
    ap.add_argument("--avx2", action="store_true", help="both on their AVX2 code paths")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(args.threads)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))

    folder = os.path.join(os.path.dirname(args.out), "model")
    os.makedirs(folder, exist_ok=True)
    model = build(args.hidden, args.heads, args.depth, args.depth_single, folder)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.1f} M parameters, f32; torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}), {args.threads} threads", file=sys.stderr)

    rows = {s: dict(side=s, forward=float("inf"), step=float("inf"),
                    fluxfit_forward=float("inf"), fluxfit_step=float("inf")) for s in sizes}
    with torch.inference_mode():
        for rnd in range(args.rounds):
            for side in sizes:
                x = inputs(side, args.txt_tokens)
                model(**x)  # warm-up
                fwd = fastest(args.per_round, lambda: model(**x))

                def step():
                    v = model(**x)[0]
                    return x["hidden_states"] + (-0.05) * v

                stp = fastest(args.per_round, step)
                r = rows[side]
                r["forward"] = min(r["forward"], fwd)
                r["step"] = min(r["step"], stp)
                out = subprocess.run(
                    [args.fluxfit, "bench-cpu", "--flow", folder, "--sizes", str(side),
                     "--txt-tokens", str(args.txt_tokens), "--rounds", str(args.per_round),
                     "--json"],
                    env=env, check=True, capture_output=True, text=True).stdout
                ff = json.loads(out.strip().splitlines()[-1])
                r["fluxfit_forward"] = min(r["fluxfit_forward"], ff["forward"])
                r["fluxfit_step"] = min(r["fluxfit_step"], ff["step"])
                print(f"round {rnd + 1}, {side}²: torch step {stp:.3f} s, "
                      f"fluxfit step {ff['step']:.3f} s", file=sys.stderr)

    result = dict(
        torch=torch.__version__,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        threads=args.threads,
        avx2=args.avx2,
        params=params,
        txt_tokens=args.txt_tokens,
        rows=list(rows.values()),
    )
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    print("| size | PyTorch step s | fluxfit step s | fluxfit / PyTorch |")
    print("|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['side']}² | {r['step']:.3f} | {r['fluxfit_step']:.3f} | "
              f"{r['fluxfit_step'] / r['step']:.2f}× |")
    print(f"\n(figures in {args.out}; `fluxfit bench-cpu --torch {args.out}` prints them "
          "beside its own)", file=sys.stderr)


if __name__ == "__main__":
    main()
