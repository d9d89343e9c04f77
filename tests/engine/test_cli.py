"""The command line, run as a subprocess like a user would, on tiny weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from helpers.tiny_weights import cached_tiny_weights
from helpers.paths import SHARED

REPO = Path(__file__).resolve().parents[2]
IMAGES = SHARED / "images"


def run_cli(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    if (IMAGES / "2.png").is_file():
        return IMAGES / "2.png"
    yy, xx = np.mgrid[0:80, 0:80]
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[..., 2] = 200
    rgba[..., 3] = np.where(abs(xx - 40) + abs(yy - 40) < 25, 255, 0)
    path = tmp_path_factory.mktemp("img") / "diamond.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return path


@pytest.mark.parametrize("resolution, suffix, extra", [(512, ".obj", ["--target-faces", 800]), (1024, ".glb", [])])
def test_generate_writes_mesh_and_summary(tmp_path, image_path, resolution, suffix, extra):
    out = tmp_path / f"mesh{suffix}"
    stats_path = tmp_path / "stats.json"
    result = run_cli("generate", image_path, "-o", out, "--weights", cached_tiny_weights("v1.1"),
                     "--resolution", resolution, "--steps-dense", 1, "--steps-512", 1, "--steps-1024", 1,
                     "--seed", 4, "--device", "cpu", "--dtype", "fp32", "--stats-json", stats_path, *extra)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file()
    mesh = trimesh.load(out, force="mesh")
    assert len(mesh.faces) > 0
    stats = json.loads(stats_path.read_text())
    assert stats["resolution"] == resolution and stats["faces"] == len(mesh.faces)
    assert "sparse_512" in stats["tokens"] and ("sparse_1024" in stats["tokens"]) == (resolution == 1024)
    # summary table on stdout, progress bars on stderr
    assert "stage" in result.stdout and "peak GPU memory" in result.stdout and f"wrote {out}" in result.stdout
    assert "dense" in result.stderr and "refine_512" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["-o", "OUT.stl"], "must end in"),
    (["-o", "missing-folder/out.glb"], "does not exist"),
    (["-o", "OUT.glb", "--resolution", "768"], "invalid choice"),
    (["-o", "OUT.glb", "--steps-dense", "0"], "positive integer"),
    (["-o", "OUT.glb", "--device", "cuda:0"], "CUDA is not available"),
])
def test_generate_rejects_bad_arguments(tmp_path, image_path, args, message):
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    if "cuda:0" in args:
        import torch
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
    result = run_cli("generate", image_path, *args, "--weights", cached_tiny_weights("v1.1"))
    assert result.returncode == 2
    assert message in result.stderr


def test_generate_missing_image_and_missing_weights(tmp_path, image_path):
    result = run_cli("generate", tmp_path / "none.png", "-o", tmp_path / "o.glb")
    assert result.returncode == 2 and "image file not found" in result.stderr
    empty = tmp_path / "empty-weights"
    empty.mkdir()
    result = run_cli("generate", image_path, "-o", tmp_path / "o.glb", "--weights", empty, "--device", "cpu")
    assert result.returncode == 1 and "missing model_dense.ckpt" in result.stderr
    result = run_cli("generate", image_path, "-o", tmp_path / "o.glb", "--version", "v1.0", "--offline",
                     "--cache-dir", tmp_path / "no-cache", "--device", "cpu")
    assert result.returncode == 1
    assert "direct3d-s2-v-1-0/model_dense.ckpt" in result.stderr and "offline" in result.stderr


def test_weights_check(tmp_path):
    good = run_cli("weights", "check", "--dir", cached_tiny_weights("v1.0"))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "6 ok, 0 failed" in good.stdout
    import shutil
    broken = Path(shutil.copytree(cached_tiny_weights("v1.1"), tmp_path / "w"))
    data = (broken / "model_dense.ckpt").read_bytes()
    (broken / "model_dense.ckpt").write_bytes(data[:1000])
    bad = run_cli("weights", "check", "--dir", broken)
    assert bad.returncode == 1
    assert "FAIL" in bad.stdout and "model_dense.ckpt" in bad.stdout


def test_worker_subcommand_calls_engine_worker(monkeypatch):
    from engine import cli, worker
    seen = []
    monkeypatch.setattr(worker, "main", lambda argv=None: seen.append(argv) or 7)
    assert cli.main(["worker", "--log-level", "debug"]) == 7
    assert seen == [["--log-level", "debug"]]


def test_summary_table_lists_stages():
    from engine.cli import format_summary
    text = format_summary({"tokens": {"sparse_512": 1234}, "seconds": {"dense": 1.5, "sparse_512": 2.25},
                           "total_seconds": 4.0, "peak_gpu_memory_bytes": 3 * 2 ** 30, "faces": 10, "vertices": 7,
                           "version": "v1.1", "resolution": 512, "seed": 0})
    assert "1,234" in text and "2.25" in text and "3.00 GiB" in text and "10 faces" in text
