"""Weights: strict loading of the official layout, version detection, integrity errors, offline cache."""
import shutil
from pathlib import Path

import pytest
import torch

from helpers.tiny_weights import cached_tiny_weights
from engine import weights as W
from engine.weights import (CHECKPOINT_FILES, WeightsError, check_folder, detect_version_from_state, inspect_folder,
                            load_models, read_checkpoint, resolve_weights)


@pytest.fixture
def tiny_copy(tmp_path):
    def copy(version="v1.1"):
        return Path(shutil.copytree(cached_tiny_weights(version), tmp_path / f"weights-{version}"))
    return copy


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to download fails the test."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args} {kwargs}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_tiny_folder_loads_strictly_and_detects_version(version):
    folder = cached_tiny_weights(version)
    loaded = load_models(folder, device="cpu", dtype=torch.float32)
    assert loaded.version == version
    assert loaded.release is None  # a scaled-down config.yaml is not a release
    assert set(loaded.models) == set(W.ALL_MODELS)
    on_disk = torch.load(folder / "model_sparse_512.ckpt", weights_only=True)["dit"]
    model_state = loaded.models["sparse_dit_512"].state_dict()
    assert set(model_state) == set(on_disk)
    assert all(torch.equal(model_state[k].float(), on_disk[k].float()) for k in on_disk)
    assert ("cond_proj.weight" in model_state) == (version == "v1.0")


def test_fp16_load_keeps_norms_fp32():
    loaded = load_models(cached_tiny_weights("v1.1"), names=("dense_dit", "image_encoder"), device="cpu",
                         dtype=torch.float16)
    dit = loaded.models["dense_dit"]
    assert dit.input_layer.weight.dtype == torch.float16
    assert dit.pos_emb.dtype == torch.float32
    assert next(loaded.models["image_encoder"].parameters()).dtype == torch.float32


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_version_detected_from_tensors_without_config(tiny_copy, version):
    folder = tiny_copy(version)
    (folder / "config.yaml").unlink()
    location = W.WeightsLocation(folder=folder)
    detected, configs, release = inspect_folder(location)
    assert detected == version and release == version
    # without the scaled-down config the release shapes are expected: a clear mismatch error
    with pytest.raises(WeightsError, match=r"model_dense\.ckpt.*does not match.*shape mismatch"):
        load_models(folder, names=("dense_dit",), device="cpu", dtype=torch.float32)


def test_detect_version_rejects_mixed_state():
    assert detect_version_from_state({"blocks.0.self_attn.compression_key.act_layers.0.conv.kernel": 0}) == "v1.1"
    assert detect_version_from_state({"cond_proj.weight": 0,
                                      "blocks.0.self_attn.compression_key.out_layers.0.conv.kernel": 0}) == "v1.0"
    with pytest.raises(WeightsError, match="mix"):
        detect_version_from_state({"cond_proj.weight": 0})


def test_requested_version_must_match(tiny_copy):
    folder = tiny_copy("v1.1")
    with pytest.raises(WeightsError, match="v1.1 weights, but v1.0 was requested"):
        load_models(folder, version="v1.0", device="cpu")


def test_config_yaml_contradicting_the_tensors(tiny_copy):
    folder = tiny_copy("v1.1")
    text = (folder / "config.yaml").read_text().replace("sparse_conditions: false", "sparse_conditions: true")
    (folder / "config.yaml").write_text(text)
    with pytest.raises(WeightsError, match="sparse_conditions"):
        load_models(folder, names=("dense_vae",), device="cpu")


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated"),
    ("empty", "empty"),
    ("wrong_keys", "lacks the top-level key"),
    ("not_a_dict", "expected a dict"),
    ("non_tensor", "non-tensor"),
    ("pickled_object", "tensors-only"),
    ("wrong_shapes", "shape mismatch"),
])
def test_damaged_checkpoint_is_named(tiny_copy, damage, message):
    folder = tiny_copy("v1.1")
    path = folder / "model_refiner_1024.ckpt"
    original = torch.load(path, weights_only=True)
    if damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "wrong_keys":
        torch.save({"model": original["refiner"]}, path)
    elif damage == "not_a_dict":
        torch.save([original["refiner"]], path)
    elif damage == "non_tensor":
        torch.save({"refiner": {"conv_in.weight": [1, 2, 3]}}, path)
    elif damage == "pickled_object":
        torch.save({"refiner": original["refiner"], "extra": Path("/")}, path)
    elif damage == "wrong_shapes":
        state = dict(original["refiner"])
        state["conv_in.weight"] = torch.zeros(3, 3)
        torch.save({"refiner": state}, path)
    with pytest.raises(WeightsError, match=message) as info:
        load_models(folder, names=("refiner_1024",), device="cpu")
    assert "model_refiner_1024.ckpt" in str(info.value)
    # the integrity check reports that file (and only it) as failed
    reports = {r.path.name: r for r in check_folder(folder)}
    assert not reports["model_refiner_1024.ckpt"].ok
    assert all(r.ok for name, r in reports.items() if name != "model_refiner_1024.ckpt")


def test_read_checkpoint_payload_larger_than_file(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"vae": {"w": torch.zeros(10)}}, path)
    assert read_checkpoint(path, ("vae",))["vae"]["w"].shape == (10,)
    with pytest.raises(WeightsError, match="lacks"):
        read_checkpoint(path, ("vae", "dit"))


def test_local_folder_missing_file_is_named(tiny_copy):
    folder = tiny_copy("v1.1")
    (folder / "model_sparse_1024.ckpt").unlink()
    with pytest.raises(WeightsError, match=r"missing model_sparse_1024\.ckpt"):
        resolve_weights(folder)
    with pytest.raises(WeightsError, match="Weights folder not found"):
        resolve_weights(folder / "nope")


def _fake_hub_cache(root: Path, tiny: Path, version: str = "v1.1") -> Path:
    """The Hugging Face cache layout (refs/main -> snapshots/<commit>/...) with the tiny files."""
    from safetensors.torch import save_file
    from engine.models.dinov2 import original_to_hf_state_dict

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "models--wushuang98--Direct3D-S2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    subfolder = repo / "snapshots" / commit / W.SUBFOLDERS[version]
    subfolder.mkdir(parents=True)
    for name in CHECKPOINT_FILES + ("config.yaml",):
        shutil.copy(tiny / name, subfolder / name)
    dino = root / "models--facebook--dinov2-with-registers-large"
    (dino / "refs").mkdir(parents=True)
    (dino / "refs" / "main").write_text(commit)
    (dino / "snapshots" / commit).mkdir(parents=True)
    original = torch.load(tiny / W.DINOV2_ORIGINAL_FILE, weights_only=True)
    hf = {k: v.contiguous() for k, v in original_to_hf_state_dict(original).items()}
    save_file(hf, str(dino / "snapshots" / commit / W.DINOV2_HF_FILE))
    return subfolder


def test_offline_fake_cache_resolves_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    subfolder = _fake_hub_cache(tmp_path / "hub", cached_tiny_weights("v1.1"))
    location = resolve_weights(None, "v1.1", cache_dir=tmp_path / "hub")
    assert location.folder == subfolder
    assert location.image_encoder.name == "model.safetensors"
    loaded = load_models(location, names=("image_encoder", "dense_vae"), device="cpu", dtype=torch.float32)
    assert loaded.version == "v1.1"  # DINOv2 came from the Hugging Face layout


def test_offline_names_exactly_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    subfolder = _fake_hub_cache(tmp_path / "hub", cached_tiny_weights("v1.1"))
    (subfolder / "model_refiner.ckpt").unlink()
    with pytest.raises(WeightsError) as info:
        resolve_weights(None, "v1.1", cache_dir=tmp_path / "hub")
    text = str(info.value)
    assert "wushuang98/Direct3D-S2/direct3d-s2-v-1-1/model_refiner.ckpt" in text
    assert "offline" in text and "model_dense.ckpt" not in text
    # another release is simply absent from the cache
    with pytest.raises(WeightsError, match="direct3d-s2-v-1-0/model_dense.ckpt"):
        resolve_weights(None, "v1.0", cache_dir=tmp_path / "hub", offline=True)


def test_offline_missing_dinov2_is_named(tmp_path):
    subfolder = _fake_hub_cache(tmp_path / "hub", cached_tiny_weights("v1.1"))
    shutil.rmtree(tmp_path / "hub" / "models--facebook--dinov2-with-registers-large")
    with pytest.raises(WeightsError, match="DINOv2.*facebook/dinov2-with-registers-large/model.safetensors"):
        resolve_weights(None, "v1.1", cache_dir=tmp_path / "hub", offline=True)
    assert subfolder.is_dir()


def test_unknown_version_rejected():
    with pytest.raises(WeightsError, match="Unknown Direct3D-S2 version"):
        resolve_weights(None, "v2.0", offline=True)


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_official_format_config_yaml_is_read_and_checked(tmp_path, manifest_dir, version):
    """A config.yaml in the official format (params as in the released files, taken from the manifests'
    constructor params) is recognised as the release; one contradicting the tensors is refused."""
    import json
    import yaml
    tag = version.replace(".", "")
    nodes = {}
    for node in ("dense_vae", "dense_dit", "sparse_vae_512", "sparse_dit_512", "sparse_vae_1024",
                 "sparse_dit_1024", "refiner", "refiner_1024"):
        meta = json.loads((manifest_dir / f"{tag}_{node}.json").read_text())["meta"]
        nodes[node] = {"target": meta["class"], "params": meta["params"]}
    for node, shift in (("dense_scheduler", 6.0), ("sparse_scheduler_512", 6.0), ("sparse_scheduler_1024", 8.0)):
        nodes[node] = {"target": "diffusers.schedulers.FlowMatchEulerDiscreteScheduler",
                       "params": {"num_train_timesteps": 1000, "shift": shift}}
    for node in ("dense_image_encoder", "sparse_image_encoder"):
        nodes[node] = {"target": "direct3d_s2.models.conditioner.DinoEncoder",
                       "params": {"model": "facebookresearch/dinov2", "version": "dinov2_vitl14_reg", "size": 518}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(nodes))
    location = W.WeightsLocation(folder=tmp_path)
    configs, release = W.read_folder_configs(location, version)
    assert release == version
    assert configs["sparse_scheduler_1024"].shift == 8.0
    other = "v1.0" if version == "v1.1" else "v1.1"
    with pytest.raises(WeightsError, match=f"describes release {version}"):
        W.read_folder_configs(location, other)


def test_download_uses_allow_patterns_and_progress(tmp_path, monkeypatch):
    """The download path with huggingface_hub replaced by a fake that fills the cache like the hub would."""
    import huggingface_hub
    tiny = cached_tiny_weights("v1.1")
    calls = []
    commit = "fedcba9876543210fedcba9876543210fedcba98"

    def fake_snapshot_download(repo_id, allow_patterns=None, cache_dir=None, tqdm_class=None, **kwargs):
        calls.append((repo_id, list(allow_patterns), tqdm_class is not None))
        repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        snapshot = repo / "snapshots" / commit
        if repo_id == W.REPO_ID:
            (snapshot / "direct3d-s2-v-1-1").mkdir(parents=True)
            for name in CHECKPOINT_FILES + ("config.yaml",):
                shutil.copy(tiny / name, snapshot / "direct3d-s2-v-1-1" / name)
        else:
            from safetensors.torch import save_file
            from engine.models.dinov2 import original_to_hf_state_dict
            snapshot.mkdir(parents=True)
            original = torch.load(tiny / W.DINOV2_ORIGINAL_FILE, weights_only=True)
            save_file({k: v.contiguous() for k, v in original_to_hf_state_dict(original).items()},
                      str(snapshot / W.DINOV2_HF_FILE))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    location = W.download_weights("v1.1", cache_dir=tmp_path / "hub")
    assert calls == [(W.REPO_ID, ["direct3d-s2-v-1-1/*"], True),
                     (W.DINOV2_REPO_ID, [W.DINOV2_HF_FILE, "config.json"], True)]
    assert location.folder.name == "direct3d-s2-v-1-1" and location.image_encoder.is_file()
    assert all(report.ok for report in check_folder(location))
    # a second call finds everything in the cache and downloads nothing
    W.download_weights("v1.1", cache_dir=tmp_path / "hub")
    assert len(calls) == 2
