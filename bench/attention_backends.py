"""Time PyTorch's SDPA backends on the dense attention shapes of the generation pipeline (GPU).

Shapes (fp16, batch of the conditional pass only where the pipeline skips the unconditional one):
cross-attention of the sparse DiTs (tokens x 1374 DINOv2 tokens, 16 heads of 64) at 512 and 1024,
the dense DiT's cross-attention (4096 x 1374) and self-attention (2 x 4096 x 4096). Prints one table;
the fastest backend per shape is what `engine.models.blocks.attention_backends` should prefer.

    python bench/attention_backends.py [--tokens-512 16528] [--tokens-1024 60748]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

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
    heads, dim, context = 16, 64, 1374
    shapes = {f"sparse 1024 cross ({args.tokens_1024} x {context})": (1, args.tokens_1024, context),
              f"sparse 512 cross ({args.tokens_512} x {context})": (1, args.tokens_512, context),
              f"dense cross (4096 x {context})": (1, 4096, context),
              "dense self (2 x 4096 x 4096)": (2, 4096, 4096)}
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("| shape | " + " | ".join(f"{name} ms" for name in BACKENDS) + " | default ms |")
    print("|---|" + "---:|" * (len(BACKENDS) + 1))
    for label, (batch, queries, keys) in shapes.items():
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
        print(f"| {label} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
