"""Spatial Sparse Attention benchmark: Triton kernels vs the PyTorch reference vs dense SDPA.

Token sets of real shapes (a sphere shell on a 64^3 latent grid, an ellipsoid shell and a rounded-box
shell on 128^3) with random fp16 q/k/v (32 query heads x 32, 2 KV heads) and compressed K/V pooled
by mean over compression blocks. Per set and layout (v1.1: compression block 8, top-8; v1.0:
compression block 4, top-32 at 64^3 / top-8 at 128^3) it times, with CUDA events (warm-up, median):

* comp   compressed attention + lse
* topk   block scoring + top-k (ours: fused online top-k; reference: scores + torch.topk)
* sel    selection attention over the top-k blocks (given the reference top-k)
* win    8^3 window attention (shift 4): ours = Triton window kernel, ref = engine.sparse (SDPA)
* layer  comp + topk + sel + win + gated sum (projections and the K/V compression MLP excluded)
* dense  torch scaled_dot_product_attention over all tokens, GQA expanded to 32 heads

Useful FLOPs (4·Hq·D per query-key pair; masked work of union tiles not counted) over time, as a
fraction of a measured bf16 8192^3 matmul. Also checks ours against the reference at full size
(top-k rows identical up to near-ties, relative output errors).

    python bench/ssa.py [--sets 15k,18k,off18k,60k,off60k,130k] [--layouts v1.1,v1.0] [--tune] [--skip-ref]
                        [--module] [--selection-mix] [--json out.json]
    python bench/ssa.py --smoke      # CPU: runs the script through Triton's interpreter on ~200 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from engine.attention import ssa as ref  # noqa: E402
from engine.sparse.attention import window_partition, windowed_attention  # noqa: E402
from engine.sparse.ordering import sort_block_order  # noqa: E402

HQ, HKV, D = 32, 2, 32
DEV = "cuda"      # "cpu" with --smoke (Triton interpreter, wall-clock timer): checks the script only


# ------------------------------------------------------------------ token sets
def shell(grid: int, kind: str, thickness: float, device, radius: float = 0.44) -> torch.Tensor:
    """Block-sorted int32 coords [N, 4] (batch 0) of a shell of the given shape inside a grid^3 box
    (sphere radius: `radius` * grid)."""
    a = torch.arange(grid, device=device, dtype=torch.float32) - (grid - 1) / 2
    x, y, z = torch.meshgrid(a, a, a, indexing="ij")
    h = grid / 2
    if kind == "sphere":
        r = radius * grid
        dist = (x * x + y * y + z * z).sqrt() - r
    elif kind == "ellipsoid":
        ax = (0.46 * grid, 0.34 * grid, 0.26 * grid)
        rho = ((x / ax[0]) ** 2 + (y / ax[1]) ** 2 + (z / ax[2]) ** 2).sqrt()
        dist = (rho - 1) * (ax[0] * ax[1] * ax[2]) ** (1 / 3)     # approximate distance
    elif kind == "box":
        half = torch.tensor([0.43, 0.40, 0.30], device=device) * grid
        rounding = 0.08 * grid
        q = torch.stack([x.abs(), y.abs(), z.abs()], -1) - (half - rounding)
        outside = q.clamp(min=0).norm(dim=-1)
        inside = q.max(dim=-1).values.clamp(max=0)
        dist = outside + inside - rounding                         # rounded-box signed distance
    else:
        raise ValueError(kind)
    del h
    on = dist.abs() < thickness / 2
    pts = torch.nonzero(on).int()
    coords = torch.cat([torch.zeros_like(pts[:, :1]), pts], dim=1)
    return coords[sort_block_order(coords, 8)].contiguous()


SETS = {  # name: (grid, shape, thickness[, sphere radius / grid])
    "smoke": (16, "sphere", 1.0, 0.3),    # ~200 tokens, for --smoke
    "15k": (64, "sphere", 1.55),
    "18k": (64, "sphere", 1.85),
    # the official kernel's measurement sets (shared/docs/direct3d-s2-architecture.md 4.1): 18,208
    # tokens in 152 blocks and 60,400 tokens in 536 blocks, i.e. thicker shells with fuller blocks
    "off18k": (64, "sphere", 2.7, 0.36),
    "off60k": (128, "sphere", 3.1, 0.308),
    "60k": (128, "ellipsoid", 2.6),
    "130k": (128, "box", 2.7),
}


def pooled(x: torch.Tensor, token_to_comp: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(counts.numel(), *x.shape[1:], device=x.device, dtype=torch.float32)
    out.index_add_(0, token_to_comp, x.float())
    return (out / counts.view(-1, 1, 1).float()).to(x.dtype)


# ------------------------------------------------------------------ timing
def time_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    if DEV == "cpu":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def matmul_peak() -> float:
    n = 8192 if DEV == "cuda" else 256
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, warmup=5, reps=20)
    return 2 * n ** 3 / ms / 1e9       # TFLOP/s


# ------------------------------------------------------------------ one case
def run_case(name: str, layout_name: str, args, tk, peak: float, rows: list, checks: list):
    grid, kind, thick, *radius = SETS[name]
    coords = shell(grid, kind, thick, DEV, *radius)
    n = coords.shape[0]
    cbs = 8 if layout_name == "v1.1" else 4
    topk = 8 if (layout_name == "v1.1" or grid == 128) else 32
    lay = ref.compute_ssa_layout(coords, cbs, 8)
    blocks = lay.elements[0].blocks
    nb, offsets, comp_ids = blocks.num_blocks, blocks.block_offsets, blocks.comp_block_ids
    g = torch.Generator(device=DEV).manual_seed(0)
    dt = torch.float16
    q = torch.randn(n, HQ, D, device=DEV, dtype=dt, generator=g)
    k = torch.randn(n, HKV, D, device=DEV, dtype=dt, generator=g)
    v = torch.randn(n, HKV, D, device=DEV, dtype=dt, generator=g)
    # spatially coherent keys: add a smooth function of position so that near blocks score higher
    pos = coords[:, 1:].float() / grid
    freq = torch.randn(3, HKV * D, device=DEV, generator=g) * 6
    smooth = torch.sin(pos @ freq).view(n, HKV, D).to(dt) * 1.5
    k = k + smooth
    q = q + smooth.repeat_interleave(HQ // HKV, dim=1)
    ck = pooled(k, lay.token_to_comp, lay.comp_counts)
    cv = pooled(v, lay.token_to_comp, lay.comp_counts)
    nc = ck.shape[0]
    part = window_partition(coords, 8, 4)
    gates = torch.rand(n, 3, 1, 1, device=DEV, dtype=dt)
    members = tk.block_members(comp_ids, nb, max_members=(8 // cbs) ** 3)

    # ---------------------------------------------------------- correctness at full size
    o_c, lse = tk.compressed_attention(q, ck, cv)
    r_c, r_lse = ref.compressed_attention(q, ck, cv)
    sel = tk.select_blocks(q, ck, r_lse, comp_ids, nb, topk, members=members)
    r_sel = ref.select_blocks(q, ck, r_lse, comp_ids, nb, topk)
    differ = (sel != r_sel).any(-1)
    near_tie_ok = 0
    if differ.any():
        # rows that differ: is the reference's k-th vs (k+1)-th score within 1e-5 relative?
        idx = differ.nonzero()
        sub = idx[:4096]
        scores = []
        for h in range(HKV):
            rows_h = sub[sub[:, 0] == h, 1]
            if rows_h.numel():
                s = ref.block_scores(q[rows_h], ck, r_lse[:, rows_h], comp_ids, nb)[h]
                t = torch.topk(s, min(topk, nb) + 1, dim=-1).values
                kk = min(topk, nb)
                scores.append(((t[:, kk - 1] - t[:, kk]).abs() <= 1e-5 * t[:, kk - 1]).float())
        near_tie_ok = float(torch.cat(scores).mean()) if scores else 1.0
    o_s = tk.selection_attention(q, k, v, r_sel, offsets)
    r_s = ref.selection_attention(q, k, v, r_sel, offsets)
    o_w = tk.windowed_attention(q, k, v, part) if hasattr(tk, "windowed_attention") else None
    r_w = windowed_attention(q, k, v, part)

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    checks.append(dict(set=name, layout=layout_name, n=n, topk_rows_identical=1 - float(differ.float().mean()),
                       differing_rows_near_tie=near_tie_ok, lse_maxabs=float((lse - r_lse).abs().max()),
                       comp_rel=rel(o_c, r_c), sel_rel=rel(o_s, r_s),
                       win_rel=rel(o_w, r_w) if o_w is not None else None))

    # ---------------------------------------------------------- timings
    fast_win = (lambda: tk.windowed_attention(q, k, v, part)) if o_w is not None else \
        (lambda: windowed_attention(q, k, v, part))

    def ours_layer():
        oc, l_ = tk.compressed_attention(q, ck, cv)
        s_ = tk.select_blocks(q, ck, l_, comp_ids, nb, topk, members=members)
        os_ = tk.selection_attention(q, k, v, s_, offsets)
        ow = fast_win()
        return gates[:, 0] * oc + gates[:, 1] * os_ + gates[:, 2] * ow

    def ref_layer():
        oc, l_ = ref.compressed_attention(q, ck, cv)
        s_ = ref.select_blocks(q, ck, l_, comp_ids, nb, topk)
        os_ = ref.selection_attention(q, k, v, s_, offsets)
        ow = windowed_attention(q, k, v, part)
        return gates[:, 0] * oc + gates[:, 1] * os_ + gates[:, 2] * ow

    lens = (offsets[1:] - offsets[:-1]).long()
    sel_pairs = float(lens[r_sel.long().clamp(min=0)].masked_fill(r_sel < 0, 0).sum()) * (HQ // HKV)
    wl = (part.cu_seqlens[1:] - part.cu_seqlens[:-1]).double()
    flops = {
        "comp": 4.0 * n * nc * HQ * D,
        "topk": 2.0 * n * nc * HQ * D,
        "sel": 4.0 * sel_pairs * D,
        "win": 4.0 * float((wl * wl).sum()) * HQ * D,
    }
    flops["layer"] = sum(flops.values())
    flops["dense"] = 4.0 * n * n * HQ * D
    reps_ref = 3 if n > 80000 else 5
    ours = {
        "comp": time_ms(lambda: tk.compressed_attention(q, ck, cv)),
        "topk": time_ms(lambda: tk.select_blocks(q, ck, r_lse, comp_ids, nb, topk, members=members)),
        "sel": time_ms(lambda: tk.selection_attention(q, k, v, r_sel, offsets)),
        "win": time_ms(fast_win),
        "layer": time_ms(ours_layer),
    }
    if args.skip_ref:
        refs = dict.fromkeys(ours)
    else:
        refs = {
            "comp": time_ms(lambda: ref.compressed_attention(q, ck, cv), 1, reps_ref),
            "topk": time_ms(lambda: ref.select_blocks(q, ck, r_lse, comp_ids, nb, topk), 1, reps_ref),
            "sel": time_ms(lambda: ref.selection_attention(q, k, v, r_sel, offsets), 1, reps_ref),
            "win": time_ms(lambda: windowed_attention(q, k, v, part), 1, reps_ref),
            "layer": time_ms(ref_layer, 1, reps_ref),
        }
    dense_ms = None
    if layout_name == args.layouts[0]:
        qd = q.transpose(0, 1).unsqueeze(0)
        kd = k.repeat_interleave(HQ // HKV, dim=1).transpose(0, 1).unsqueeze(0)
        vd = v.repeat_interleave(HQ // HKV, dim=1).transpose(0, 1).unsqueeze(0)
        dense_ms = time_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd), 2, 3 if n > 80000 else 5)
        del qd, kd, vd
    for br in ["comp", "topk", "sel", "win", "layer"]:
        rows.append(dict(set=name, layout=layout_name, n=n, nc=nc, blocks=nb, topk=topk, branch=br,
                         ours_ms=ours[br], ref_ms=refs[br],
                         ours_tflops=flops[br] / ours[br] / 1e9, peak_frac=flops[br] / ours[br] / 1e9 / peak,
                         speedup_vs_ref=refs[br] / ours[br] if refs[br] else None,
                         dense_ms=dense_ms if br == "layer" else None,
                         speedup_vs_dense=(dense_ms / ours[br]) if (br == "layer" and dense_ms) else None))
    if dense_ms is not None:
        rows.append(dict(set=name, layout="-", n=n, nc=nc, blocks=nb, topk=0, branch="dense", ours_ms=dense_ms,
                         ref_ms=None, ours_tflops=flops["dense"] / dense_ms / 1e9,
                         peak_frac=flops["dense"] / dense_ms / 1e9 / peak, speedup_vs_ref=None,
                         dense_ms=dense_ms, speedup_vs_dense=1.0))
    if args.selection_mix and layout_name == "v1.1":
        # the same keys with less coherent selections (random weights in the pipeline): "mixed" keeps
        # each token's 4 best blocks and adds 4 random ones, "random" takes 8 random blocks
        perm = torch.rand(HKV, n, nb, device=DEV, generator=g).argsort(-1)[..., :topk].sort(-1).values
        rnd = perm.to(r_sel.dtype)
        mixed = r_sel.clone()
        mixed[..., topk // 2:] = rnd[..., :topk - topk // 2]
        for sel_name, chosen in (("coherent", r_sel), ("mixed", mixed), ("random", rnd)):
            want = ref.selection_attention(q, k, v, chosen, offsets)
            for label, kw in (("shared tiles only", dict(tokens_per_program=4)),
                              ("per-token only", dict(tokens_per_program=1, num_warps=1)), ("default", {})):
                got = tk.selection_attention(q, k, v, chosen, offsets, **kw)
                ms = time_ms(lambda: tk.selection_attention(q, k, v, chosen, offsets, **kw))
                print(f"SELMIX {name} {sel_name} {label}: {ms:.3f} ms (rel err {rel(got, want):.1e})")
    if args.tune:
        # selection: tokens per program x key tile x pipeline stages
        for tpp, bn, stages in ((4, 32, 3), (4, 32, 2), (4, 32, 4), (4, 64, 3), (4, 16, 3), (8, 32, 3), (2, 32, 3),
                                (2, 16, 3)):
            ms = time_ms(lambda: tk.selection_attention(q, k, v, r_sel, offsets, tokens_per_program=tpp,
                                                        block_n=bn, num_stages=stages))
            print(f"TUNE sel {name} {layout_name} tokens={tpp} block_n={bn} stages={stages}: {ms:.3f} ms")
        for tpp in (4, 8):
            for bn in (32, 64):
                ms = time_ms(lambda: tk.compressed_attention(q, ck, cv, tokens_per_program=tpp, block_n=bn))
                print(f"TUNE comp {name} {layout_name} tokens={tpp} block_n={bn}: {ms:.3f} ms")
        # scoring + top-k: layout x tile x merge
        variants = [("rows", tpp, None, 4) for tpp in (4, 8)]
        variants += [("heads", tpp, bb, 4) for tpp in (32, 64) for bb in (32, 64)]
        for var, tpp, bb, nw in variants:
            for merge in ("extract", "replace", "sort"):
                if merge == "extract" and topk > 8:
                    continue            # measured 27 ms at 18k top-32: not worth the time
                try:
                    ms = time_ms(lambda: tk.select_blocks(q, ck, r_lse, comp_ids, nb, topk, members=members,
                                                          variant=var, tokens_per_program=tpp, block_b=bb,
                                                          num_warps=nw, merge=merge))
                except Exception as e:  # noqa: BLE001
                    print("tune fail", var, tpp, bb, nw, merge, repr(e)[:200])
                    continue
                print(f"TUNE topk {name} {layout_name} {var} tokens={tpp} block_b={bb} warps={nw} "
                      f"merge={merge}: {ms:.3f} ms")
    sys.stdout.flush()


def module_case(name: str, tk):
    """SpatialSparseAttention forward (1024 channels, 32 x 32 heads, 2 KV heads, v1.1) on two batch
    elements with the same coordinates (cond + uncond), fp16: the Triton kernels reading each
    element's rows in place + the one-pass gated sum, against copying the elements side by side
    (torch.cat) and against copies + the torch gated sum (mul + 2 addcmul_)."""
    from engine.sparse import SparseVoxels
    grid, kind, thick, *radius = SETS[name]
    c = shell(grid, kind, thick, DEV, *radius)
    second = c.clone()
    second[:, 0] = 1
    coords = torch.cat([c, second])
    dt = torch.float16 if DEV == "cuda" else torch.float32
    torch.manual_seed(0)
    module = ref.SpatialSparseAttention(1024, 32, 2, 8, 8, topk=8, window_size=8, shift_window=4).to(DEV, dt).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    voxels = SparseVoxels(torch.randn(coords.shape[0], 1024, device=DEV, dtype=dt), coords)
    results = {}
    with torch.inference_mode():
        for mode, views, fused in (("in place + fused sum", True, True), ("copies + fused sum", False, True),
                                   ("copies + torch sum", False, False)):
            tk.ELEMENT_VIEWS = views
            ref._GATED_SUM[:] = [] if fused else [None]
            results[mode] = (module(voxels).feats, time_ms(lambda: module(voxels)))
    tk.ELEMENT_VIEWS = True
    ref._GATED_SUM[:] = []
    base = results["copies + torch sum"][0]
    for mode, (out, ms) in results.items():
        print(f"MODULE {name} 2 x {c.shape[0]} tokens {mode}: {ms:.3f} ms "
              f"(max abs diff {float((out - base).abs().max()):.1e})")


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="15k,60k,130k")
    ap.add_argument("--layouts", default="v1.1,v1.0")
    ap.add_argument("--tune", action="store_true", help="also time kernel variants (prints TUNE lines)")
    ap.add_argument("--skip-ref", action="store_true", help="skip the PyTorch reference timings")
    ap.add_argument("--json", default=None)
    ap.add_argument("--module", action="store_true",
                    help="also time the SSA module on two same-coordinate elements (MODULE lines)")
    ap.add_argument("--selection-mix", action="store_true",
                    help="also time the selection passes on less coherent selections (SELMIX lines)")
    ap.add_argument("--smoke", action="store_true",
                    help="run the script on the CPU through Triton's interpreter on a tiny set (no timings)")
    args = ap.parse_args()
    global DEV
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        DEV = "cpu"
        args.sets = "smoke"
    args.layouts = args.layouts.split(",")
    import engine.attention.triton as tk
    torch.backends.cuda.matmul.allow_tf32 = False
    peak = matmul_peak()
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)"
    print(f"device {name}  torch {torch.__version__}  bf16 matmul peak {peak:.0f} TFLOP/s")
    rows, checks = [], []
    for name in args.sets.split(","):
        for lay in args.layouts:
            t0 = time.time()
            run_case(name, lay, args, tk, peak, rows, checks)
            print(f"# {name} {lay} done in {time.time() - t0:.1f} s", flush=True)
    if args.module:
        for name in args.sets.split(","):
            module_case(name, tk)
    print("\ncorrectness at full size (ours vs reference):")
    for c in checks:
        print("  " + "  ".join(f"{k}={fmt(v, '.4g') if isinstance(v, float) else v}" for k, v in c.items()))
    print(f"\n| set | layout | tokens | Nc | blocks | top-k | branch | ours ms | TFLOP/s | % of {peak:.0f} "
          "| reference ms | x vs ref | dense SDPA ms | x vs dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['layout']} | {r['n']} | {r['nc']} | {r['blocks']} | {r['topk'] or '-'} | "
              f"{r['branch']} | {r['ours_ms']:.3f} | {r['ours_tflops']:.0f} | {100 * r['peak_frac']:.1f} | "
              f"{fmt(r['ref_ms'], '.2f')} | {fmt(r['speedup_vs_ref'], '.1f')} | {fmt(r['dense_ms'], '.1f')} | "
              f"{fmt(r['speedup_vs_dense'], '.1f')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(peak=peak, rows=rows, checks=checks, device=name), f, indent=1)


if __name__ == "__main__":
    main()
