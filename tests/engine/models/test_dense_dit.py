"""DenseDiT: official parity fixture (cond and uncond), batched CFG, pos_emb table, manifests."""
import io
import json
import math

import pytest
import torch

from conftest import within_tolerance
from engine.configs import DenseDiTConfig, config_from_params
from engine.models import build
from engine.models.dense_dit import DenseDiT

TINY = DenseDiTConfig(resolution=4, in_channels=8, out_channels=8, model_channels=64, cond_channels=32,
                      num_blocks=2, num_heads=2, num_head_channels=32, latent_shape=(8, 4, 4, 4))


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter redrawn (nothing zero, unlike a fresh adaLN-zero init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.endswith("gamma"):
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            elif name.endswith(("gamma", "norm2.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def tiny_inputs(batch: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 8, 4, 4, 4, generator=gen)
    cond = torch.nn.functional.layer_norm(torch.randn(batch, 7, 32, generator=gen), (32,))
    return x, cond


@pytest.mark.parametrize("dtype", [torch.float16, None], ids=["fp16", "fp32"])
def test_official_parity(parity_fixture, dtype):
    # fp16 is the released precision; fp32 is covered by the same tolerances (README)
    fx = parity_fixture("dense_dit.pt")
    cfg = config_from_params("dense_dit", fx["constructor_params"])
    model = build("dense_dit", config=cfg, dtype=dtype)
    model.load_state_dict(fx["state_dict"], strict=True)
    inputs, outputs, tol = fx["inputs"], fx["outputs"], fx["tolerance_per_output"]
    with torch.no_grad():
        ours = {"out_cond": model(inputs["x"], inputs["t"], inputs["cond"]),
                "out_uncond": model(inputs["x"], inputs["t"], inputs["uncond"])}
    for name, rule in fx["compare"].items():
        assert rule == "tolerance"
        assert ours[name].shape == outputs[name].shape
        ok, rel, mx = within_tolerance(ours[name], outputs[name], tol[name])
        assert ok, f"{name}: rel_l2 {rel:.2e} max_abs {mx:.2e}"


def test_pos_emb_matches_fixture_buffer(parity_fixture):
    fx = parity_fixture("dense_dit.pt")
    model = DenseDiT(config_from_params("dense_dit", fx["constructor_params"]))
    torch.testing.assert_close(model.pos_emb, fx["state_dict"]["pos_emb"], atol=1e-6, rtol=0)


def test_pos_emb_layout_full_size():
    # row x*256 + y*16 + z holds [sin(x f), cos(x f), sin(y f), cos(y f), sin(z f), cos(z f), 0 0 0 0],
    # f_j = 10000^(-j/170), j < 170 (1024 channels = 3 * 2 * 170 + 4)
    model = build("dense_dit", "v1.1", device="meta")
    assert model.pos_emb.shape == (4096, 1024) and model.pos_emb.dtype == torch.float32
    small = DenseDiT(DenseDiTConfig(num_blocks=0, cond_channels=8))  # the released table, without the blocks
    freqs = 10000.0 ** (-torch.arange(170, dtype=torch.float64) / 170)
    for x, y, z in [(0, 0, 0), (1, 2, 3), (15, 0, 7), (9, 14, 15)]:
        row = small.pos_emb[x * 256 + y * 16 + z].double()
        expected = torch.cat([torch.sin(x * freqs), torch.cos(x * freqs), torch.sin(y * freqs), torch.cos(y * freqs),
                              torch.sin(z * freqs), torch.cos(z * freqs), torch.zeros(4, dtype=torch.float64)])
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batched_cfg_equals_two_single_calls(dtype):
    model = build("dense_dit", config=TINY, dtype=dtype)
    model.load_state_dict(randomized(DenseDiT(TINY)).state_dict())
    x, cond = tiny_inputs(1)
    uncond = torch.zeros_like(cond)
    t = torch.tensor([500.0], dtype=torch.float16)
    with torch.no_grad():
        single = torch.cat([model(x, t, cond), model(x, t, uncond)])
        batched = model(torch.cat([x, x]), t, torch.cat([cond, uncond]))
        per_sample_t = model(torch.cat([x, x]), t.expand(2), torch.cat([cond, uncond]))
    assert batched.shape == (2, 8, 4, 4, 4) and batched.dtype == dtype
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(batched, single, atol=atol, rtol=0)
    assert torch.equal(per_sample_t, batched)
    assert not torch.allclose(single[0], single[1], atol=1e-3)  # the context matters


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_uniform_unconditional_context_matches_attending(dtype):
    # the pipeline's guided batch [cond, zeros] skips attending to the all-zero context
    model = build("dense_dit", config=TINY, dtype=dtype)
    model.load_state_dict(randomized(DenseDiT(TINY)).state_dict())
    x, cond = tiny_inputs(1)
    batch_x, batch_cond = torch.cat([x, x]), torch.cat([cond, torch.zeros_like(cond)])
    t = torch.tensor([300.0])
    with torch.no_grad():
        full = model(batch_x, t, batch_cond)
        short = model(batch_x, t, batch_cond, uniform_context=(False, True))
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(short, full, atol=atol, rtol=0)
    assert torch.equal(short[0], full[0])
    with pytest.raises(ValueError, match="uniform_context"):
        model(batch_x, t, batch_cond, uniform_context=(False,))


def test_conditioning_reaches_output_and_timestep_matters():
    model = randomized(DenseDiT(TINY))
    x, cond = tiny_inputs(1)
    with torch.no_grad():
        a = model(x, torch.tensor([500.0]), cond)
        b = model(x, torch.tensor([100.0]), cond)
    assert (a - b).abs().max() > 1e-3


def test_token_order_is_x_major():
    # a model without attention mixing: zero the residual branches, so each voxel's output depends on its own
    # input and its position embedding only; then moving the input voxel must move the output voxel
    model = randomized(DenseDiT(TINY))
    with torch.no_grad():
        for block in model.blocks:
            block.adaLN_modulation[1].weight.zero_()
            block.adaLN_modulation[1].bias.zero_()  # all gates 0 -> blocks are identities except cross-attn
            block.cross_attn.to_out.weight.zero_()
            block.cross_attn.to_out.bias.zero_()
        x, cond = tiny_inputs(1)
        out = model(x, torch.tensor([10.0]), cond)
        tokens = model.input_layer(x.flatten(2).transpose(1, 2)) + model.pos_emb
        normed = torch.nn.functional.layer_norm(tokens, (64,), eps=1e-5)
        expected = model.out_layer(normed)  # [1, 64, 8] in token order
    flat_index = 1 * 16 + 2 * 4 + 3  # voxel (1, 2, 3) of a 4^3 grid
    torch.testing.assert_close(out[0, :, 1, 2, 3], expected[0, flat_index], atol=1e-5, rtol=0)


def test_save_and_strict_reload_gives_identical_outputs():
    model = randomized(DenseDiT(TINY))
    buffer = io.BytesIO()
    torch.save({"dit": model.state_dict()}, buffer)
    buffer.seek(0)
    reloaded = DenseDiT(TINY).eval()
    reloaded.load_state_dict(torch.load(buffer, weights_only=True)["dit"], strict=True)
    x, cond = tiny_inputs(1)
    t = torch.tensor([250.0])
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), reloaded(x, t, cond))


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_full_size_manifest_keys_shapes_dtypes(manifest_dir, version):
    manifest = json.loads((manifest_dir / f"v{version[1]}{version[3]}_dense_dit.json").read_text())["state_dict"]
    model = build("dense_dit", version, device="meta", dtype=torch.float16)
    ours = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()}
    assert ours == {k: list(v) for k, v in manifest.items()}
