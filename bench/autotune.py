"""``python -m bench.autotune``: time candidate block configs per kernel and (D, V) bucket; write the table.

For each hidden size D and vocabulary size V given (one representative shape per bucket), each
kernel (``forward``, ``backward`` (atomic), ``backward_dh`` and ``backward_dw`` (deterministic)) and
each candidate config, the launcher runs with that config, its result is checked against the
default config's, and it is timed (``triton.testing.do_bench`` median on CUDA). A candidate that
does not compile on this GPU (shared memory, say) is recorded as such. The fastest correct one is
kept, and only where it beats the default by more than ``--min-gain``; elsewhere the default stands.

Writes ``tuned_configs.json`` (the format ``kernels/config.py`` reads: copy it over
``kernels/tuned_configs.json``, or point ``HALO_OPS_TUNED_CONFIGS`` at it) and ``autotune.md`` with
every timing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from halo_ops.kernels import BlockConfig, linear_logprobs_backward, linear_logprobs_forward
from halo_ops.autotune import TOLERANCE, relative_error
from halo_ops.kernels.config import (BACKWARD_SCHEDULES, KERNELS, SCHEDULE, candidate_configs, default_config,
                                     device_arch, precision_class, table_key)
from halo_ops.options import TokenOptions
from halo_ops.partials import merge_partials
from halo_ops.token_op import weight_slice_rows

from .measure import DTYPES, Shape, median_seconds
from .report import RUNS, environment

def backward_call(schedule: str, needs, hidden, weight, targets, config: BlockConfig | None):
    """A no-argument callable: the backward launcher by ``schedule``, as the op runs it; returns its gradients."""
    lse = merge_partials(linear_logprobs_forward(hidden, weight, None, targets, TokenOptions("triton")),
                         targets != -100, weight.shape[0])[1]
    grad = torch.linspace(-1.0, 1.0, hidden.shape[0], device=hidden.device)
    options = TokenOptions("triton", schedule=schedule)
    slice_rows = weight_slice_rows(*weight.shape, weight.dtype)
    return lambda: tuple(g for g in linear_logprobs_backward(
        hidden, weight, None, targets, lse, grad, options, needs, slice_rows=slice_rows, config=config)
        if g is not None)


def kernel_call(kernel: str, hidden, weight, targets, config: BlockConfig):
    """A no-argument callable that runs ``kernel``'s launcher with ``config`` and returns its outputs."""
    if kernel in ("forward", "fold"):  # the fused forward kernel, or the GEMM schedule's fold over a logits slab
        options = TokenOptions("triton", schedule="gemm" if kernel == "fold" else "atomic")

        def forward():
            partials = linear_logprobs_forward(hidden, weight, None, targets, options, config=config)
            return merge_partials(partials, targets != -100, weight.shape[0])[:2]

        return forward
    needs, schedule = {"backward": ((True, True, False), "atomic"), "backward_dh": ((True, False, False), "owner"),
                       "backward_dw": ((False, True, False), "owner"), "slab": ((True, True, False), "slab")}[kernel]
    return backward_call(schedule, needs, hidden, weight, targets, config)


def tune_schedule(shape: Shape, device: torch.device, repeats: int = 3, timer=None) -> list[dict]:
    """One row per backward schedule: ms of the whole backward and its error against the atomic schedule's
    result (None and a failure where it does not run). ``timer`` as in ``tune``."""
    timer = timer or median_seconds
    hidden, weight, targets = shape.inputs(device, requires_grad=False)
    calls = {s: backward_call(s, (True, True, False), hidden, weight, targets, None) for s in BACKWARD_SCHEDULES}
    expected = calls["atomic"]()
    rows = []
    for schedule, call in calls.items():
        call.schedule = schedule
        row = {"kernel": SCHEDULE, "schedule": schedule, "ms": None, "error": None}
        rows.append(check_and_time(row, call, expected, "the atomic schedule's", shape.dtype, device, repeats, timer))
    return rows


def schedule_entry(arch: str, shape: Shape, rows: list[dict], env: dict) -> dict | None:
    """The table entry naming the fastest correct schedule, with every schedule's time beside it."""
    timed = [r for r in rows if r["ms"] is not None]
    if not timed:
        return None
    fastest = min(timed, key=lambda r: r["ms"])
    _, _, dtype, hidden_bucket, vocab_bucket = table_key(SCHEDULE, arch, shape.dtype, shape.hidden, shape.vocab)
    return {"kernel": SCHEDULE, "arch": arch, "dtype": dtype, "hidden_bucket": hidden_bucket,
            "vocab_bucket": vocab_bucket, "schedule": fastest["schedule"],
            "ms": {r["schedule"]: round(r["ms"], 4) for r in timed},
            "measured_at": {"tokens": shape.tokens, "hidden": shape.hidden, "vocab": shape.vocab},
            "device": env["device"], "date": env["date"]}


def check_and_time(row: dict, call, expected, baseline: str, dtype, device, repeats: int, timer) -> dict:
    """Fill ``row``: the result's relative error against ``expected``, then its time if within tolerance; a
    failure (it does not run here, or it differs) is recorded as a result too."""
    try:
        row["error"] = relative_error(call(), expected)
    except Exception as exc:  # noqa: BLE001 - a candidate that does not compile here is a result too
        row["failure"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
        return row
    if row["error"] > TOLERANCE[precision_class(dtype)]:
        row["failure"] = f"result differs from {baseline} by {row['error']:.2e} (relative)"
    else:
        row["ms"] = timer(call, device, repeats) * 1e3
    return row


def tune(kernel: str, shape: Shape, device: torch.device, candidates: list[BlockConfig] | None = None,
         repeats: int = 3, timer=None, arch: str | None = None) -> list[dict]:
    """One row per candidate: config, ms (None if it failed), relative error against the default's result.

    The baseline is the built-in default for ``arch``; ``candidates`` default to ``kernels.config.candidate_configs``
    for the kernel, precision and ``arch``. ``timer(call, device, repeats)`` → seconds;
    default ``bench.measure.median_seconds``."""
    timer = timer or median_seconds
    hidden, weight, targets = shape.inputs(device, requires_grad=False)
    default = default_config(kernel, shape.dtype, arch)
    candidates = candidate_configs(kernel, shape.dtype, arch) if candidates is None else candidates
    expected = kernel_call(kernel, hidden, weight, targets, default)()
    rows = []
    for config in dict.fromkeys([default, *candidates]):
        row = {"kernel": kernel, "config": config, "default": config == default, "ms": None, "error": None}
        call = kernel_call(kernel, hidden, weight, targets, config)
        rows.append(check_and_time(row, call, expected, "the default config's", shape.dtype, device, repeats, timer))
    return rows


def best(rows: list[dict], min_gain: float) -> dict | None:
    """The fastest correct row, if it beats the default row by more than ``min_gain`` (a fraction)."""
    timed = [r for r in rows if r["ms"] is not None]
    default = next((r for r in timed if r["default"]), None)
    fastest = min(timed, key=lambda r: r["ms"], default=None)
    if fastest is None or default is None or fastest["default"]:
        return None
    return fastest if fastest["ms"] < default["ms"] * (1 - min_gain) else None


def table_entry(kernel: str, arch: str, shape: Shape, row: dict, default_ms: float, env: dict) -> dict:
    _, _, dtype, hidden_bucket, vocab_bucket = table_key(kernel, arch, shape.dtype, shape.hidden, shape.vocab)
    return {"kernel": kernel, "arch": arch, "dtype": dtype, "hidden_bucket": hidden_bucket,
            "vocab_bucket": vocab_bucket, "config": asdict(row["config"]), "ms": round(row["ms"], 4),
            "default_ms": round(default_ms, 4), "measured_at": {"tokens": shape.tokens, "hidden": shape.hidden,
                                                              "vocab": shape.vocab},
            "device": env["device"], "date": env["date"]}


def markdown(results: list[tuple[Shape, list[dict]]], env: dict) -> str:
    lines = ["# Block-config autotuning", "", *(f"- {k}: {v}" for k, v in env.items()), "",
             "| kernel | tokens | hidden | vocab | dtype | BLOCK_N | BLOCK_V | BLOCK_D | warps | stages | ms | "
             "rel. error | note |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for shape, rows in results:
        for r in rows:
            if r["kernel"] == SCHEDULE:
                ms = f"{r['ms']:.3f}" if r["ms"] is not None else ""
                err = f"{r['error']:.1e}" if r["error"] is not None else ""
                lines.append(f"| schedule {r['schedule']} | {shape.tokens} | {shape.hidden} | {shape.vocab} | "
                             f"{str(shape.dtype).removeprefix('torch.')} | | | | | | {ms} | {err} | "
                             f"{r.get('failure', '')} |")
                continue
            c = r["config"]
            ms = f"{r['ms']:.3f}" if r["ms"] is not None else ""
            err = f"{r['error']:.1e}" if r["error"] is not None else ""
            note = "default" if r["default"] else r.get("failure", "")
            lines.append(f"| {r['kernel']} | {shape.tokens} | {shape.hidden} | {shape.vocab} | "
                         f"{str(shape.dtype).removeprefix('torch.')} | {c.block_n} | {c.block_v} | {c.block_d} | "
                         f"{c.num_warps} | {c.num_stages} | {ms} | {err} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.autotune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", default="2048,4096", help="comma list of D, one per bucket")
    parser.add_argument("--vocab", default="32000,128256,256000", help="comma list of V, one per bucket")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--kernels", default=",".join([*KERNELS, SCHEDULE]),
                        help=f"comma list of {', '.join(KERNELS)} (block configs) and {SCHEDULE} (the backward "
                             "schedule that impl='auto' picks)")
    parser.add_argument("--candidates", default=None,
                        help="semicolon list of BLOCK_N,BLOCK_V,BLOCK_D,warps,stages (default: the built-in list)")
    parser.add_argument("--min-gain", type=float, default=0.03, help="keep a config only if this much faster")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per candidate on CPU")
    parser.add_argument("--arch", default=None, help="table key (default: this GPU's, e.g. sm_90)")
    parser.add_argument("--out", type=Path, default=RUNS)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    arch = args.arch or device_arch(device)
    if arch is None:
        parser.error("--arch is needed off CUDA (the table is keyed on the GPU architecture)")
    candidates = None  # kernels.config.candidate_configs, per kernel
    if args.candidates:
        candidates = [BlockConfig(*(int(x) for x in c.split(","))) for c in args.candidates.split(";")]
    env = environment(device)
    results, entries = [], []
    for hidden in (int(x) for x in args.hidden.split(",")):
        for vocab in (int(x) for x in args.vocab.split(",")):
            shape = Shape(args.tokens, hidden, vocab, dtype)
            for kernel in args.kernels.split(","):
                if kernel == SCHEDULE:
                    rows = tune_schedule(shape, device, args.repeats)
                    results.append((shape, rows))
                    entry = schedule_entry(arch, shape, rows, env)
                    print(f"schedule D={hidden} V={vocab}: " + ", ".join(
                        f"{r['schedule']} {r['ms']:.3f} ms" if r["ms"] is not None else f"{r['schedule']} failed"
                        for r in rows))
                    if entry:
                        entries.append(entry)
                    continue
                rows = tune(kernel, shape, device, candidates, args.repeats, arch=arch)
                results.append((shape, rows))
                winner = best(rows, args.min_gain)
                default_ms = next(r["ms"] for r in rows if r["default"])
                print(f"{kernel} D={hidden} V={vocab}: default {default_ms:.3f} ms, "
                      + (f"{winner['config']} {winner['ms']:.3f} ms" if winner else "default kept"))
                if winner:
                    entries.append(table_entry(kernel, arch, shape, winner, default_ms, env))
    args.out.mkdir(parents=True, exist_ok=True)
    table = {"about": f"python -m bench.autotune on {env['device']}, {env['date']}", "entries": entries}
    (args.out / "tuned_configs.json").write_text(json.dumps(table, indent=1) + "\n")
    (args.out / "autotune.md").write_text(markdown(results, env))
    print(f"wrote {args.out / 'tuned_configs.json'} ({len(entries)} entries) and {args.out / 'autotune.md'}")


if __name__ == "__main__":
    main()
