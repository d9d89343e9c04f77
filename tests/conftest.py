"""Shared test fixtures: the reference material beside the checkout and small helpers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers.paths import REPO, SHARED  # noqa: E402
DATA = Path(__file__).resolve().parent / "data"

# One thread: small convolutions get far slower with more threads on the 2-core CI machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``shared/`` reference folder (parity fixtures, images); tests that need it skip without it."""
    if not SHARED.is_dir():
        pytest.skip(f"reference folder {SHARED} not present")
    return SHARED


@pytest.fixture(scope="session")
def parity_fixture(shared_dir):
    """Loader for ``shared/parity/<name>.pt`` (tensors only), skipping when the file is absent."""
    def load(name: str) -> dict:
        path = shared_dir / "parity" / name
        if not path.is_file():
            pytest.skip(f"parity fixture {path} not present")
        return torch.load(path, map_location="cpu", weights_only=True)
    return load


@pytest.fixture(scope="session")
def manifest_dir() -> Path:
    return DATA / "manifests"


def within_tolerance(ours: torch.Tensor, ref: torch.Tensor, tol: dict) -> tuple[bool, float, float]:
    """The parity fixtures' rule: relative L2 and max-abs error both within ``tol``."""
    d = ours.double().flatten() - ref.double().flatten()
    rel = (d.norm() / ref.double().norm().clamp_min(1e-30)).item()
    mx = d.abs().max().item() if d.numel() else 0.0
    return (rel <= tol["rel_l2"] and mx <= tol["max_abs"]), rel, mx
