"""Lowering Triton kernels to sm_90 machine code on a machine without a GPU (Triton's bundled ptxas).

The interpreter accepts some programs the compiler rejects, so each kernel test module also compiles
its full-size configurations ahead of time with a script of its own, run here in a fresh process
without TRITON_INTERPRET.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def compile_for_sm90(script: str, timeout: int = 600) -> str:
    """Run ``script`` (Python source) with the repository importable and the interpreter off; returns
    its standard output. Skips the test when Triton's NVIDIA backend or its ptxas is not available;
    fails it, with the end of standard error, when the script fails."""
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
