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
