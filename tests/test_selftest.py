"""``python -m halo_ops.selftest``, as a user runs it from the installed package: every path here against float64,
exit status 0 when all match and non-zero when one does not."""

import os
import subprocess
import sys

import pytest

from halo_ops import selftest


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_selftest_passes_from_the_installed_package(tmp_path, interpret):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret == "1":
        env["TRITON_INTERPRET"] = "1"
    command = [sys.executable, "-m", "halo_ops.selftest", "--tokens", "256", "--hidden", "32", "--vocab", "500",
               "--repeats", "1"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "all paths match float64" in out and "| torch | auto | float32 |" in out and "| halo-ops (auto) |" in out
    triton_rows = [line for line in out.splitlines() if line.startswith("| triton |")]
    if interpret == "1" or "cuda" in out:
        assert {line.split("|")[2].strip() for line in triton_rows} == set(selftest.TRITON_SCHEDULES)
    else:
        assert not triton_rows  # the CPU without the interpreter: the PyTorch path only
    if "trl 1" in out:
        assert "| trl |" in out


def test_selftest_exits_non_zero_on_a_mismatch(monkeypatch, capsys):
    monkeypatch.setattr(selftest, "TOLERANCE", {dtype: 1e-12 for dtype in selftest.TOLERANCE})
    assert selftest.main(["--device", "cpu", "--no-timing"]) == 1
    assert "FAILED" in capsys.readouterr().out
