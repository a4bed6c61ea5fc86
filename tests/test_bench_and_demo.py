"""Smoke tests for the README's commands: the benchmark CLI and the demo run end to end at tiny sizes."""

import csv

import pytest

from bench import __main__ as bench_cli
from bench import demo


def test_bench_cli_writes_results(tmp_path, capsys):
    bench_cli.main(["--tokens", "64,128", "--hidden", "16", "--vocab", "300", "--dtype", "fp32", "--repeats", "1",
                    "--cases", "forward+backward,forward-only,kto-step", "--seq", "32",
                    "--providers", "halo-ops[torch],plain", "--distribution", "random,peaked",
                    "--out", str(tmp_path), "--name", "smoke"])
    rows = [r for r in csv.DictReader(line for line in open(tmp_path / "smoke.csv") if not line.startswith("#"))]
    assert {r["case"] for r in rows} == {"forward+backward", "forward-only", "kto-step"}
    assert all(float(r["ms"]) > 0 for r in rows)
    assert {r["distribution"] for r in rows if r["case"] == "kto-step"} == {"random", "peaked"}
    assert (tmp_path / "smoke.md").read_text().count("| halo-ops[torch] |") == 8
    assert "wrote" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore")
def test_demo_runs(tmp_path, capsys):
    demo.main(["--batch", "2", "--seq", "16", "--hidden", "16", "--vocab", "500", "--steps", "2", "--kto-batch", "4",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "memory: halo-ops uses" in out and "KTO fine-tune" in out and "DPO fine-tune" in out
    assert (tmp_path / "demo.png").exists()


def test_floor_counts_gemms_at_the_measured_rate(tmp_path, capsys):
    from bench import floor

    (row,) = floor.floor_rows(100.0, [(1000, 2000, 5000)])  # 2·10¹⁰ flops at 100 TFLOP/s: 0.2 ms
    assert row["gemm_ms"] == pytest.approx(0.2) and row["fwd_bwd_floor_ms"] == pytest.approx(0.8)
    floor.main(["--gemm", "64,32,64", "--shapes", "128,16,300", "--out", str(tmp_path)])
    text = (tmp_path / "floor.md").read_text()
    assert "TFLOP/s" in text and "| 128 | 16 | 300 |" in text


def test_gpu_session_summary_reads_every_results_file(tmp_path):
    """The device run's last table: ratios to the measured GEMM floor and to TRL, steps and their outcomes."""
    import json
    import subprocess

    from bench import summary

    bench_cli.main(["--tokens", "64", "--hidden", "16", "--vocab", "300", "--dtype", "fp32", "--repeats", "1",
                    "--cases", "forward+backward", "--providers", "plain", "--out", str(tmp_path), "--name",
                    "schedules"])
    (tmp_path / "floor.json").write_text(json.dumps({"dtype": "float32", "copy_gbps": 10.0, "tflops": 1e-3,
                                                     "gemms": [{"m": 1, "k": 2, "n": 3, "tflops": 1e-3}]}))
    (tmp_path / "steps.tsv").write_text("tests\t12\tok\npeer trl\t0\tskipped: the run is out of time\n")
    text = summary.summarize(tmp_path)
    assert "| peer trl | 0 | skipped: the run is out of time |" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| plain | forward+backward")]
    over_floor = float(row.split("|")[7])
    (measured,) = summary.read_rows(tmp_path)[0]
    floor_ms = 4 * 2 * 64 * 16 * 300 / 1e9 * 1e3  # 4 GEMMs at 1 GFLOP/s
    assert over_floor == pytest.approx(float(measured["ms"]) / floor_ms, abs=0.006)
    for script in ("bench/gpu_session.sh", "bench/fetch_wheels.sh"):
        subprocess.run(["bash", "-n", script], check=True)


def _csv_rows(path):
    return list(csv.DictReader(line for line in open(path) if not line.startswith("#")))


def test_a_failing_provider_costs_only_its_own_row(tmp_path, monkeypatch):
    from bench import providers

    broken = providers.Provider("broken", providers._fault_raise, providers._always)
    monkeypatch.setitem(providers.PROVIDERS, "broken", broken)
    bench_cli.main(["--tokens", "64", "--hidden", "16", "--vocab", "300", "--dtype", "fp32", "--repeats", "1",
                    "--cases", "forward+backward", "--providers", "halo-ops[torch],broken,plain",
                    "--out", str(tmp_path), "--name", "faults"])
    rows = {r["provider"]: r for r in _csv_rows(tmp_path / "faults.csv")}
    assert rows["broken"]["note"].startswith("failed: RuntimeError: injected fault") and not rows["broken"]["ms"]
    assert float(rows["halo-ops[torch]"]["ms"]) > 0 and float(rows["plain"]["ms"]) > 0
    assert float(rows["plain"]["peak_mib"]) > 0


def test_a_run_stopped_at_its_deadline_keeps_every_measured_row(tmp_path):
    """The CSV is rewritten after each row: a run killed while a provider hangs keeps the rows before it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "HALO_BENCH_FAULTS": "1"}
    command = [sys.executable, "-m", "bench", "--tokens", "64", "--hidden", "16", "--vocab", "300", "--dtype", "fp32",
               "--repeats", "1", "--cases", "forward-only", "--providers", "plain,fault-hang,halo-ops[torch]",
               "--out", str(tmp_path), "--name", "deadline"]
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(command, cwd=Path(__file__).resolve().parents[1], env=env, timeout=30, capture_output=True)
    rows = {r["provider"]: r for r in _csv_rows(tmp_path / "deadline.csv")}
    assert float(rows["plain"]["ms"]) > 0
    assert rows["fault-hang"]["note"].startswith("not measured") and rows["halo-ops[torch]"]["note"].startswith(
        "not measured")


def test_device_run_halves_fit_their_budgets():
    """Each half of bench/gpu_session.sh on a GPU: its steps' deadlines add up to at most its budget, under 6
    minutes, so that both halves and a rerun fit a 15-minute device window."""
    import re
    from pathlib import Path

    script = (Path(__file__).resolve().parents[1] / "bench" / "gpu_session.sh").read_text()
    gpu = script.split("else\n", 1)[1].split("\nfi\n", 1)[0]  # the non-smoke branch of the settings
    t = {name: int(value) for name, value in re.findall(r"\bT_([A-Z]+)=(\d+)", gpu)}
    budget = int(re.search(r"BUDGET=(\d+)", gpu).group(1))
    first = 2 * t["SETUP"] + t["ENV"] + t["WARM"] + t["TESTS"] + t["FLOOR"] + t["SCHED"] + t["PEER"] + t["KTO"] \
        + t["FROZEN"] + t["LOSS"]
    second = 2 * t["SETUP"] + t["ENV"] + t["AUTO"] + t["SWEEP"] + 4 * t["PEER"] + t["COMPILE"]
    assert first <= budget and second <= budget and budget < 360, (first, second, budget)
    assert script.count("table \"peer $peer\"") == 1 and "for peer in cce plain torch.linear_cross_entropy " \
        "cce-no-filter; do" in script  # the four peers the second sum counts


def test_a_failing_peak_measurement_keeps_the_rows_time(tmp_path, monkeypatch):
    real_peak = bench_cli.peak_row

    def peak_row(provider, *args):
        if provider.name == "plain":
            raise RuntimeError("injected peak failure")
        return real_peak(provider, *args)

    monkeypatch.setattr(bench_cli, "peak_row", peak_row)
    bench_cli.main(["--tokens", "64", "--hidden", "16", "--vocab", "300", "--dtype", "fp32", "--repeats", "1",
                    "--cases", "forward-only", "--providers", "halo-ops[torch],plain", "--out", str(tmp_path),
                    "--name", "peak"])
    rows = {r["provider"]: r for r in _csv_rows(tmp_path / "peak.csv")}
    assert float(rows["plain"]["ms"]) > 0 and not rows["plain"]["peak_mib"]
    assert rows["plain"]["note"].startswith("peak memory failed: RuntimeError: injected peak failure")
    assert float(rows["halo-ops[torch]"]["peak_mib"]) > 0
