"""``schedule="auto"`` measured on the user's own GPU: on first use, once per key, cached on disk.

The first call of the token op for a new key (GPU name, precision class, D, a vocabulary bucket, a token bucket,
the option class: bias, softcap, statistics, gradient filtering, determinism, which gradients) times, on that
call's own tensors with synthetic coefficients (g_t from −1 to 1):

1. every candidate schedule (atomic unless ``deterministic``, owner, slab, gemm) with its default configs,
   forward and backward (forward only where no gradient follows), ``REPEATS`` runs after a warm-up;
2. then, for the fastest, the candidate block configs of each of its Triton kernels
   (``kernels.config.candidate_configs``), one kernel at a time, until ``BUDGET_SECONDS`` of measuring are spent;
3. then checks the winner against the gemm schedule's result on the first ``CHECK_TOKENS`` tokens (log-probs and
   gradients, within ``TOLERANCE``); a winner that differs is dropped for the gemm schedule, with a warning.

The choice is kept in memory and in ``$HALO_OPS_CACHE_DIR`` (default ``~/.cache/halo_ops``, or under
``$XDG_CACHE_HOME``), in a file named for the halo-ops and Triton versions, so a new version measures again.
``HALO_OPS_AUTOTUNE=0`` turns it off (then the shipped table, then the best written prediction: ``inputs.
resolve_schedule``); ``1`` turns it on everywhere, the interpreter included; unset, it runs on CUDA only. While
``torch.compile`` traces or a CUDA graph captures, nothing is measured: a choice already made is used, else the
table or the prediction.

Cost: the schedule stage runs 4 × (1 + ``REPEATS``) steps, about 2.4 s at N=16384, D=4096, V=128256 on an H100
(predicted from ~0.15 s per forward+backward, bench/NOTES.md items 16-17); the config stage stops at the budget
(5 s in all); Triton's first compile of each candidate comes on top once per machine (Triton caches it on disk).
One INFO line per key goes to the ``halo_ops`` logger.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from .kernels.config import BlockConfig
from .options import TokenOptions

ENV_AUTOTUNE = "HALO_OPS_AUTOTUNE"
ENV_CACHE_DIR = "HALO_OPS_CACHE_DIR"
BUDGET_SECONDS = 5.0
REPEATS = 3
CHECK_TOKENS = 256
TOKEN_BUCKETS = (1024, 4096, 16384, 65536, 262144, 2**62)
# What the winner may differ from the gemm schedule by, relative to the largest entry: the fp32 sums' order
# changes with the schedule (and with atomics from run to run); half-precision gradients are rounded once.
TOLERANCE = {"float32": 1e-4, "tf32": 2e-2, "bfloat16": 2e-2, "float16": 4e-3}

logger = logging.getLogger("halo_ops")
_choices: dict[str, dict] = {}  # key → the cached choice, this process


def enabled(device: torch.device) -> bool:
    """Whether a first call measures: ``HALO_OPS_AUTOTUNE`` 0 or 1, else on CUDA (not under the interpreter)."""
    setting = os.environ.get(ENV_AUTOTUNE, "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    if setting:
        raise ValueError(f"{ENV_AUTOTUNE} must be 0 or 1, got {setting!r}")
    from .kernels import interpreting

    return device.type == "cuda" and not interpreting()


def cache_file() -> Path:
    """The cache for this halo-ops and Triton version: ``$HALO_OPS_CACHE_DIR/autotune-<versions>.json``."""
    import triton

    from . import __version__

    root = os.environ.get(ENV_CACHE_DIR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "halo_ops")
    return Path(root) / f"autotune-halo_ops-{__version__}-triton-{triton.__version__}.json"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} (Triton interpreter)"


def option_class(bias, options: TokenOptions, deterministic: bool, needs) -> str:
    """The options that change which kernels run: bias, softcap, statistics, filtering, determinism, gradients."""
    flags = "".join(flag for flag, on in (("b", bias is not None), ("c", options.transform.softcap is not None),
                                         (f"s{options.kernel_stats}", options.stats),
                                         ("f", options.grad_filter_eps > 0),
                                         ("d", deterministic)) if on) or "-"
    return flags + "|" + ("".join("hwb"[i] for i, need in enumerate(needs) if need) or "forward")


def cache_key(device: torch.device, dtype: torch.dtype, dim: int, vocab: int, tokens: int, options_class: str) -> str:
    from .kernels.config import VOCAB_BUCKETS, bucket, precision_class

    return "|".join([device_name(device), precision_class(dtype), f"D={dim}", f"V<={bucket(vocab, VOCAB_BUCKETS)}",
                     f"N<={bucket(tokens, TOKEN_BUCKETS)}", options_class])


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("entries", {})
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, entry: dict) -> None:
    """Add ``entry`` under ``key`` to the cache file (read again first: another process may have written)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache(path)
        entries[key] = entry
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"entries": entries}, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: the choice still holds for this process
        logger.warning("halo_ops autotune: could not write %s (%s); the choice is kept for this process", path, exc)


def cached_choice(key: str) -> dict | None:
    """The choice for ``key`` made in this process or read from the cache file, or None."""
    if key not in _choices:
        entry = _read_cache(cache_file()).get(key)
        if entry is None:
            return None
        _choices[key] = entry
    return _choices[key]


@torch.compiler.assume_constant_result
def _traced_choice(device: str, dtype: str, dim: int, vocab: int, tokens: int, options_class: str) -> tuple:
    """``(schedule, configs)`` cached for the key, or (): called by torch.compile at trace time (a constant)."""
    key = cache_key(torch.device(device), getattr(torch, dtype.removeprefix("torch.")), dim, vocab, tokens,
                    options_class)
    entry = cached_choice(key)
    return () if entry is None else (entry["schedule"], tuple(tuple(c) for c in entry["configs"]))


def choose(hidden, weight, bias, targets, options: TokenOptions, *, deterministic: bool, needs) -> TokenOptions | None:
    """``options`` with the measured schedule and configs for this call's key, measuring first where none is cached
    (see the module docstring); None where autotuning is off, or nothing is cached while tracing or capturing."""
    if not enabled(hidden.device) or hidden.shape[0] == 0:
        return None
    shape = (hidden.dtype, weight.shape[1], weight.shape[0], hidden.shape[0])
    options_class = option_class(bias, options, deterministic, needs)
    if torch.compiler.is_compiling():  # a cached choice only, read as a constant of the trace
        choice = _traced_choice(str(hidden.device), str(hidden.dtype), *shape[1:], options_class)
        return dataclasses.replace(options, schedule=choice[0], configs=choice[1]) if choice else None
    key = cache_key(hidden.device, *shape, options_class)
    entry = cached_choice(key)
    if entry is None:
        if hidden.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None  # no measuring inside a CUDA graph
        entry = measure(hidden, weight, bias, targets, options, deterministic=deterministic, needs=needs)
        _choices[key] = entry
        _write_cache(cache_file(), key, entry)
        logger.info("halo_ops autotune: %s → schedule %s%s in %.1f s (cached in %s)", key, entry["schedule"],
                    "".join(f", {c[0]} {BlockConfig(*c[1:]).label()}" for c in entry["configs"]), entry["seconds"],
                    cache_file())
    return dataclasses.replace(options, schedule=entry["schedule"], configs=tuple(tuple(c) for c in entry["configs"]))


def time_call(call, device: torch.device, repeats: int) -> float:
    """Median seconds of ``call()`` over ``repeats`` runs after one warm-up (which compiles)."""
    call()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step(options: TokenOptions, hidden, weight, bias, targets, needs):
    """A no-argument callable: the token op's forward and (where ``needs`` has any) backward on synthetic
    coefficients, as the op runs them; returns (log-probs, gradients...)."""
    from .token_op import backward_accumulators, forward_tokens

    grad = torch.linspace(-1.0, 1.0, hidden.shape[0], device=hidden.device)

    def call():
        logps, lse, _, _ = forward_tokens(options, hidden, weight, bias, targets)
        if not any(needs):
            return (logps,)
        grads = backward_accumulators(options, hidden, weight, bias, targets, lse, grad, needs)
        return (logps, *(g for g in grads if g is not None))

    return call


SCHEDULE_KERNELS = {"atomic": ("forward", "backward"), "owner": ("forward", "backward_dh", "backward_dw"),
                    "slab": ("forward", "slab"), "gemm": ("fold",)}


def measure(hidden, weight, bias, targets, options: TokenOptions, *, deterministic: bool, needs) -> dict:
    """Time the candidates on these tensors (module docstring) and return the cache entry: schedule, configs,
    ms per candidate, seconds spent, the shape and where it was measured."""
    from .kernels.config import candidate_configs, device_arch, precision_class

    started = time.perf_counter()
    device = hidden.device
    schedules = [s for s in ("atomic", "owner", "slab", "gemm") if not (deterministic and s == "atomic")]
    if not any(needs):  # forward only: the fused forward kernel or the GEMM schedule's
        schedules = ["atomic", "gemm"]
    timings = {}
    with torch.no_grad():
        def timed(candidate: TokenOptions, label: str) -> float | None:
            try:
                seconds = time_call(step(candidate, hidden, weight, bias, targets, needs), device, REPEATS)
            except Exception as exc:  # noqa: BLE001 - a candidate that does not run here loses, and says why
                logger.info("halo_ops autotune: %s failed: %s: %s", label, type(exc).__name__, str(exc)[:200])
                return None
            timings[label] = round(seconds * 1e3, 4)
            return seconds

        by_schedule = {s: timed(dataclasses.replace(options, schedule=s, configs=()), s) for s in schedules}
        ran = {s: t for s, t in by_schedule.items() if t is not None}
        if not ran:
            raise RuntimeError(f"halo_ops autotune: no schedule ran on {device_name(device)}: {timings}")
        best_schedule = min(ran, key=ran.get)
        best, best_time = dataclasses.replace(options, schedule=best_schedule, configs=()), ran[best_schedule]
        arch = device_arch(device)
        kernels = SCHEDULE_KERNELS[best_schedule] if any(needs) else SCHEDULE_KERNELS[best_schedule][:1]
        for kernel in kernels:
            for config in candidate_configs(kernel, hidden.dtype, arch)[1:]:
                if time.perf_counter() - started > BUDGET_SECONDS:
                    break
                fields = (kernel, *dataclasses.astuple(config))
                others = tuple(c for c in best.configs if c[0] != kernel)
                candidate = dataclasses.replace(best, configs=(*others, fields))
                seconds = timed(candidate, f"{best_schedule} {kernel} {config.label()}")
                if seconds is not None and seconds < best_time:
                    best, best_time = candidate, seconds
        if best.schedule != "gemm" or best.configs:
            best = _checked_against_gemm(best, options, hidden, weight, bias, targets, needs)
    return {"schedule": best.schedule, "configs": [list(c) for c in best.configs], "ms": timings,
            "seconds": round(time.perf_counter() - started, 3), "precision": precision_class(hidden.dtype),
            "measured_at": {"tokens": hidden.shape[0], "hidden": weight.shape[1], "vocab": weight.shape[0]},
            "device": device_name(device), "date": time.strftime("%Y-%m-%d")}


def relative_error(result, expected) -> float:
    return max(((r.float() - e.float()).abs().max() / e.float().abs().max().clamp_min(1e-30)).item()
               for r, e in zip(result, expected))


def _checked_against_gemm(best: TokenOptions, options: TokenOptions, hidden, weight, bias, targets, needs):
    """``best`` if its result on the first ``CHECK_TOKENS`` tokens matches the gemm schedule's, else the gemm
    schedule (with a warning: a kernel that is wrong on this GPU must not be chosen for being fast)."""
    import warnings

    from .kernels.config import precision_class

    rows = slice(0, min(CHECK_TOKENS, hidden.shape[0]))
    inputs = (hidden[rows], weight, bias, targets[rows], needs)
    reference = step(dataclasses.replace(options, schedule="gemm", configs=()), *inputs)()
    error = relative_error(step(best, *inputs)(), reference)
    if error <= TOLERANCE[precision_class(hidden.dtype)]:
        return best
    warnings.warn(f"halo_ops autotune: schedule {best.schedule!r} with configs {best.configs} differs from the gemm "
                  f"schedule by {error:.2e} (relative) on {device_name(hidden.device)}; the gemm schedule is used. "
                  "Please report this.", RuntimeWarning, stacklevel=3)
    return dataclasses.replace(options, schedule="gemm", configs=())


def main(argv=None) -> int:
    """``python -m halo_ops.autotune``: measure one shape's key now (before training, say) and print its entry."""
    import argparse

    from .inputs import measured_schedule, prepare_linear_inputs

    parser = argparse.ArgumentParser(prog="python -m halo_ops.autotune", description=main.__doc__)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bias", action="store_true")
    parser.add_argument("--softcap", type=float, default=None)
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--frozen-head", action="store_true",
                        help="dH only, as a frozen head with recompute=True runs (without it, the Jacobian path runs no "
                             "schedule)")
    args = parser.parse_args(argv)
    os.environ[ENV_AUTOTUNE] = "1"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device(args.device)
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden, device=device, dtype=dtype) * args.hidden**-0.5)
    weight.requires_grad_(not args.frozen_head)
    bias = torch.zeros(args.vocab, device=device, dtype=dtype, requires_grad=not args.frozen_head) if args.bias else None
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    from .transform import LogitTransform

    needs = (True, not args.frozen_head, args.bias and not args.frozen_head)
    options_class = option_class(bias, TokenOptions("triton", LogitTransform(softcap=args.softcap)),
                                 args.deterministic, needs)
    key = cache_key(device, dtype, args.hidden, args.vocab, args.tokens, options_class)
    was_cached = cached_choice(key) is not None
    started = time.perf_counter()
    hidden2d, weight, bias, targets, options, _ = prepare_linear_inputs(
        hidden, weight, targets, bias, ignore_index=-100, logit_scale=1.0, softcap=args.softcap, temperature=1.0,
        impl="auto", return_stats=False, check_targets=False, check_finite=False, deterministic=args.deterministic,
        grad_filter_eps=0.0)
    measured_schedule(options, hidden2d, weight, bias, targets, schedule="auto", deterministic=args.deterministic)
    entry = cached_choice(key)
    if entry is None:
        print(f"no choice was made for {key}: impl='auto' does not run the Triton kernels on {device}")
        return 1
    print(json.dumps({"key": key, "cache": str(cache_file()), "from_cache": was_cached,
                      "wall_seconds": round(time.perf_counter() - started, 3), **entry}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
