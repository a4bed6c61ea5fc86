"""Test setup: Triton through the interpreter on CPU (compiled on a GPU), poisoned torch.empty, tolerances."""

import os
from pathlib import Path

import bench  # noqa: F401  (first: puts the clone's root behind site-packages, so halo_ops is the installed wheel)
import pytest
import torch

# Triton chooses interpreter or compiler when @triton.jit runs, so decide before halo_ops.kernels loads.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# schedule="auto" measures on first use on a GPU (halo_ops.autotune); the suite pins the unmeasured choice, and
# tests/test_autotune.py turns it on where it tests it
os.environ.setdefault("HALO_OPS_AUTOTUNE", "0")

from hypothesis import HealthCheck, settings  # noqa: E402

import halo_ops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if Path(halo_ops.__file__).resolve().parent == ROOT / "halo_ops":
    pytest.exit(f"halo_ops is imported from the source tree ({halo_ops.__file__}), not from an installed wheel: the "
                "suite tests what ships. Install it with `bash .ci/setup-venv` and run `.venv/bin/python -m pytest`.",
                returncode=4)

settings.register_profile(
    "ci", max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

IMPLS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled floats (and -7 ints), so an output element never written fails."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        with torch.no_grad():  # a leaf made with requires_grad=True takes the poison too
            if out.is_floating_point():
                out.fill_(float("nan"))
            elif out.dtype != torch.bool:
                out.fill_(-7)
        return out

    monkeypatch.setattr(torch, "empty", empty)
    yield
