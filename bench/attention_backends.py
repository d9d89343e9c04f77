"""Time PyTorch's SDPA backends and our Triton cross-attention kernel on the dense attention shapes
of the generation pipeline (GPU).

Shapes (fp16, batch of the conditional pass only where the pipeline skips the unconditional one):
cross-attention of the sparse DiTs (tokens x 1374 DINOv2 tokens, 32 heads of 32) at 512 and 1024,
the dense DiT's cross-attention (4096 x 1374, 16 heads of 64) and self-attention (2 x 4096 x 4096).
Prints one table: the SDPA backends, the default SDPA choice, and `engine.kernels.context_attention`
at a few tile shapes (BLOCK_M x BLOCK_N / warps / stages; cross-attention shapes only) with its
largest deviation from SDPA.

    python bench/attention_backends.py [--tokens-512 16528] [--tokens-1024 60748]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

TRITON_TILES = [(128, 64, 4, 2), (128, 32, 4, 2), (64, 64, 4, 2), (128, 128, 8, 2), (128, 64, 8, 3),
                (64, 32, 4, 3), (256, 64, 8, 2), (128, 64, 4, 3)]
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_ms(fn, repeats=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens-512", type=int, default=16528)
    parser.add_argument("--tokens-1024", type=int, default=60748)
    args = parser.parse_args()
    context = 1374
    shapes = {f"sparse 1024 cross ({args.tokens_1024} x {context}, 32 x 32)": (1, args.tokens_1024, context, 32, 32),
              f"sparse 512 cross ({args.tokens_512} x {context}, 32 x 32)": (1, args.tokens_512, context, 32, 32),
              f"dense cross (4096 x {context}, 16 x 64)": (1, 4096, context, 16, 64),
              "dense self (2 x 4096 x 4096, 16 x 64)": (2, 4096, 4096, 16, 64)}
    from engine.kernels.context_attention import context_attention
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("| shape | " + " | ".join(f"{name} ms" for name in BACKENDS) + " | default ms | "
          + " | ".join(f"triton {m}x{n}/{w}/{st} ms" for m, n, w, st in TRITON_TILES) + " | max abs diff |")
    print("|---|" + "---:|" * (len(BACKENDS) + 2 + len(TRITON_TILES)))
    for label, (batch, queries, keys, heads, dim) in shapes.items():
        q = torch.randn(batch, heads, queries, dim, device="cuda", dtype=torch.float16)
        k = torch.randn(batch, heads, keys, dim, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        row = []
        for backend in list(BACKENDS.values()) + [None]:
            def run():
                return F.scaled_dot_product_attention(q, k, v)
            try:
                if backend is None:
                    row.append(f"{time_ms(run):.3f}")
                else:
                    with sdpa_kernel(backend):
                        row.append(f"{time_ms(run):.3f}")
            except RuntimeError as error:
                row.append(f"n/a ({str(error).splitlines()[0][:30]})")
        diff = "-"
        if "cross" in label:   # the kernel reads the [B, L, H, D] views the models make
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            for m, n, w, st in TRITON_TILES:
                row.append(f"{time_ms(lambda: context_attention(qt, kt, vt, block_m=m, block_n=n, num_warps=w, num_stages=st)):.3f}")
            want = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
            diff = f"{float((context_attention(qt, kt, vt) - want).abs().max()):.1e}"
        else:
            row += ["-"] * len(TRITON_TILES)
        print(f"| {label} | " + " | ".join(row) + f" | {diff} |")


if __name__ == "__main__":
    main()
