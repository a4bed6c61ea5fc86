"""``python -m bench``: time and peak memory of halo-ops against the peers a user would pick instead."""

from __future__ import annotations

import argparse
import traceback
from pathlib import Path

import torch

from .kto_step import KTO_PROVIDERS, LOSS_PROVIDERS, KTOShape, mean_entropy
from .measure import CASES, DTYPES, Shape, peak_row, time_row
from .providers import HALO_OPTIONS, PROVIDERS
from .report import RUNS, add_ratios, environment, plot, write


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=_ints, default=None, help="comma list, e.g. 1024,16384")
    parser.add_argument("--hidden", type=_ints, default=None, help="comma list of D")
    parser.add_argument("--vocab", type=_ints, default=None, help="comma list of V")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--cases", default="forward+backward,forward-only",
                        help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--providers", default=None,
                        help=f"comma list (default: all that apply) of {', '.join(dict.fromkeys([*PROVIDERS, *KTO_PROVIDERS, *LOSS_PROVIDERS]))}")
    parser.add_argument("--seq", type=int, default=512, help="kto-step: tokens per sequence (B = tokens / seq)")
    parser.add_argument("--distribution", default="random",
                        help="comma list of random, peaked (logits like a trained model's; kto-step)")
    parser.add_argument("--reference", default=None, help="provider the ratios are taken to (default: halo-ops, "
                        "or halo-ops[torch] where Triton does not run)")
    parser.add_argument("--grad-filter-eps", type=float, default=0.0,
                        help="halo-ops providers: gradient filtering threshold (default 0, exact)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row on CPU (CUDA uses do_bench)")
    parser.add_argument("--out", type=Path, default=RUNS)
    parser.add_argument("--name", default=None, help="results file stem (default: bench-<device>)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    HALO_OPTIONS.update({"grad_filter_eps": args.grad_filter_eps} if args.grad_filter_eps else {})
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    tokens = args.tokens or ([1024, 4096, 16384] if cuda else [16384])
    hiddens = args.hidden or ([4096] if cuda else [128])
    vocabs = args.vocab or ([32000, 128256] if cuda else [32000])
    wanted = args.providers.split(",") if args.providers else None
    reference = args.reference or ("halo-ops" if PROVIDERS["halo-ops"].available(device) is None else "halo-ops[torch]")
    jobs = []  # (row, provider, shape) for every measurable row, in table order
    rows = []
    for case in args.cases.split(","):
        registry = {"kto-step": KTO_PROVIDERS, "kto-loss": LOSS_PROVIDERS}.get(case, PROVIDERS)
        providers = [registry[name] for name in (wanted or registry) if name in registry]
        sequences = case in ("kto-step", "kto-loss")
        distributions = args.distribution.split(",") if sequences else ["random"]
        for n in tokens:
            for d in hiddens:
                for v in vocabs:
                    for distribution in distributions:
                        if sequences:
                            shape = KTOShape(max(1, n // args.seq), min(n, args.seq), d, v, dtype,
                                             peaked=distribution == "peaked")
                            entropy = mean_entropy(shape, device)
                        else:
                            shape, entropy = Shape(n, d, v, dtype), None
                        for provider in providers:
                            row = {"provider": provider.name, "case": case, "tokens": n, "hidden": d, "vocab": v,
                                   "dtype": str(dtype).removeprefix("torch."), "distribution": distribution,
                                   "entropy": entropy}
                            rows.append(row)
                            why_not = provider.available(device)
                            if why_not:
                                row["note"] = why_not
                            else:
                                jobs.append((row, provider, shape))

    env = environment(device)
    stem = args.name or f"bench-{device.type}"

    def save() -> tuple[Path, Path]:
        """The tables as they stand: rewritten after every row, so a run stopped by its deadline keeps
        what it measured (rows not reached yet say so)."""
        add_ratios(rows, reference)
        return write(rows, env, args.out, stem, reference)

    save()
    # Every timing before any peak: the CPU peak measurement changes how the allocator behaves
    for phase, measure in (("time", time_row), ("memory", peak_row)):
        for row, provider, shape in jobs:
            if "note" in row:
                continue
            args_ = (provider, shape, row["case"], device) + ((args.repeats,) if phase == "time" else ())
            try:
                row["ms" if phase == "time" else "peak_mib"] = measure(*args_)
            except Exception as error:  # one failing provider costs its own row, not the table
                why = "out of memory" if isinstance(error, torch.OutOfMemoryError) else \
                    f"failed: {type(error).__name__}: {' '.join(str(error).split())[:160]}"
                if phase == "time":
                    row["note"] = why
                else:  # the time already measured stays in the table
                    row["note"] = f"peak memory {why}"
                if not isinstance(error, torch.OutOfMemoryError):
                    traceback.print_exc()
                if cuda:
                    torch.cuda.empty_cache()
            shown = (f"{row['ms']:9.1f} ms" if phase == "time" else f"{row['peak_mib']:8.0f} MiB") \
                if "note" not in row else row["note"]
            print(f"{phase:6s} {row['case']:17s} N={row['tokens']:<6d} D={row['hidden']:<5d} V={row['vocab']:<7d} "
                  f"{row['distribution']:7s} {provider.name:16s} {shown}", flush=True)
            if phase == "memory":
                _extra_memory(row, dtype)
            save()
    csv_path, md_path = save()
    print(md_path.read_text())
    png = plot(rows, md_path.with_suffix(".png"))
    print(f"wrote {csv_path}, {md_path}" + (f" and {png}" if png else ""))


def _extra_memory(row: dict, dtype: torch.dtype) -> None:
    """What a provider needs beyond the gradient outputs it must return."""
    if "peak_mib" in row and row["case"] in ("backward", "forward+backward", "frozen-head", "kto-step", "kto-loss"):
        rows_with_grad = row["tokens"] + (0 if row["case"] == "frozen-head" else row["vocab"])
        row["extra_mib"] = row["peak_mib"] - rows_with_grad * row["hidden"] * dtype.itemsize / 2**20


if __name__ == "__main__":
    main()
