"""``python -m halo_ops.selftest``: check halo-ops on the machine it is installed on.

1. Every path and schedule that runs here (on CUDA every Triton schedule, compiled; on CPU the PyTorch path,
   and the Triton path too when ``TRITON_INTERPRET=1`` is set) against the float64 reference
   (:func:`halo_ops.linear_logprobs_reference`) at small shapes, in float32 and bfloat16, with a bias, a
   softcap, ignored targets and the entropy in the loss: log-probs and the gradients of hidden, weight and
   bias.
2. The default call (``schedule="auto"``) timed forward+backward at a shape you give, against TRL's fused
   head (``trl.kernels.ChunkedLogProbFunction``, as TRL's trainers call it) when TRL is installed.

It prints one table with the device, the versions and the schedule ``auto`` chose, and exits non-zero if any
result is off::

    python -m halo_ops.selftest                                 # checks, then times N=4096, D=1024, V=32000
    python -m halo_ops.selftest --tokens 16384 --hidden 4096 --vocab 128256 --dtype bf16
    TRITON_INTERPRET=1 python -m halo_ops.selftest --no-timing  # on a CPU, the Triton kernels interpreted too
"""

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import sys

import torch

from .inputs import resolve_impl, resolve_schedule
from .linear_logprobs import linear_logprobs
from .reference import linear_logprobs_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Error allowed over float64, relative to the largest reference value: float32 accumulates D-long dot products
# in fp32 (about 1e-6 each); bfloat16 rounds its inputs to 8 bits of mantissa (about 4e-3), then accumulates in
# fp32, as the dtype's plain PyTorch computation does.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
TRITON_SCHEDULES = ("slab", "gemm", "atomic", "owner")


def _paths(device: torch.device) -> list[tuple[str, str]]:
    """(impl, schedule) pairs that run on ``device``: the PyTorch path always; Triton where it runs."""
    paths = [("torch", "auto")]
    try:
        resolve_impl("triton", device, torch.float32)
    except (RuntimeError, ValueError):
        return paths
    return paths + [("triton", schedule) for schedule in TRITON_SCHEDULES]


def _case(device, dtype, seed=0, n_tokens=45, dim=24, vocab=131):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, dim, generator=generator)
    weight = torch.randn(vocab, dim, generator=generator) / dim ** 0.5 * 4
    bias = torch.randn(vocab, generator=generator)
    targets = torch.randint(0, vocab, (n_tokens,), generator=generator)
    targets[::5] = -100
    upstream = torch.randn(n_tokens, generator=generator)
    return [t.to(device) for t in (hidden, weight, bias, targets, upstream)], dtype


def check(impl: str, schedule: str, dtype: torch.dtype, device: torch.device) -> dict:
    """One path against float64: the largest error of log-probs and of each gradient, relative to the largest
    reference value, and whether each is within the dtype's tolerance."""
    (hidden, weight, bias, targets, upstream), _ = _case(device, dtype)
    results = {}
    for name, fn in (("halo-ops", "fast"), ("reference", "exact")):
        work_dtype = dtype if fn == "fast" else torch.float64
        leaves = [t.detach().to(work_dtype, copy=True).requires_grad_() for t in (hidden, weight, bias)]
        if fn == "fast":
            out = linear_logprobs(*leaves[:2], targets, leaves[2], softcap=20.0, impl=impl, schedule=schedule,
                                  return_stats=True)
        else:
            out = linear_logprobs_reference(*leaves[:2], targets, leaves[2], softcap=20.0)
        loss = (out.logps * upstream.to(out.logps.dtype)).sum() + 0.1 * out.entropy.sum()
        loss.backward()
        results[name] = [out.logps.detach()] + [leaf.grad for leaf in leaves]
    errors = {}
    for label, got, want in zip(("logp", "d_hidden", "d_weight", "d_bias"), results["halo-ops"], results["reference"]):
        scale = want.abs().max().clamp(min=1e-30)
        errors[label] = ((got.double() - want).abs().max() / scale).item() if torch.isfinite(got).all() else float("inf")
    worst = max(errors.values())
    return {"impl": impl, "schedule": schedule, "dtype": str(dtype).removeprefix("torch."), **errors,
            "ok": worst <= TOLERANCE[dtype]}


def _median_ms(fn, device, repeats: int) -> float:
    from .autotune import time_call

    return time_call(fn, device, repeats) * 1e3


def time_default(n_tokens: int, dim: int, vocab: int, dtype: torch.dtype, device: torch.device,
                 repeats: int) -> list[dict]:
    """Forward+backward milliseconds of the default call, and of TRL's head where TRL is installed."""
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n_tokens, dim, device=device, dtype=dtype, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, dim, device=device, dtype=dtype, generator=generator) / dim ** 0.5).requires_grad_()
    targets = torch.randint(0, vocab, (n_tokens,), device=device, generator=generator)

    def step(logprobs):
        def run():
            hidden.grad = weight.grad = None
            logprobs().sum().backward()
        return run

    rows = [{"provider": "halo-ops (auto)",
             "ms": _median_ms(step(lambda: linear_logprobs(hidden, weight, targets, check_targets=False)), device,
                              repeats)}]
    if importlib.util.find_spec("trl") is not None:
        from trl.kernels import ChunkedLogProbFunction

        def trl_head():  # as trl.trainer.utils.add_fused_lm_head calls it (a 32768-wide vocabulary chunk)
            return ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0,
                                                ("log_probs",))[0]

        rows.append({"provider": "trl", "ms": _median_ms(step(trl_head), device, repeats)})
    for row in rows:
        row["x_trl"] = row["ms"] / rows[-1]["ms"] if len(rows) > 1 else None
    return rows


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m halo_ops.selftest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="timing dtype (default: bf16 on CUDA, else fp32)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-timing", action="store_true", help="only the checks against float64")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    impl = resolve_impl("auto", device, dtype)
    schedule = resolve_schedule("auto", impl=impl, deterministic=False, grad_filter_eps=0.0, device=device,
                                dtype=dtype, dim=args.hidden, vocab=args.vocab)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    lines = [f"halo-ops selftest on {name}", "",
             f"- halo-ops {_version('halo-ops')}, torch {torch.__version__}, triton {_version('triton')}, "
             f"trl {_version('trl')}, python {platform.python_version()}",
             f"- TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET') or 'unset'}; impl='auto' runs {impl!r} here; "
             f"schedule='auto' at N={args.tokens}, D={args.hidden}, V={args.vocab}, {dtype}: {schedule!r}", "",
             "| impl | schedule | dtype | logp | d_hidden | d_weight | d_bias | within tolerance |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    rows = [check(path_impl, path_schedule, check_dtype, device)
            for path_impl, path_schedule in _paths(device) for check_dtype in (torch.float32, torch.bfloat16)]
    lines += [f"| {r['impl']} | {r['schedule']} | {r['dtype']} | {r['logp']:.1e} | {r['d_hidden']:.1e} | "
              f"{r['d_weight']:.1e} | {r['d_bias']:.1e} | {'yes' if r['ok'] else 'NO'} |" for r in rows]
    lines += ["", "Errors: the largest absolute difference to float64, over the largest reference value; "
              f"tolerance {TOLERANCE[torch.float32]:g} (float32), {TOLERANCE[torch.bfloat16]:g} (bfloat16)."]
    if not args.no_timing:
        timed = time_default(args.tokens, args.hidden, args.vocab, dtype, device, args.repeats)
        lines += ["", f"Forward+backward, N={args.tokens}, D={args.hidden}, V={args.vocab}, {dtype} "
                  f"(median of {args.repeats}):", "", "| provider | ms | × TRL |", "|---|---:|---:|"]
        lines += [f"| {r['provider']} | {r['ms']:.1f} | {'' if r['x_trl'] is None else format(r['x_trl'], '.2f')} |"
                  for r in timed]
    failed = [r for r in rows if not r["ok"]]
    lines += ["", f"FAILED: {len(failed)} path(s) off the float64 reference" if failed else "all paths match float64"]
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
