"""``python -m bench.summary DIR``: one table from a GPU session's results (bench/gpu_session.sh prints it last).

Reads every ``*.csv`` that ``python -m bench`` wrote into DIR, ``floor.json`` from ``python -m bench.floor``
and ``steps.tsv`` from the session script, and prints Markdown: the environment, each step's outcome
and duration, then every measured row with its time over the GEMM floor of its case (forward and
forward-only: 1 GEMM of 2·N·D·V flops at the measured rate; backward: 3; forward+backward: 4; frozen-head:
2; kto-loss: 3), over
TRL's head on the same case, and its memory beyond the gradient outputs over TRL's.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

# GEMM floors: forward 1; backward 3 (recompute, dH, dW); forward+backward 4; the schedules that form gradients in
# the forward go lower, and their floor is quoted: a frozen head 2 (the projection and the Jacobian's product, where
# a recompute needs 3), the fused KTO loss 3 (the eager schedule's projection, dH and dW, where a recompute needs 4)
GEMMS_PER_CASE = {"forward": 1, "forward-only": 1, "backward": 3, "forward+backward": 4, "frozen-head": 2,
                  "kto-loss": 3}


def read_rows(directory: Path) -> tuple[list[dict], dict]:
    """Every row of every bench CSV in ``directory``, and the environment lines of the first one."""
    rows, env = [], {}
    order = {"schedules": 0, "peer": 1}  # halo-ops' schedules, then the peers, then the rest (kto-step)
    for path in sorted(directory.glob("*.csv"), key=lambda p: (order.get(p.stem.split("-")[0], 2), p.stem)):
        lines = path.read_text().splitlines()
        for line in lines:
            if line.startswith("# ") and ": " in line:
                key, value = line[2:].split(": ", 1)
                env.setdefault(key, value)
        rows.extend(csv.DictReader(line for line in lines if not line.startswith("#")))
    return rows, env


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def summarize(directory: Path) -> str:
    rows, env = read_rows(directory)
    floor_path = directory / "floor.json"
    floor = json.loads(floor_path.read_text()) if floor_path.exists() else None
    lines = ["# GPU session summary", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    if floor:
        rates = ", ".join(f"[{g['m']}, {g['k']}] @ [{g['k']}, {g['n']}] {g['tflops']:.0f}" for g in floor["gemms"])
        lines.append(f"- measured: {floor['dtype']} GEMM TFLOP/s {rates}; copy {floor['copy_gbps']:.0f} GB/s")
    steps_path = directory / "steps.tsv"
    if steps_path.exists():
        lines += ["", "| step | seconds | outcome |", "|---|---:|---|"]
        for line in steps_path.read_text().splitlines():
            name, seconds, outcome = line.split("\t")
            lines.append(f"| {name} | {seconds} | {outcome} |")

    trl = {(r["case"], r["tokens"], r["hidden"], r["vocab"]): r for r in rows if r["provider"] == "trl"
           and _number(r.get("ms"))}
    lines += ["", "| provider | case | N | D | V | ms | × floor | × TRL | peak MiB | extra MiB | extra × TRL | note |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ms, extra = _number(r.get("ms")), _number(r.get("extra_mib"))
        n, d, v = (int(r[k]) for k in ("tokens", "hidden", "vocab"))
        over_floor = over_trl = extra_over_trl = ""
        if ms is not None and floor and r["case"] in GEMMS_PER_CASE:
            floor_ms = GEMMS_PER_CASE[r["case"]] * 2 * n * d * v / (floor["tflops"] * 1e12) * 1e3
            over_floor = f"{ms / floor_ms:.2f}"
        peer = trl.get((r["case"], r["tokens"], r["hidden"], r["vocab"]))
        if ms is not None and peer is not None:
            over_trl = f"{ms / float(peer['ms']):.2f}"
            peer_extra = _number(peer.get("extra_mib"))
            if extra is not None and peer_extra:
                extra_over_trl = f"{extra / peer_extra:.2f}"
        shown_ms = f"{ms:.1f}" if ms is not None else "n/a"
        peak = f"{float(r['peak_mib']):.0f}" if _number(r.get("peak_mib")) is not None else ""
        lines.append(f"| {r['provider']} | {r['case']} | {n} | {d} | {v} | {shown_ms} | {over_floor} | {over_trl} "
                     f"| {peak} | {'' if extra is None else f'{extra:.0f}'} | {extra_over_trl} | {r.get('note') or ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    print(summarize(args.directory), end="")


if __name__ == "__main__":
    main()
