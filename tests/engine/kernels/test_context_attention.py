"""The Triton cross-attention kernel against PyTorch's SDPA (CPU: Triton's interpreter)."""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def kernels():
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        from engine.kernels import fix_interpreter_bf16_dot, fix_interpreter_scalar_index
        fix_interpreter_scalar_index()
        fix_interpreter_bf16_dot()
    import engine.kernels.context_attention as module
    return importlib.reload(module)


def sdpa(q, k, v, key_mask=None):
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                         v.transpose(1, 2).float(), attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("dim, dtype", [(32, torch.float16), (64, torch.float16), (32, torch.bfloat16)])
def test_matches_sdpa_on_projection_views(kernels, dim, dtype):
    g = torch.Generator().manual_seed(dim)
    batch, queries, keys, heads = 2, 150, 77, 3
    q = (torch.randn(batch, queries, heads * dim, generator=g) * 2).to(dtype).to(DEVICE).unflatten(-1, (heads, dim))
    kv = (torch.randn(batch, keys, 2 * heads * dim, generator=g) * 2).to(dtype).to(DEVICE)
    k, v = kv.unflatten(-1, (2, heads, dim)).unbind(dim=-3)     # strided views, as the models make them
    out = kernels.context_attention(q, k, v, block_m=64, block_n=32)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    want = sdpa(q, k, v)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    assert torch.allclose(out.float(), want, atol=tol, rtol=tol)


def test_key_mask_and_fully_masked_row(kernels):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 40, 2, 32, generator=g).half().to(DEVICE)
    k = torch.randn(2, 70, 2, 32, generator=g).half().to(DEVICE)
    v = torch.randn(2, 70, 2, 32, generator=g).half().to(DEVICE)
    mask = torch.rand(2, 70, generator=g) < 0.6
    mask[0, :40] = False                   # the first key tile of element 0 is all masked
    mask = mask.to(DEVICE)
    out = kernels.context_attention(q, k, v, mask, block_m=32, block_n=32)
    assert torch.allclose(out.float(), sdpa(q, k, v, mask), atol=2e-3, rtol=2e-3)
    none = torch.zeros_like(mask)
    none[1] = True
    out = kernels.context_attention(q, k, v, none, block_m=32, block_n=32)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.allclose(out[1].float(), sdpa(q[1:], k[1:], v[1:])[0], atol=2e-3, rtol=2e-3)


def test_rejects_bad_shapes(kernels):
    q = torch.zeros(1, 4, 2, 24)
    with pytest.raises(ValueError, match="power of two"):
        kernels.context_attention(q, q, q)
    with pytest.raises(ValueError, match="expected"):
        kernels.context_attention(torch.zeros(1, 4, 2, 32), torch.zeros(1, 5, 3, 32), torch.zeros(1, 5, 3, 32))
