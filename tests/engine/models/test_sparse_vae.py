"""Sparse SDF VAE: official key layout, parity with the official decoder, chunked decoding, encoder."""

import dataclasses
import json

import pytest
import torch

from engine.configs import SparseVAEConfig
from engine.models import build, cast_compute_layers
from engine.models.sparse_vae import SparseSDFDecoder, SparseSDFEncoder, SparseSDFVAE
from engine.sparse import SparseVoxels, linearize_coords


def canonical_order(coords):
    """Stable sort by (batch, x, y, z), the order of the parity fixtures' sparse outputs."""
    c = coords.long()
    return torch.sort(linearize_coords(c, int(c.max()) + 1), stable=True).indices


def close(ours, ref, tol):
    d = ours.double().flatten() - ref.double().flatten()
    rel, mx = (d.norm() / ref.double().norm()).item(), d.abs().max().item()
    return rel <= tol["rel_l2"] and mx <= tol["max_abs"], rel, mx


def decoder_config(params):
    """Official SparseSDFDecoder constructor params -> our SparseVAEConfig."""
    assert params["num_head_channels"] * params["num_heads"] == params["model_channels"]
    return SparseVAEConfig(
        embed_dim=params["latent_channels"], model_channels_decoder=params["model_channels"],
        num_blocks_decoder=params["num_blocks"], num_heads_decoder=params["num_heads"],
        num_head_channels_decoder=params["num_head_channels"], resolution=params["resolution"],
        chunk_size=params["chunk_size"], window_size=params["window_size"], mlp_ratio=params["mlp_ratio"],
        out_channels=params["out_channels"])


def tiny_config(**changes):
    base = SparseVAEConfig(embed_dim=4, model_channels_encoder=64, num_blocks_encoder=2, num_heads_encoder=2,
                           num_head_channels_encoder=32, model_channels_decoder=32, num_blocks_decoder=2,
                           num_heads_decoder=2, num_head_channels_decoder=16, resolution=8, chunk_size=2)
    return dataclasses.replace(base, **changes)


def ball_latents(resolution, radius, channels, seed=0, centre=None):
    grid = torch.stack(torch.meshgrid(*[torch.arange(resolution)] * 3, indexing="ij"), -1).reshape(-1, 3)
    centre = torch.tensor(centre if centre is not None else [resolution / 2 - 0.3] * 3)
    xyz = grid[((grid.float() + 0.5 - centre).norm(dim=1) <= radius)]
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1).int()
    feats = torch.randn(len(xyz), channels, generator=torch.Generator().manual_seed(seed))
    return SparseVoxels(feats, coords)


# ---------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("manifest_name,model_name", [
    ("v11_sparse_vae_512.json", "sparse_vae_512"), ("v11_sparse_vae_1024.json", "sparse_vae_1024"),
    ("v10_sparse_vae_512.json", "sparse_vae_512"), ("v10_sparse_vae_1024.json", "sparse_vae_1024")])
def test_full_size_keys_shapes_and_dtypes_match_manifest(manifest_dir, manifest_name, model_name):
    manifest = json.loads((manifest_dir / manifest_name).read_text())
    version = manifest["meta"]["version"]
    model = build(model_name, version, device="meta", dtype=torch.float16)
    state = model.state_dict()
    expected = manifest["state_dict"]
    assert set(state) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert list(state[key].shape) == shape, key
        assert str(state[key].dtype) == f"torch.{dtype}", key
    assert sum(t.numel() for t in state.values()) == manifest["meta"]["num_elements"] == 37_874_113
    assert model.decoder.chunk_size == manifest["meta"]["params"].get("chunk_size", 1)


# ---------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fixture_name", ["sparse_vae_decoder.pt", "sparse_vae_decoder_chunked.pt"])
def test_decoder_matches_official_fixture(parity_fixture, fixture_name, dtype):
    fx = parity_fixture(fixture_name)
    config = decoder_config(fx["constructor_params"])
    vae = SparseSDFVAE(dataclasses.replace(config, model_channels_encoder=512)).eval()
    # the fixture's keys are the VAE's `decoder.*` keys without the prefix
    missing, unexpected = vae.load_state_dict({f"decoder.{k}": v for k, v in fx["state_dict"].items()},
                                              strict=False)
    assert not unexpected and all(k.startswith("encoder.") for k in missing)
    # fp16: compute layers in fp16 as the official use_fp16 (the fixture's own dtype); fp32 also passes
    decoder = cast_compute_layers(SparseSDFDecoder(config).eval(), dtype)
    decoder.load_state_dict(fx["state_dict"], strict=True)

    latents = SparseVoxels(fx["inputs"]["latents"].to(dtype), fx["inputs"]["coords"])
    with torch.no_grad():
        result = decoder(latents, return_feat=True)  # chunked per config.chunk_size, as official eval
    sdf, feat = result
    assert sdf.dtype == dtype
    order = canonical_order(sdf.coords)
    assert sdf.num_voxels == fx["intermediates"]["num_rows"]
    assert torch.equal(sdf.coords[order], fx["outputs"]["coords"])
    # we emit the official row order too (tokens in input order, each followed by its children; chunks
    # in loop order i, j, k), so the fixture's official-row map applies to our rows unchanged
    official_rows = fx["outputs"]["canonical_from_official"].long()
    assert torch.equal(sdf.coords[official_rows], fx["outputs"]["coords"])
    outputs = {"sdf": sdf.feats[order], "feat": feat.feats[order]}
    for name, rule in fx["compare"].items():
        if rule == "tolerance" and name in fx["outputs"]:
            ok, rel, mx = close(outputs[name], fx["outputs"][name], fx["tolerance_per_output"][name])
            assert ok, f"{name}: rel_l2 {rel:.2e} max_abs {mx:.2e} vs {fx['tolerance_per_output'][name]}"


# ---------------------------------------------------------------------------------------- chunking
def test_chunked_decoding_equals_unchunked_and_deduplicates():
    torch.manual_seed(0)
    config = tiny_config(resolution=8, chunk_size=2)
    decoder = SparseSDFDecoder(config).eval()
    latents = ball_latents(8, 2.6, config.embed_dim, centre=[3.7, 4.2, 4.4])
    with torch.no_grad():
        full_sdf, full_feat = decoder(latents, return_feat=True, chunked=False)
        chunked = decoder(latents)  # eval + chunk_size 2 -> chunked, duplicates as official
        unique_sdf, unique_feat = decoder(latents, return_feat=True, deduplicate=True)

    full_order = canonical_order(full_sdf.coords)
    full_coords, full_values = full_sdf.coords[full_order], full_sdf.feats[full_order]
    assert full_sdf.num_voxels == latents.num_voxels * 512
    # unique coordinates in the full decode
    assert torch.unique(full_coords, dim=0).shape[0] == full_coords.shape[0]

    # deduplicated chunked decode: the same voxels and values as the unchunked one
    order = canonical_order(unique_sdf.coords)
    assert torch.equal(unique_sdf.coords[order], full_coords)
    torch.testing.assert_close(unique_sdf.feats[order], full_values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unique_feat.feats[order], full_feat.feats[full_order], rtol=1e-5, atol=1e-6)

    # official chunking: every fine voxel in [start*8, end*8+7) of each chunk, values equal to unchunked
    half = 4 * 8
    fine = full_coords[:, 1:].long()
    copies = torch.ones(len(fine), dtype=torch.long)
    for axis in range(3):
        # a voxel in the 7 fine voxels after a chunk's end is also kept by that chunk
        copies *= 1 + ((fine[:, axis] >= half) & (fine[:, axis] < half + 7)).long()
    expected_coords = full_coords.repeat_interleave(copies, dim=0)
    order = canonical_order(chunked.coords)
    assert torch.equal(chunked.coords[order], expected_coords)
    torch.testing.assert_close(chunked.feats[order], full_values.repeat_interleave(copies, dim=0),
                               rtol=1e-5, atol=1e-6)
    assert chunked.num_voxels > full_sdf.num_voxels


def test_chunk_size_override_with_deduplication_equals_unchunked():
    torch.manual_seed(3)
    config = tiny_config(resolution=8, chunk_size=1)
    decoder = SparseSDFDecoder(config).eval()
    latents = ball_latents(8, 2.9, config.embed_dim, seed=5)
    with torch.no_grad():
        full, full_feat = decoder(latents, return_feat=True)  # chunk_size 1: unchunked
        pieces, piece_feat = decoder(latents, return_feat=True, chunk_size=3, deduplicate=True)
    assert decoder.chunk_bounds(3) == [(0, 3), (3, 6), (6, 9)]
    a, b = canonical_order(full.coords), canonical_order(pieces.coords)
    assert torch.equal(full.coords[a], pieces.coords[b])
    torch.testing.assert_close(pieces.feats[b], full.feats[a], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(piece_feat.feats[b], full_feat.feats[a], rtol=1e-5, atol=1e-6)
    outside = SparseVoxels(latents.feats[:1], torch.tensor([[0, 9, 0, 0]], dtype=torch.int32))
    with pytest.raises(ValueError):
        decoder(outside, chunk_size=3)


@pytest.mark.parametrize("chunked", [False, True])
def test_decoding_no_tokens_gives_empty_outputs(chunked):
    config = tiny_config()
    decoder = SparseSDFDecoder(config).eval()
    empty = SparseVoxels(torch.zeros(0, config.embed_dim), torch.zeros(0, 4, dtype=torch.int32))
    with torch.no_grad():
        sdf, feat = decoder(empty, return_feat=True, chunked=chunked)
    assert sdf.feats.shape == (0, 1) and sdf.coords.shape == (0, 4)
    assert feat.feats.shape == (0, config.model_channels_decoder // 16)


def test_training_mode_decodes_unchunked():
    config = tiny_config(chunk_size=2)
    decoder = SparseSDFDecoder(config).train()
    latents = ball_latents(8, 2.0, config.embed_dim)
    sdf = decoder(latents)
    assert sdf.num_voxels == latents.num_voxels * 512  # no duplicates: not the chunked path
    sdf.feats.sum().backward()
    assert decoder.upsample[0].act_layers[0].conv.kernel.grad is not None


# ---------------------------------------------------------------------------------------- encoder
def test_encoder_runs_and_halves_resolution_three_times():
    torch.manual_seed(1)
    config = tiny_config()
    encoder = SparseSDFEncoder(config, norm_groups=2).eval()
    # fine SDF voxels: all children of a small set of latent voxels (a 64^3 fine grid)
    latents = ball_latents(8, 2.0, 1)
    fine_coords = latents.coords.clone()
    for _ in range(3):
        fine_coords = fine_coords.repeat_interleave(8, 0)
        offsets = torch.tensor([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)], dtype=torch.int32)
        fine_coords[:, 1:] = fine_coords[:, 1:] * 2 + offsets.repeat(len(fine_coords) // 8, 1)
    sdf = SparseVoxels(torch.tanh(torch.randn(len(fine_coords), 1)), fine_coords)
    with torch.no_grad():
        mean, logvar = encoder(sdf)
    assert mean.channels == logvar.channels == config.embed_dim
    expected = latents.coords[canonical_order(latents.coords)]
    assert torch.equal(mean.coords, expected)  # downsampling emits sorted coordinates
    assert torch.isfinite(mean.feats).all()
    assert float(logvar.feats.min()) >= -30.0 and float(logvar.feats.max()) <= 20.0
    keys = set(encoder.state_dict())
    assert {"input_layer1.weight", "input_layer.weight", "blocks.1.attn.to_qkv.bias", "out_layer.weight",
            "downsample.2.skip_connection.conv.kernel", "downsample.0.out_layers.3.conv.kernel",
            "downsample.1.act_layers.0.weight", "downsample.1.out_layers.1.bias"} <= keys


def test_vae_state_dict_round_trip_gives_identical_decoding(tmp_path):
    torch.manual_seed(2)
    config = tiny_config(chunk_size=1)
    vae = build("sparse_vae_512", config=config)
    path = tmp_path / "vae.pt"
    torch.save(vae.state_dict(), path)
    reloaded = build("sparse_vae_512", config=config)
    reloaded.load_state_dict(torch.load(path, weights_only=True), strict=True)
    latents = ball_latents(8, 1.8, config.embed_dim, seed=4)
    with torch.no_grad():
        a, b = vae.decode(latents), reloaded.decode(latents)
    assert torch.equal(a.coords, b.coords) and torch.equal(a.feats, b.feats)
    assert torch.equal(vae.unscale_latents(latents.feats), latents.feats)  # release scale 1, shift 0
