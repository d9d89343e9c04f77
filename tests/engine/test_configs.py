import dataclasses

import pytest

from engine import configs


def test_release_values_differ_only_in_sparse_dits():
    v10, v11 = configs.OFFICIAL_CONFIGS["v1.0"], configs.OFFICIAL_CONFIGS["v1.1"]
    differing = sorted(n for n in v10 if v10[n] != v11[n])
    assert differing == ["sparse_dit_1024", "sparse_dit_512"]
    assert v10["sparse_dit_512"].topk == 32 and v11["sparse_dit_512"].topk == 8
    assert v11["sparse_dit_1024"].factor == 0.5 and v11["sparse_scheduler_1024"].shift == 8.0


def test_yaml_round_trip_and_release_detection(tmp_path):
    for version in configs.VERSIONS:
        path = tmp_path / f"{version}.yaml"
        configs.write_official_yaml(path, configs.OFFICIAL_CONFIGS[version])
        read = configs.read_official_yaml(path)
        assert read == configs.OFFICIAL_CONFIGS[version]
        assert configs.detect_release(read) == version
        assert configs.differences(read, version) == []


def test_official_params_map_onto_dataclasses(manifest_dir):
    import json
    for entry in json.loads((manifest_dir / "index.json").read_text())["entries"]:
        params = json.loads((manifest_dir / entry["manifest"]).read_text())["meta"]["params"]
        cfg = configs.config_from_params(entry["config_node"], params,
                                         base=configs.release_config(entry["config_node"], entry["version"]))
        assert cfg == configs.release_config(entry["config_node"], entry["version"]), entry["manifest"]


def test_unknown_parameter_and_node_are_reported(tmp_path):
    with pytest.raises(ValueError, match="unknown parameters"):
        configs.config_from_params("dense_dit", {"num_blocks": 2, "wings": 3})
    bad = tmp_path / "config.yaml"
    bad.write_text("mystery_node:\n  params: {}\n")
    with pytest.raises(ValueError, match="unknown config node"):
        configs.read_official_yaml(bad)
    tiny = dataclasses.replace(configs.release_config("sparse_dit_512", "v1.1"), num_blocks=2)
    assert "sparse_dit_512.num_blocks: 2" in configs.differences({"sparse_dit_512": tiny}, "v1.1")[0]
