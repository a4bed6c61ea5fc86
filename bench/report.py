"""Results files: CSV rows and a Markdown table with device, versions and date, ratios to halo-ops."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import platform
from pathlib import Path

import torch

PEERS = ("torch", "triton", "trl", "liger-kernel", "cut-cross-entropy", "transformers")


# Where a run writes unless told otherwise: git-ignored, so a run never overwrites the committed tables in
# bench/results/ (pass --out bench/results to replace them, with the command in the commit).
RUNS = Path(__file__).parent / "runs"
NOT_REACHED = "not measured: the run stopped before this row"


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
        from halo_ops.kernels.slab_backward import fp32_output_gemm

        # which product the slab and GEMM schedules ran: one fp32-output GEMM, or a half-precision one plus an add
        env["fp32-output GEMM"] = "yes" if fp32_output_gemm(device) else "no (half-precision product + fp32 add)"
    else:
        env["device"] = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    for package in PEERS:
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package] = "not installed"
    return env


def _key(row):
    return row["case"], row["tokens"], row["hidden"], row["vocab"], row["dtype"], row.get("distribution")


def add_ratios(rows: list[dict], reference: str) -> None:
    """time_x / mem_x: each provider's time and peak memory over ``reference``'s on the same case."""
    base = {_key(r): r for r in rows if r["provider"] == reference and "ms" in r}
    for row in rows:
        ref = base.get(_key(row))
        if ref and "ms" in row:
            row["time_x"] = row["ms"] / ref["ms"]
        if ref and "peak_mib" in row and "peak_mib" in ref:  # once the memory phase has reached both
            row["mem_x"] = row["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] > 0 else float("nan")


def write(rows: list[dict], env: dict, out_dir: Path, stem: str, reference: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["provider", "case", "tokens", "hidden", "vocab", "dtype", "distribution", "entropy", "ms", "peak_mib",
               "extra_mib", "time_x", "mem_x", "note"]
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    with open(csv_path, "w", newline="") as f:
        f.write("".join(f"# {k}: {v}\n" for k, v in env.items()))
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**row, "note": row.get("note") or ("" if "ms" in row else NOT_REACHED)} for row in rows)

    def fmt(value, spec):
        return format(value, spec) if isinstance(value, float) else ("" if value is None else str(value))

    lines = [f"# {stem}", "", *(f"- {k}: {v}" for k, v in env.items()), "",
             f"Ratios are to `{reference}` on the same case (time_x > 1: slower than it; mem_x > 1: more memory). "
             "Peak memory is beyond the inputs: on CUDA from the allocator, on CPU the process's resident "
             "high-water mark (an upper bound). Extra MiB is the peak less the gradient outputs (hidden and "
             "weight), for the cases with a backward.", "",
             "| provider | case | tokens | hidden | vocab | dtype | logits (mean entropy) | ms (median) | peak MiB "
             "| extra MiB | time × | memory × |",
             "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        logits = r.get("distribution", "random")
        if r.get("entropy") is not None:
            logits += f" ({r['entropy']:.2f} nats)"
        head = f"| {r['provider']} | {r['case']} | {r['tokens']} | {r['hidden']} | {r['vocab']} | {r['dtype']} | {logits} "
        if "ms" not in r:
            lines.append(head + f"| n/a: {r.get('note') or NOT_REACHED} | | | | |")
            continue
        lines.append(head + f"| {fmt(r['ms'], '.1f')} | {fmt(r.get('peak_mib'), '.0f')} | {fmt(r.get('extra_mib'), '.0f')} "
                     f"| {fmt(r.get('time_x'), '.2f')} "
                     f"| {fmt(r.get('mem_x'), '.2f')} |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot(rows: list[dict], path: Path) -> Path | None:
    """Time and peak memory against tokens, one line per provider, one row of panels per (case, V, logits)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    measured = [r for r in rows if "ms" in r]
    panels = sorted({(r["case"], r["vocab"], r["hidden"], r.get("distribution", "random")) for r in measured},
                    key=str)
    if not panels or len({r["tokens"] for r in measured}) < 2:
        return None  # one point per line says nothing a table does not
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for (case, vocab, hidden, distribution), (ax_time, ax_mem) in zip(panels, axes):
        for provider in dict.fromkeys(r["provider"] for r in measured):
            line = sorted((r["tokens"], r["ms"], r["peak_mib"]) for r in measured if r["provider"] == provider and
                          (r["case"], r["vocab"], r["hidden"], r.get("distribution", "random")) ==
                          (case, vocab, hidden, distribution))
            if line:
                tokens, ms, mib = zip(*line)
                ax_time.plot(tokens, ms, marker="o", label=provider)
                ax_mem.plot(tokens, [max(m, 0.1) for m in mib], marker="o", label=provider)
        title = f"{case}, D={hidden}, V={vocab}, {distribution}"
        ax_time.set(title=f"time: {title}", xlabel="tokens", ylabel="ms (median)", xscale="log", yscale="log")
        ax_mem.set(title=f"peak memory: {title}", xlabel="tokens", ylabel="MiB beyond inputs (floor 0.1)",
                   xscale="log", yscale="log")
        ax_time.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path
