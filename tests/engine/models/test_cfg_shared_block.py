"""Classifier-free guidance pairs: the first block's self-attention half computed once.

`SparseDiT.forward` / `DenseDiT.forward` with `identical_elements=True` (all batch elements hold the
same tokens and timestep, only the contexts differ) run the first block's norm1 + modulation,
self-attention, gated residual and norm2 on element 0 only and copy its rows to the other elements
(`ModulatedCrossBlock.forward(..., shared_self_attention=True)`). The results must be bitwise those of
the full computation. CPU: PyTorch kernels (and stand-in fused passes for the block's kernel path);
CUDA: the Triton kernels, cuBLAS, CUDA graphs, at tiny and at released layer sizes.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.configs import DenseDiTConfig, SparseDiTConfig
from engine.models import blocks as blocks_module
from engine.models import cast_compute_layers
from engine.models.blocks import ModulatedCrossBlock, MultiHeadAttention
from engine.models.dense_dit import DenseDiT
from engine.models.sparse_dit import SparseDiT, first_element_voxels, sparse_condition_tokens
from engine.sampling import CUDAGraphRunner
from engine.sparse import SparseVoxels
from helpers.coords import shell_coords

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ------------------------------------------------------------------------------------------ inputs
def tiny_sparse_config(version: str, **overrides) -> SparseDiTConfig:
    v10 = version == "v1.0"
    params = dict(resolution=32, in_channels=4, out_channels=4, model_channels=64, cond_channels=64 if v10 else 48,
                  num_blocks=2, num_heads=4, num_head_channels=16, num_kv_heads=2,
                  compression_block_size=4 if v10 else 8, selection_block_size=8, topk=3,
                  compression_version="v2" if v10 else "v1", sparse_conditions=v10)
    params.update(overrides)
    return SparseDiTConfig(**params)


def random_sparse_dit(config: SparseDiTConfig, std: float = 0.2, backend: str = "torch") -> SparseDiT:
    torch.manual_seed(0)
    model = SparseDiT(config, ssa_backend=backend).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def guidance_pair(coords: torch.Tensor, in_channels: int, config: SparseDiTConfig, dtype=torch.float32,
                  seed: int = 1):
    """The pipeline's pair: element 1 = element 0's tokens; condition [cond, zeros]; uniform flags."""
    gen = torch.Generator().manual_seed(seed)
    second = coords.clone()
    second[:, 0] = 1
    feats = torch.randn(coords.shape[0], in_channels, generator=gen).to(dtype)
    x = SparseVoxels(torch.cat([feats, feats]), torch.cat([coords, second]))
    if config.sparse_conditions:
        grid = 3
        dense = torch.randn(1, 5 + grid * grid, config.cond_channels, generator=gen)
        tokens = sparse_condition_tokens(dense, torch.rand(1, grid, grid, generator=gen) > 0.3)
        uncond = tokens.coords.clone()
        uncond[:, 0] = 1
        cond = SparseVoxels(torch.cat([tokens.feats, torch.zeros_like(tokens.feats)]).to(dtype),
                            torch.cat([tokens.coords, uncond]))
        return x, cond, None
    context = torch.randn(1, 7, config.cond_channels, generator=gen).to(dtype)
    return x, torch.cat([context, torch.zeros_like(context)]), (False, True)


def self_attention_rows(block: ModulatedCrossBlock) -> list:
    """Records the token tensor shapes the block's self-attention is called with."""
    shapes = []
    block.self_attn.register_forward_hook(lambda module, args, output: shapes.append(tuple(args[0].shape)))
    return shapes


# ------------------------------------------------------------------------------------------ sparse, CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("version", ["v1.1", "v1.0"])
def test_sparse_identical_elements_is_exact(version, dtype):
    config = tiny_sparse_config(version)
    model = random_sparse_dit(config)
    if dtype == torch.float16:
        cast_compute_layers(model, dtype)
    coords = shell_coords(7.0, (11.5, 12.2, 10.6), 24)
    x, cond, uniform = guidance_pair(coords, config.in_channels, config, dtype)
    first_calls = self_attention_rows(model.blocks[0])
    n = coords.shape[0]
    t = torch.tensor([420.0])
    with torch.no_grad():
        plain = model(x, t, cond, uniform_context=uniform).feats
        assert first_calls == [(2, n, config.model_channels)]
        shared = model(x, t, cond, uniform_context=uniform, identical_elements=True).feats
        assert first_calls[1:] == [(1, n, config.model_channels)]     # element 0 only
        # later sampler steps: the element-0 voxel set and its coordinate caches are built once
        first = x.cache["first_element_voxels"]
        first_cache = dict(first.cache)
        step = x.replace(torch.cat([x.feats[:n] * 0.5 + 0.1] * 2))
        plain_step = model(step, torch.tensor([210.0]), cond, uniform_context=uniform).feats
        shared_step = model(step, torch.tensor([210.0]), cond, uniform_context=uniform, identical_elements=True).feats
    assert torch.equal(shared, plain)
    assert torch.equal(shared_step, plain_step)
    assert not torch.equal(shared_step, shared)
    assert x.cache["first_element_voxels"] is first and first.num_voxels == n
    assert torch.equal(first.coords, coords)
    assert any(isinstance(key, tuple) and key[0] == "ssa_layout" for key in first_cache)
    assert first.cache.keys() == first_cache.keys() and all(first.cache[k] is first_cache[k] for k in first_cache)


@pytest.mark.parametrize("version", ["v1.1", "v1.0"])
def test_sparse_step_function_passes_the_promise(version):
    config = tiny_sparse_config(version)
    model = random_sparse_dit(config)
    coords = shell_coords(7.0, (11.5, 12.2, 10.6), 24)
    x, cond, uniform = guidance_pair(coords, config.in_channels, config)
    first_calls = self_attention_rows(model.blocks[0])
    plain = model.step_function(x, cond, uniform_context=uniform)
    shared = model.step_function(x, cond, uniform_context=uniform, identical_elements=True)
    with torch.no_grad():
        for t in (900.0, 500.0):
            feats = torch.cat([torch.randn(coords.shape[0], config.in_channels)] * 2)
            assert torch.equal(shared(feats, torch.tensor([t])), plain(feats, torch.tensor([t])))
    assert [shape[0] for shape in first_calls] == [1, 2, 1, 2]


def test_sparse_forward_with_guidance_uses_the_promise():
    config = tiny_sparse_config("v1.1")
    model = random_sparse_dit(config)
    coords = shell_coords(7.0, (11.5, 12.2, 10.6), 24)
    x = SparseVoxels(torch.randn(coords.shape[0], config.in_channels), coords)
    cond, uncond = torch.randn(1, 7, config.cond_channels), torch.randn(1, 7, config.cond_channels)
    first_calls = self_attention_rows(model.blocks[0])
    t = torch.tensor([333.0])
    with torch.no_grad():
        cond_out, uncond_out = model.forward_with_guidance(x, t, cond, uncond)
        batch = x.cache["guidance_batch"].replace(torch.cat([x.feats, x.feats]))
        plain = model(batch, t, torch.cat([cond, uncond])).feats
    assert first_calls[0][0] == 1
    assert torch.equal(torch.cat([cond_out, uncond_out]), plain)


def test_sparse_promise_with_one_element_or_injected_selection():
    config = tiny_sparse_config("v1.1")
    model = random_sparse_dit(config)
    coords = shell_coords(7.0, (11.5, 12.2, 10.6), 24)
    x, cond, uniform = guidance_pair(coords, config.in_channels, config)
    n = coords.shape[0]
    single = SparseVoxels(x.feats[:n], coords)
    first_calls = self_attention_rows(model.blocks[0])
    for block in model.blocks:
        block.self_attn.record_selection = True
    t = torch.tensor([640.0])
    with torch.no_grad():
        # a batch of one: nothing to share, the same forward
        one = model(single, t, cond[:1]).feats
        assert torch.equal(model(single, t, cond[:1], identical_elements=True).feats, one)
        assert first_element_voxels(single) is single and "first_element_voxels" not in single.cache
        # injected selections may differ per element: the first block then runs in full
        model(x, t, cond, uniform_context=uniform)
        injected = [block.self_attn.last_block_topk for block in model.blocks]
        injected[0] = [injected[0][0], torch.flip(injected[0][1], dims=[-1])]   # valid, another order
        plain = model(x, t, cond, uniform_context=uniform, block_topk=injected).feats
        shared = model(x, t, cond, uniform_context=uniform, block_topk=injected, identical_elements=True).feats
    assert torch.equal(shared, plain)
    assert [shape[0] for shape in first_calls] == [1, 1, 2, 2, 2]


def test_sparse_promise_rejects_elements_of_different_sizes():
    config = tiny_sparse_config("v1.1")
    model = random_sparse_dit(config)
    coords = [shell_coords(7.0, (11.5, 12.2, 10.6), 24), shell_coords(5.0, (11.5, 12.2, 10.6), 24, batch=1)]
    x = SparseVoxels(torch.randn(sum(c.shape[0] for c in coords), config.in_channels), torch.cat(coords))
    with torch.no_grad(), pytest.raises(ValueError, match="identical_elements"):
        model(x, torch.tensor([100.0]), torch.randn(2, 7, config.cond_channels), identical_elements=True)


# ------------------------------------------------------------------------------------------ dense, CPU
TINY_DENSE = DenseDiTConfig(resolution=4, in_channels=8, out_channels=8, model_channels=64, cond_channels=32,
                            num_blocks=2, num_heads=2, num_head_channels=32, latent_shape=(8, 4, 4, 4))


def random_dense_dit(config: DenseDiTConfig = TINY_DENSE) -> DenseDiT:
    gen = torch.Generator().manual_seed(0)
    model = DenseDiT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.endswith("gamma"):
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen) + (1.0 if name.endswith("gamma") else 0.0))
    return model.eval()


def dense_pair(config: DenseDiTConfig, dtype=torch.float32, seed: int = 1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, config.in_channels, *(config.resolution,) * 3, generator=gen)
    context = F.layer_norm(torch.randn(1, 7, config.cond_channels, generator=gen), (config.cond_channels,))
    x = latent.expand(2, *latent.shape[1:]).to(device, dtype)          # as the sampler passes it
    return x, torch.cat([context, torch.zeros_like(context)]).to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dense_identical_elements_is_exact(dtype):
    model = random_dense_dit()
    if dtype == torch.float16:
        cast_compute_layers(model, dtype)
    x, cond = dense_pair(TINY_DENSE, dtype)
    first_calls = self_attention_rows(model.blocks[0])
    with torch.no_grad():
        for t in (torch.tensor([800.0]), torch.tensor([150.0, 150.0])):
            for uniform in (None, (False, True)):
                plain = model(x, t, cond, uniform_context=uniform)
                shared = model(x, t, cond, uniform_context=uniform, identical_elements=True)
                assert torch.equal(shared, plain)
        one = model(x[:1], t[:1], cond[:1])
        assert torch.equal(model(x[:1], t[:1], cond[:1], identical_elements=True), one)
    assert [shape[0] for shape in first_calls] == [2, 1] * 4 + [1, 1]


# ------------------------------------------------------------------------------------------ block, fused path
class TorchFusedPasses:
    """The fused passes of engine.kernels.modulation written with PyTorch ops (same formulas as the
    block's PyTorch path), honouring their `out` / `residual_out` arguments: the block's kernel path,
    including writing element 0's rows in place, runs on CPU."""

    calls: list = []

    @classmethod
    def _norm(cls, x, eps, weight, bias):
        return blocks_module.half_layer_norm(x, x.shape[-1:], weight, bias, eps) if x.dtype != torch.float32 \
            else F.layer_norm(x, x.shape[-1:], weight, bias, eps)

    @staticmethod
    def _store(result, out):
        if out is None:
            return result
        out.copy_(result)
        return out

    @classmethod
    def layer_norm_modulate(cls, x, shift, scale, eps, *, weight=None, bias=None, out=None):
        cls.calls.append(("layer_norm_modulate", x.shape[0]))
        return cls._store(torch.addcmul(shift, cls._norm(x, eps, weight, bias), 1 + scale), out)

    @classmethod
    def residual_layer_norm(cls, x, y, gate=None, *, eps, weight=None, bias=None, shift=None, scale=None,
                            residual_out=None, out=None):
        cls.calls.append(("residual_layer_norm", x.shape[0]))
        stream = cls._store(x + y if gate is None else torch.addcmul(x, gate, y), residual_out)
        normed = cls._norm(stream, eps, weight, bias)
        if shift is not None:
            normed = torch.addcmul(shift, normed, 1 + scale)
        return stream, cls._store(normed, out)

    @classmethod
    def gated_residual(cls, x, gate, y, *, inplace=False):
        cls.calls.append(("gated_residual", x.shape[0]))
        return cls._store(torch.addcmul(x, gate, y), x if inplace else None)

    @staticmethod
    def multi_head_rms_norm(x, gamma, factor):
        return (F.normalize(x.float(), dim=-1) * gamma.float() * factor).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_block_kernel_path_shares_exactly(monkeypatch, dtype):
    torch.manual_seed(3)
    block = ModulatedCrossBlock(48, MultiHeadAttention(48, 4, qk_rms_norm=True),
                                MultiHeadAttention(48, 4, ctx_channels=24, attn_type="cross"))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        block.norm2.weight.add_(1.0)
    for module in block.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(dtype)
    x = torch.randn(1, 21, 48).to(dtype).expand(3, -1, -1).contiguous()
    t_emb = torch.randn(1, 48).to(dtype).expand(3, -1)
    context = torch.randn(3, 5, 24).to(dtype)
    with torch.no_grad():
        torch_path = block(x, t_emb, context)
        torch_shared = block(x, t_emb, context, shared_self_attention=True)
        monkeypatch.setattr(blocks_module, "_modulation_kernels", lambda *args, **kwargs: TorchFusedPasses)
        monkeypatch.setattr(blocks_module._BLOCK_KERNELS, "failure", None)   # restored, whatever happens
        TorchFusedPasses.calls = []
        fused = block(x, t_emb, context)
        calls_full, TorchFusedPasses.calls = TorchFusedPasses.calls, []
        before = x.clone()
        fused_shared = block(x, t_emb, context, shared_self_attention=True)
    assert torch.equal(torch_shared, torch_path)
    assert torch.equal(fused_shared, fused)
    assert torch.equal(x, before), "the block must not write into its input"
    assert calls_full == [("layer_norm_modulate", 3), ("residual_layer_norm", 3), ("residual_layer_norm", 3),
                          ("gated_residual", 3)]
    assert TorchFusedPasses.calls == [("layer_norm_modulate", 1), ("residual_layer_norm", 1),
                                      ("residual_layer_norm", 3), ("gated_residual", 3)]


# ------------------------------------------------------------------------------------------ CUDA
def _cuda_sparse(config: SparseDiTConfig, coords: torch.Tensor, std: float):
    model = random_sparse_dit(config, std=std, backend="auto").cuda()
    cast_compute_layers(model, torch.float16)
    x, cond, uniform = guidance_pair(coords, config.in_channels, config, torch.float16)
    x = x.to("cuda")
    cond = cond.to("cuda")
    return model, x, cond, uniform


def _check_cuda_sparse(model, x, cond, uniform):
    n = x.num_voxels // 2
    gen = torch.Generator(device="cuda").manual_seed(5)
    latents = [torch.randn(n, x.channels, device="cuda", generator=gen, dtype=torch.float16) for _ in range(4)]
    ts = [torch.tensor([t], device="cuda") for t in (900.0, 650.0, 400.0, 150.0)]
    plain = model.step_function(x, cond, uniform_context=uniform)
    shared = model.step_function(x, cond, uniform_context=uniform, identical_elements=True)
    with torch.inference_mode():
        eager_plain = [model(x.replace(torch.cat([f, f])), t, cond, uniform_context=uniform).feats
                       for f, t in zip(latents, ts)]
        eager_shared = [model(x.replace(torch.cat([f, f])), t, cond, uniform_context=uniform,
                              identical_elements=True).feats for f, t in zip(latents, ts)]
        graphed_plain = [plain(torch.cat([f, f]), t) for f, t in zip(latents, ts)]
        graphed_shared = [shared(torch.cat([f, f]), t) for f, t in zip(latents, ts)]
    assert plain.failed is None and plain.captured and shared.failed is None and shared.captured
    for step in range(len(ts)):
        assert torch.equal(eager_shared[step], eager_plain[step]), step
        assert torch.equal(graphed_shared[step], graphed_plain[step]), step
        torch.testing.assert_close(graphed_shared[step], eager_plain[step], atol=2e-3, rtol=2e-3)


@cuda
@pytest.mark.parametrize("version", ["v1.1", "v1.0"])
def test_cuda_sparse_identical_elements_is_exact_and_graphs(version):
    config = tiny_sparse_config(version)
    _check_cuda_sparse(*_cuda_sparse(config, shell_coords(7.0, (11.5, 12.2, 10.6), 24), std=0.2))


@cuda
@pytest.mark.parametrize("shell", [(24.0, 64), (29.0, 64), (39.0, 128)], ids=["17k", "25k", "46k"])
@pytest.mark.parametrize("version", ["v1.1", "v1.0"])
def test_cuda_sparse_identical_elements_is_exact_at_released_width(version, shell):
    # released layer sizes (1024 channels, 32 heads, 2 KV heads): the GEMM, SSA and convolution shapes
    # of the 512 stage (17k tokens) and larger sets, element 0 alone against both elements. 25k sits
    # where select_blocks' tile size depends on the KV-head count (64 tokens per program for the two
    # elements side by side, 32 for element 0 alone): exact only if the scores do not depend on it.
    v10 = version == "v1.0"
    config = SparseDiTConfig(num_blocks=2, compression_block_size=4 if v10 else 8,
                             compression_version="v2" if v10 else "v1", sparse_conditions=v10)
    radius, size = shell
    coords = shell_coords(radius, (size / 2 - 0.5, size / 2 + 0.2, size / 2 - 1.4), size)
    _check_cuda_sparse(*_cuda_sparse(config, coords, std=0.02))


@cuda
@pytest.mark.parametrize("config", [TINY_DENSE, DenseDiTConfig(num_blocks=2)], ids=["tiny", "released_width"])
def test_cuda_dense_identical_elements_is_exact_and_graphs(config):
    model = random_dense_dit(config).cuda()
    cast_compute_layers(model, torch.float16)
    x, cond = dense_pair(config, torch.float16, device="cuda")
    uniform = (False, True)
    runners = {same: CUDAGraphRunner(lambda a, t, same=same: model(a, t, cond, uniform_context=uniform,
                                                                    identical_elements=same))
               for same in (False, True)}
    ts = [torch.tensor([t], device="cuda") for t in (900.0, 650.0, 400.0, 150.0)]
    with torch.inference_mode():
        steps = [(x * (1 - 0.1 * i)).contiguous() for i in range(len(ts))]
        eager = {same: [model(a, t, cond, uniform_context=uniform, identical_elements=same) for a, t in zip(steps, ts)]
                 for same in (False, True)}
        graphed = {same: [runners[same](a, t) for a, t in zip(steps, ts)] for same in (False, True)}
    assert all(r.captured and r.failed is None for r in runners.values())
    for step in range(len(ts)):
        assert torch.equal(eager[True][step], eager[False][step]), step
        assert torch.equal(graphed[True][step], graphed[False][step]), step
        torch.testing.assert_close(graphed[True][step], eager[False][step], atol=2e-3, rtol=2e-3)
