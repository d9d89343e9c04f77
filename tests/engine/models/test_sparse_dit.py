"""SparseDiT: official parity fixtures (natural and injected selection), batching, v1.0 condition
tokens, and the full-size key sets on the meta device."""

import json

import pytest
import torch

from engine.configs import SparseDiTConfig, config_from_params, release_config
from engine.models.sparse_dit import SparseDiT, sparse_condition_tokens
from engine.sparse import SparseVoxels


def within_tolerance(ours, ref, tol):
    """The parity fixtures' rule: relative L2 and max-abs error both within `tol`."""
    diff = ours.double().flatten() - ref.double().flatten()
    rel, worst = (diff.norm() / ref.double().norm()).item(), diff.abs().max().item()
    return rel <= tol["rel_l2"] and worst <= tol["max_abs"], rel, worst


def load_parity_model(fx):
    config = config_from_params("sparse_dit_512", fx["constructor_params"])
    model = SparseDiT(config, ssa_backend="torch").eval()
    model.load_state_dict(fx["state_dict"], strict=True)
    for block in model.blocks:
        block.self_attn.record_selection = True
    return model


def fixture_condition(fx, tag):
    inputs = fx["inputs"]
    if "cond_coords" in inputs:  # v1.0: sparse condition tokens
        return SparseVoxels(inputs[f"{tag}_feats"], inputs["cond_coords"])
    return inputs[tag]


def stack_conditions(first, second):
    """Two batch-1 conditions as one batch of two."""
    if isinstance(first, SparseVoxels):
        coords = second.coords.clone()
        coords[:, 0] = 1
        return SparseVoxels(torch.cat([first.feats, second.feats]), torch.cat([first.coords, coords]))
    return torch.cat([first, second])


def batch_of_two(x: SparseVoxels) -> SparseVoxels:
    second = x.coords.clone()
    second[:, 0] = 1
    return SparseVoxels(torch.cat([x.feats, x.feats]), torch.cat([x.coords, second]))


@pytest.fixture(scope="module", params=["sparse_dit_v10.pt", "sparse_dit_v11.pt"])
def parity(request, parity_fixture):
    fx = parity_fixture(request.param)
    model = load_parity_model(fx)
    x = SparseVoxels(fx["inputs"]["x"], fx["inputs"]["coords"])
    outputs, selections = {}, {}
    with torch.no_grad():
        for tag in ("cond", "uncond"):
            outputs[tag] = model(x, fx["inputs"]["t"], fixture_condition(fx, tag)).feats
            selections[tag] = [block.self_attn.last_block_topk[0] for block in model.blocks]
    return fx, model, x, outputs, selections


def test_parity_natural_selection(parity):
    fx, _, _, outputs, selections = parity
    for tag in ("cond", "uncond"):
        ours = outputs[tag]
        assert ours.dtype == fx["outputs"][f"out_{tag}"].dtype and ours.shape == fx["outputs"][f"out_{tag}"].shape
        ok, rel, mx = within_tolerance(ours, fx["outputs"][f"out_{tag}"], fx["tolerance_per_output"][f"out_{tag}"])
        assert ok, (tag, rel, mx)
        # near-ties aside, the selection is the official one (fp32 evaluation: at most ~20 rows differ)
        for ours_sel, ref_sel in zip(selections[tag], fx["intermediates"][f"block_topk_{tag}"]):
            assert ours_sel.shape == ref_sel.shape and ours_sel.dtype == torch.int32
            assert (ours_sel != ref_sel).any(-1).float().mean() < 0.02


def test_parity_injected_selection_as_one_batch(parity):
    # cond and uncond as batch elements 0 and 1 of one forward, each with its reference selection
    fx, model, x, _, _ = parity
    refs = fx["intermediates"]
    injected = [[c, u] for c, u in zip(refs["block_topk_cond"], refs["block_topk_uncond"])]
    cond = stack_conditions(fixture_condition(fx, "cond"), fixture_condition(fx, "uncond"))
    with torch.no_grad():
        out = model(batch_of_two(x), fx["inputs"]["t"], cond, block_topk=injected).feats
    n = x.num_voxels
    for tag, rows in (("cond", slice(0, n)), ("uncond", slice(n, 2 * n))):
        tol = fx["tolerance_fixed_selection_per_output"][f"out_{tag}"]
        ok, rel, mx = within_tolerance(out[rows], fx["outputs"][f"out_{tag}"], tol)
        assert ok, (tag, rel, mx)


def test_batch_of_two_equals_two_single_forwards(parity):
    fx, model, x, outputs, selections = parity
    cond = stack_conditions(fixture_condition(fx, "cond"), fixture_condition(fx, "uncond"))
    # inject this model's own natural selections so float noise cannot flip a near-tied top-k
    injected = [[c, u] for c, u in zip(selections["cond"], selections["uncond"])]
    with torch.no_grad():
        out = model(batch_of_two(x), fx["inputs"]["t"], cond, block_topk=injected).feats
    n = x.num_voxels
    assert torch.allclose(out[:n].float(), outputs["cond"].float(), atol=2e-3, rtol=0)
    assert torch.allclose(out[n:].float(), outputs["uncond"].float(), atol=2e-3, rtol=0)


def test_v10_condition_token_extraction(parity_fixture):
    fx = parity_fixture("sparse_dit_v10.pt")
    inputs = fx["inputs"]
    tokens = sparse_condition_tokens(inputs["dense_context"], inputs["cond_mask"])
    assert tokens.coords.dtype == torch.int32
    assert torch.equal(tokens.coords, inputs["cond_coords"])
    assert torch.equal(tokens.feats, inputs["cond_feats"])
    # the same from a pixel mask (14x14 per patch, one foreground pixel is enough)
    pixel_mask = torch.zeros(1, 1, 8 * 14, 8 * 14)
    rows, cols = torch.nonzero(inputs["cond_mask"][0], as_tuple=True)
    pixel_mask[0, 0, rows * 14 + 13, cols * 14 + 5] = 1.0
    from_pixels = sparse_condition_tokens(inputs["dense_context"], pixel_mask)
    assert torch.equal(from_pixels.coords, inputs["cond_coords"]) and torch.equal(from_pixels.feats, inputs["cond_feats"])


def tiny_config(**overrides):
    params = dict(resolution=32, in_channels=4, out_channels=4, model_channels=64, cond_channels=64,
                  num_blocks=2, num_heads=2, num_head_channels=32, num_kv_heads=1, compression_block_size=4,
                  selection_block_size=8, topk=3, compression_version="v2", sparse_conditions=True)
    params.update(overrides)
    return SparseDiTConfig(**params)


def shell_tokens(centre, radius, batch):
    axis = torch.arange(24)
    cells = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    dist = ((cells.double() - torch.tensor(centre)) ** 2).sum(-1).sqrt()
    cells = cells[(dist - radius).abs() < 0.9]
    block, within = cells // 8, cells % 8  # sort_block order: block id (3 blocks per axis), then in-block
    key = ((block[:, 0] * 3 + block[:, 1]) * 3 + block[:, 2]) * 512 + (within[:, 0] * 8 + within[:, 1]) * 8 + within[:, 2]
    cells = cells[torch.argsort(key)]
    return torch.cat([torch.full((cells.shape[0], 1), batch), cells], dim=1).to(torch.int32)


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_unequal_batch_elements_equal_separate_forwards(version):
    torch.manual_seed(0)
    sparse_cond = version == "v2"
    config = tiny_config(compression_version=version, compression_block_size=4 if version == "v2" else 8,
                         sparse_conditions=sparse_cond, cond_channels=64 if sparse_cond else 48)
    model = SparseDiT(config, ssa_backend="torch").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    for block in model.blocks:
        block.self_attn.record_selection = True
    coords = [shell_tokens((11.2, 12.1, 10.7), 6.0, 0), shell_tokens((12.5, 11.0, 11.8), 8.0, 1)]
    feats = [torch.randn(c.shape[0], 4) for c in coords]
    if sparse_cond:
        masks = [torch.rand(1, 3, 3) > 0.3, torch.rand(1, 3, 3) > 0.7]
        conds = [sparse_condition_tokens(torch.randn(1, 14, 64), m) for m in masks]
        conds[1].coords[:, 0] = 1
    else:
        conds = [torch.randn(1, 7, 48), torch.randn(1, 7, 48)]
    t = torch.tensor([640.0, 250.0])
    with torch.no_grad():
        singles, selections = [], []
        for b in range(2):
            c = coords[b].clone()
            c[:, 0] = 0
            cond = conds[b]
            if sparse_cond:
                cond = SparseVoxels(cond.feats, torch.cat([cond.coords[:, :1] * 0, cond.coords[:, 1:]], 1))
            singles.append(model(SparseVoxels(feats[b], c), t[b:b + 1], cond).feats)
            selections.append([block.self_attn.last_block_topk[0] for block in model.blocks])
        batch = SparseVoxels(torch.cat(feats), torch.cat(coords))
        cond = (SparseVoxels(torch.cat([conds[0].feats, conds[1].feats]), torch.cat([conds[0].coords, conds[1].coords]))
                if sparse_cond else torch.cat(conds))
        injected = [[selections[0][i], selections[1][i]] for i in range(2)]
        out = model(batch, t, cond, block_topk=injected).feats
    n0 = coords[0].shape[0]
    assert torch.allclose(out[:n0], singles[0], atol=1e-4)
    assert torch.allclose(out[n0:], singles[1], atol=1e-4)
    # the second element's output really depends on its own timestep and condition
    assert not torch.allclose(singles[0][: min(n0, 10)], out[n0:n0 + min(n0, 10)], atol=1e-2)


@pytest.mark.parametrize("manifest", ["v10_sparse_dit_512.json", "v11_sparse_dit_512.json",
                                      "v10_sparse_dit_1024.json", "v11_sparse_dit_1024.json"])
def test_full_size_keys_match_manifest_on_meta(manifest_dir, manifest):
    data = json.loads((manifest_dir / manifest).read_text())
    name = data["meta"]["config_node"]
    config = release_config(name, data["meta"]["version"])
    with torch.device("meta"):
        model = SparseDiT(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {k: tuple(shape) for k, (shape, _) in data["state_dict"].items()}
    assert ours == expected
    assert sum(v.numel() for v in model.state_dict().values()) == data["meta"]["num_elements"]
    meta_state = {k: torch.empty(shape, device="meta") for k, shape in expected.items()}
    model.load_state_dict(meta_state, strict=True, assign=True)
    # the released SSA settings per block: window shift 0 on even blocks, 4 on odd ones
    shifts = [block.self_attn.shift_window for block in model.blocks]
    assert shifts == [0, 4] * 12
    assert model.blocks[0].self_attn.topk == data["meta"]["params"]["topk"]


def test_forward_with_guidance_matches_two_forwards_and_reuses_caches(parity):
    fx, model, x, outputs, selections = parity
    # fixed selections (this model's own natural ones) keep float noise away from near-tied top-k
    injected = [[c, u] for c, u in zip(selections["cond"], selections["uncond"])]
    with torch.no_grad():
        cond_out, uncond_out = model.forward_with_guidance(
            x, fx["inputs"]["t"], fixture_condition(fx, "cond"), fixture_condition(fx, "uncond"), block_topk=injected)
    assert torch.allclose(cond_out.float(), outputs["cond"].float(), atol=2e-3, rtol=0)
    assert torch.allclose(uncond_out.float(), outputs["uncond"].float(), atol=2e-3, rtol=0)
    # the doubled token set lives in x's cache with its SSA bookkeeping, for the next sampler step
    doubled = x.replace(x.feats).cache["guidance_batch"]
    assert any(key[0] == "ssa_layout" for key in doubled.cache if isinstance(key, tuple))


def test_parity_fp16_compute_layers(parity_fixture):
    # the released dtype layout: linear/conv weights fp16, norms and intra_block_pe fp32
    from engine.models import cast_compute_layers

    fx = parity_fixture("sparse_dit_v11.pt")
    model = load_parity_model(fx)
    cast_compute_layers(model, torch.float16)
    assert model.blocks[0].self_attn.proj_q.weight.dtype == torch.float16
    assert model.blocks[0].self_attn.intra_block_pe.dtype == torch.float32
    refs = fx["intermediates"]
    x = SparseVoxels(fx["inputs"]["x"], fx["inputs"]["coords"])
    with torch.no_grad():
        cond_out, uncond_out = model.forward_with_guidance(
            x, fx["inputs"]["t"], fixture_condition(fx, "cond"), fixture_condition(fx, "uncond"),
            block_topk=[[c, u] for c, u in zip(refs["block_topk_cond"], refs["block_topk_uncond"])])
    for tag, ours in (("cond", cond_out), ("uncond", uncond_out)):
        ok, rel, mx = within_tolerance(ours, fx["outputs"][f"out_{tag}"],
                                       fx["tolerance_fixed_selection_per_output"][f"out_{tag}"])
        assert ok, (tag, rel, mx)


def test_window_shift_per_block():
    # official constructor: 0 / window//2 alternating with use_shift, window//2 in every block without
    with torch.device("meta"):
        alternating = SparseDiT(tiny_config(num_blocks=4))
        constant = SparseDiT(tiny_config(num_blocks=4, use_shift=False))
    assert [b.self_attn.shift_window for b in alternating.blocks] == [0, 4, 0, 4]
    assert [b.self_attn.shift_window for b in constant.blocks] == [4, 4, 4, 4]
