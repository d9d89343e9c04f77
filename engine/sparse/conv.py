"""Submanifold sparse 3-D convolution with the official (torchsparse 2.1) parameter layout.

Parameters live in a submodule `conv` as `kernel` ([27, Cin, Cout] for 3x3x3, [Cin, Cout] for 1x1x1)
and `bias` [Cout], so official keys such as `out_layers.0.conv.kernel` load unchanged.

Kernel offset order (architecture notes, section 5): offset index k = (dz+1)*9 + (dy+1)*3 + (dx+1),
and output voxel o gathers the input voxel at o + (dx, dy, dz). "Submanifold" means the output has
exactly the input's voxels; missing neighbours contribute nothing.

Backend seam: `submanifold_conv3x3x3(voxels, kernel, bias)` dispatches to
  * "spconv": `spconv.pytorch` SubMConv3d machinery, with the weight permuted to spconv's KRSC layout
    `[Cout, kx, ky, kz, Cin]`; its neighbour map ("indice pairs") is cached in `voxels.cache`;
  * "torch": a pure-PyTorch gather / matmul / scatter-add per kernel offset over a neighbour map found
    with a dense key table (small bounding boxes) or binary search in the sorted linearised keys (large
    ones); the map is cached in `voxels.cache` and the gathers run in bounded-size chunks.
Select with `set_conv_backend(...)` or the environment variable `D3D_SPARSE_CONV=auto|spconv|torch`.
"auto" (the default) uses spconv for CUDA tensors when a CUDA build of spconv is importable and torch
otherwise. On CPU,
spconv's native algorithm gives wrong rows now and then when torch runs several threads (seen with
spconv 2.3.8), so a forced "spconv" on CPU runs single-threaded; CPU dtypes other than fp32 use torch.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import torch
from torch import Tensor, nn

from .tensor import SparseVoxels

KERNEL_VOLUME = 27
CENTER_OFFSET = 13  # (dx, dy, dz) = (0, 0, 0)

# Rows of the gathered input processed at once by the torch backend (bounds temporary memory).
_TORCH_CHUNK_ROWS = 1 << 20
# Bounding boxes with at most this many cells (x4 on CUDA, or 16 per voxel) use a dense lookup table
# for the neighbour search; larger ones use binary search.
_DENSE_TABLE_CELLS = 1 << 24

_backend_override: str | None = None


def kernel_offsets(device: torch.device | None = None) -> Tensor:
    """int64 [27, 3] (dx, dy, dz) of each kernel offset index k = (dz+1)*9 + (dy+1)*3 + (dx+1)."""
    k = torch.arange(KERNEL_VOLUME, device=device)
    return torch.stack([k % 3 - 1, (k // 3) % 3 - 1, k // 9 - 1], dim=1)


@lru_cache(maxsize=None)
def spconv_available() -> bool:
    try:
        import spconv.pytorch  # noqa: F401
    except Exception:  # any import failure (missing package, missing CUDA libs) means "not usable"
        return False
    return True


_BACKENDS = ("auto", "spconv", "torch")


def set_conv_backend(name: str | None) -> None:
    """Force "auto", "spconv" or "torch" for every later call; None returns to $D3D_SPARSE_CONV / auto."""
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"unknown sparse conv backend {name!r} (expected one of {_BACKENDS})")
    global _backend_override
    _backend_override = name


def get_conv_backend() -> str:
    """The configured backend: set_conv_backend() > $D3D_SPARSE_CONV > "auto"."""
    name = _backend_override or os.environ.get("D3D_SPARSE_CONV") or "auto"
    if name not in _BACKENDS:
        raise ValueError(f"D3D_SPARSE_CONV={name!r}: expected one of {_BACKENDS}")
    if name == "spconv" and not spconv_available():
        raise RuntimeError("sparse conv backend 'spconv' requested but spconv.pytorch cannot be imported")
    return name


def resolve_conv_backend(feats: Tensor, backend: str | None = None) -> str:
    """The backend that actually runs for these features ("spconv" or "torch")."""
    backend = backend or get_conv_backend()
    if backend == "auto":
        use_spconv = feats.is_cuda and spconv_available() and _spconv_handles(feats)
    else:
        use_spconv = backend == "spconv" and _spconv_handles(feats)
    return "spconv" if use_spconv else "torch"


# ====================================================================== torch backend
def torch_neighbour_pairs(voxels: SparseVoxels) -> list[tuple[Tensor, Tensor]]:
    """For each kernel offset k: (input rows, output rows) int64 with input = output + d(k).

    Computed once per coordinate set and cached. The centre offset pairs every row with itself and
    is stored as an empty placeholder (the convolution treats it as a dense matmul).
    Coordinates are assumed unique within a batch element.
    """
    pairs = voxels.cache.get("torch_kmap")
    if pairs is not None:
        return pairs
    coords = voxels.coords
    n = coords.shape[0]
    device = coords.device
    empty = torch.empty(0, dtype=torch.long, device=device)
    pairs = [(empty, empty)] * KERNEL_VOLUME
    if n > 0:
        # Mixed-radix key ((b*Ex + x)*Ey + y)*Ez + z over the voxels' bounding box grown by one voxel
        # on each side, so every neighbour query is a valid key and distinct cells never collide.
        xyz = coords[:, 1:].long()
        low = xyz.amin(dim=0)
        spans = (xyz.amax(dim=0) - low + 3).tolist()
        local = xyz - low + 1
        keys = ((coords[:, 0].long() * spans[0] + local[:, 0]) * spans[1] + local[:, 1]) * spans[2] + local[:, 2]
        del xyz, local
        offsets = kernel_offsets(device)
        key_steps = (offsets[:, 0] * spans[1] * spans[2] + offsets[:, 1] * spans[2] + offsets[:, 2]).tolist()
        rows = torch.arange(n, device=device)
        num_cells = (int(coords[:, 0].max()) + 1) * spans[0] * spans[1] * spans[2]
        table_budget = _DENSE_TABLE_CELLS * (4 if device.type == "cuda" else 1)
        if num_cells <= max(table_budget, 16 * n):
            # small grid: a dense key -> row table answers each lookup with one gather
            table = torch.full((num_cells,), -1, dtype=torch.int32, device=device)
            table[keys] = rows.to(torch.int32)

            def lookup(query: Tensor) -> Tensor:
                return table[query].long()
        else:
            # large grid: binary search in the sorted keys
            sorted_keys, sort_perm = torch.sort(keys)

            def lookup(query: Tensor) -> Tensor:
                pos = torch.searchsorted(sorted_keys, query).clamp_(max=n - 1)
                return torch.where(sorted_keys[pos] == query, sort_perm[pos], -1)

        # Offsets k and 26-k are opposite: if (in=i, out=o) is a pair for d then (in=o, out=i) is one
        # for -d. Look up only k < 13 and mirror.
        for k in range(CENTER_OFFSET):
            neighbour = lookup(keys + key_steps[k])
            found = neighbour >= 0
            in_rows, out_rows = neighbour[found], rows[found]
            pairs[k] = (in_rows, out_rows)
            pairs[KERNEL_VOLUME - 1 - k] = (out_rows, in_rows)
    voxels.cache["torch_kmap"] = pairs
    return pairs


def _torch_submanifold_conv(voxels: SparseVoxels, kernel: Tensor, bias: Tensor | None) -> Tensor:
    feats = voxels.feats
    kernel = kernel.to(feats.dtype)
    pairs = torch_neighbour_pairs(voxels)
    # accumulate the 27 partial products in fp32 (fp64 stays fp64)
    acc_dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
    out = (feats @ kernel[CENTER_OFFSET]).to(acc_dtype)
    for k, (in_rows, out_rows) in enumerate(pairs):
        if k == CENTER_OFFSET or in_rows.numel() == 0:
            continue
        for start in range(0, in_rows.numel(), _TORCH_CHUNK_ROWS):
            stop = start + _TORCH_CHUNK_ROWS
            contribution = feats.index_select(0, in_rows[start:stop]) @ kernel[k]
            out.index_add_(0, out_rows[start:stop], contribution.to(acc_dtype))
    if bias is not None:
        out += bias.to(acc_dtype)
    return out.to(feats.dtype)


# ====================================================================== spconv backend
@lru_cache(maxsize=None)
def _spconv_has_cuda() -> bool:
    from spconv.cppconstants import CPU_ONLY_BUILD
    return not CPU_ONLY_BUILD


def _spconv_handles(feats: Tensor) -> bool:
    if not spconv_available():
        return False
    if feats.device.type == "cuda":
        # a CPU-only spconv build cannot run CUDA tensors; bf16 goes through the torch path
        return _spconv_has_cuda() and feats.dtype in (torch.float16, torch.float32)
    # on CPU spconv runs its native gather-GEMM algorithm; only fp32 is used (and tested) there
    return feats.device.type == "cpu" and feats.dtype == torch.float32


@lru_cache(maxsize=None)
def _spconv_layer(in_channels: int, out_channels: int, native: bool):
    """A config-only spconv SubMConv3d (weight on the meta device; we pass our own weight)."""
    import spconv.pytorch as spconv
    from spconv.core import ConvAlgo

    algo = ConvAlgo.Native if native else None  # None = spconv's default (implicit GEMM on CUDA)
    with torch.device("meta"):
        layer = spconv.SubMConv3d(in_channels, out_channels, 3, bias=False, indice_key="subm3x3x3",
                                  algo=algo)
    return layer


def spconv_weight(kernel: Tensor) -> Tensor:
    """Official kernel [27, Cin, Cout] -> spconv KRSC weight [Cout, kx, ky, kz, Cin]."""
    cin, cout = kernel.shape[1], kernel.shape[2]
    # kernel rows are ordered (dz, dy, dx) from slowest to fastest
    return kernel.view(3, 3, 3, cin, cout).permute(4, 2, 1, 0, 3).contiguous()


def _spconv_submanifold_conv(voxels: SparseVoxels, kernel: Tensor, bias: Tensor | None,
                             weight: Tensor) -> Tensor:
    import spconv.pytorch as spconv

    feats = voxels.feats
    training = torch.is_grad_enabled() and (feats.requires_grad or weight.requires_grad)
    native = not feats.is_cuda
    state_key = ("spconv_indices", native, training)
    indice_dict = voxels.cache.get(state_key)
    if indice_dict is None:
        indice_dict = {}
    layer = _spconv_layer(kernel.shape[1], kernel.shape[2], native)
    sp_input = spconv.SparseConvTensor(feats.contiguous(), voxels.coords.contiguous(),
                                       voxels.spatial_extent(), max(voxels.batch_size, 1),
                                       indice_dict=indice_dict)
    bias = None if bias is None else bias.to(feats.dtype)
    # spconv fuses the bias into its CUDA kernels only; on CPU it is added afterwards
    fused_bias = bias if feats.is_cuda else None
    if feats.is_cuda:
        sp_output = layer._conv_forward(training, sp_input, weight, fused_bias)
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # see the module docstring: multi-threaded CPU runs are unreliable
        try:
            sp_output = layer._conv_forward(training, sp_input, weight, fused_bias)
        finally:
            torch.set_num_threads(threads)
    # spconv stores newly built indice pairs in the output's dict; keep it for the next conv
    voxels.cache[state_key] = sp_output.indice_dict
    out = sp_output.features
    if bias is not None and fused_bias is None:
        out = out + bias
    return out


def submanifold_conv3x3x3(voxels: SparseVoxels, kernel: Tensor, bias: Tensor | None,
                          backend: str | None = None, spconv_weight_cache: dict | None = None) -> Tensor:
    """Output features [N, Cout] of a 3x3x3 submanifold convolution (official kernel layout)."""
    if voxels.num_voxels == 0:
        return voxels.feats.new_zeros(0, kernel.shape[2])
    if resolve_conv_backend(voxels.feats, backend) == "spconv":
        dtype = voxels.feats.dtype
        if spconv_weight_cache is not None and not (torch.is_grad_enabled() and kernel.requires_grad):
            key = (voxels.device, dtype, torch.is_inference_mode_enabled())
            cached = spconv_weight_cache.get(key)
            stamp = (kernel._version, kernel.data_ptr())
            if cached is None or cached[0] != stamp:
                cached = (stamp, spconv_weight(kernel.detach().to(dtype)))
                spconv_weight_cache[key] = cached
            weight = cached[1]
        else:
            weight = spconv_weight(kernel.to(dtype))
        return _spconv_submanifold_conv(voxels, kernel, bias, weight)
    return _torch_submanifold_conv(voxels, kernel, bias)


# ====================================================================== modules
class SparseConvParameters(nn.Module):
    """Holds `kernel` and `bias` exactly as torchsparse.nn.Conv3d registers them."""

    # engine.models.cast_compute_layers casts these to the compute dtype, as the official use_fp16 does
    casts_with_compute = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True):
        super().__init__()
        volume = kernel_size ** 3
        shape = (in_channels, out_channels) if volume == 1 else (volume, in_channels, out_channels)
        self.kernel = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.kernel.is_meta:
            return
        fan_in = self.kernel.shape[-2] * (self.kernel.shape[0] if self.kernel.dim() == 3 else 1)
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.kernel, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)


class SparseConv3d(nn.Module):
    """Submanifold sparse convolution, kernel size 3 or 1, stride 1 (output voxels = input voxels)."""

    takes_sparse_voxels = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"SparseConv3d supports kernel_size 1 or 3, got {kernel_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.conv = SparseConvParameters(in_channels, out_channels, kernel_size, bias)
        self._spconv_weights: dict = {}  # (device, dtype) -> ((version, ptr), permuted weight)

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        kernel, bias = self.conv.kernel, self.conv.bias
        if self.kernel_size == 1:
            feats = x.feats @ kernel.to(x.dtype)
            if bias is not None:
                feats = feats + bias.to(x.dtype)
            return x.replace(feats)
        feats = submanifold_conv3x3x3(x, kernel, bias, spconv_weight_cache=self._spconv_weights)
        return x.replace(feats)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
