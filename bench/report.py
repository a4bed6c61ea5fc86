"""Results files: CSV rows and a Markdown table with device, versions and date, ratios to halo-ops."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import platform
from pathlib import Path

import torch

PEERS = ("torch", "triton", "trl", "liger-kernel", "cut-cross-entropy", "transformers")


def environment(device: torch.device) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version()}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            import subprocess

            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            env["driver"] = "unknown"
    else:
        env["device"] = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    for package in PEERS:
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package] = "not installed"
    return env


def _key(row):
    return row["case"], row["tokens"], row["hidden"], row["vocab"], row["dtype"]


def add_ratios(rows: list[dict], reference: str) -> None:
    """time_x / mem_x: each provider's time and peak memory over ``reference``'s on the same case."""
    base = {_key(r): r for r in rows if r["provider"] == reference and "ms" in r}
    for row in rows:
        ref = base.get(_key(row))
        if ref and "ms" in row:
            row["time_x"] = row["ms"] / ref["ms"]
            row["mem_x"] = row["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] > 0 else float("nan")


def write(rows: list[dict], env: dict, out_dir: Path, stem: str, reference: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["provider", "case", "tokens", "hidden", "vocab", "dtype", "ms", "peak_mib", "time_x", "mem_x",
               "note"]
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    with open(csv_path, "w", newline="") as f:
        f.write("".join(f"# {k}: {v}\n" for k, v in env.items()))
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def fmt(value, spec):
        return format(value, spec) if isinstance(value, float) else ("" if value is None else str(value))

    lines = [f"# {stem}", "", *(f"- {k}: {v}" for k, v in env.items()), "",
             f"Ratios are to `{reference}` on the same case (time_x > 1: slower than it; mem_x > 1: more memory). "
             "Peak memory is beyond the inputs: on CUDA from the allocator, on CPU the process's resident "
             "high-water mark (an upper bound).", "",
             "| provider | case | tokens | hidden | vocab | dtype | ms (median) | peak MiB | time × | memory × |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['provider']} | {r['case']} | {r['tokens']} | {r['hidden']} | {r['vocab']} | "
                         f"{r['dtype']} | n/a: {r['note']} | | | |")
            continue
        lines.append(f"| {r['provider']} | {r['case']} | {r['tokens']} | {r['hidden']} | {r['vocab']} | {r['dtype']} "
                     f"| {fmt(r['ms'], '.1f')} | {fmt(r['peak_mib'], '.0f')} | {fmt(r.get('time_x'), '.2f')} "
                     f"| {fmt(r.get('mem_x'), '.2f')} |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path
