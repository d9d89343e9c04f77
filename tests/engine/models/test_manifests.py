"""Every model of both releases, built on the meta device, has exactly the official keys and shapes."""
import json

import pytest
import torch

from engine.models import build, parameter_count

ENTRIES = json.load(open(__import__("pathlib").Path(__file__).resolve().parents[2] / "data" / "manifests" / "index.json"))["entries"]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: f"{e['version']}-{e['config_node']}")
def test_state_dict_matches_manifest(entry, manifest_dir):
    manifest = json.loads((manifest_dir / entry["manifest"]).read_text())["state_dict"]
    model = build(entry["config_node"], entry["version"], device="meta", dtype=torch.float16)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = {k: shape for k, (shape, _dtype) in manifest.items()}
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    assert not missing and not unexpected, f"missing {missing[:10]}, unexpected {unexpected[:10]}"
    wrong = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert not wrong, f"shape mismatches: {dict(list(wrong.items())[:10])}"
    assert parameter_count(model) == entry["num_elements"]


def test_meta_build_allocates_nothing():
    model = build("sparse_dit_1024", "v1.1", device="meta")
    assert all(p.is_meta for p in model.parameters())
