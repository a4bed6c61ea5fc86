"""Time and peak memory of one provider on one case."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .memory import peak_extra_bytes
from .providers import Provider

# frozen-head: forward+backward with the weight frozen (LoRA/PEFT), so only dH is computed
# kto-loss: the policy's KTO loss alone, forward and backward (bench.kto_step.LOSS_PROVIDERS)
CASES = ("forward", "backward", "forward+backward", "frozen-head", "forward-only", "kto-step", "kto-loss")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype names


@dataclass
class Shape:
    tokens: int
    hidden: int
    vocab: int
    dtype: torch.dtype

    def inputs(self, device, requires_grad: bool, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        hidden = torch.randn(self.tokens, self.hidden, generator=gen).to(device, self.dtype)
        weight = (torch.randn(self.vocab, self.hidden, generator=gen) / self.hidden**0.5).to(device, self.dtype)
        targets = torch.randint(0, self.vocab, (self.tokens,), generator=gen).to(device)
        return hidden.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), targets


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, repeats: int, setup=None) -> float:
    if device.type == "cuda" and setup is None:
        import triton

        return triton.testing.do_bench(fn, return_mode="median") / 1e3
    times = []
    for _ in range(repeats):
        args = setup() if setup else ()
        _sync(device)
        start = time.perf_counter()
        fn(*args)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _runner(provider: Provider, shape, case: str, device: torch.device):
    """(prepare, run) for one row: ``run(*prepare())`` is the measured call, ``prepare`` is not measured."""
    if case in ("kto-step", "kto-loss"):
        x = shape.inputs(device)

        def prepare():
            x["hidden"].grad = x["weight"].grad = None
            return ()

        return prepare, lambda: provider.fn(x)
    grad = case != "forward-only"
    hidden, weight, targets = shape.inputs(device, requires_grad=grad)
    if case == "frozen-head":
        weight.requires_grad_(False)
    upstream = torch.randn(shape.tokens, device=device)

    def forward():
        with torch.set_grad_enabled(grad):
            return provider.fn(hidden, weight, targets)

    def loss():
        hidden.grad = weight.grad = None
        return ((forward() * upstream).sum(),)

    if case == "backward":
        return loss, lambda value: value.backward()
    if case in ("forward+backward", "frozen-head"):
        return tuple, lambda: loss()[0].backward()
    return tuple, forward


def time_row(provider: Provider, shape, case: str, device: torch.device, repeats: int = 3) -> float:
    """Median milliseconds of one case (after a warm-up call, which also compiles)."""
    prepare, run = _runner(provider, shape, case, device)
    run(*prepare())
    if device.type == "cuda" and case not in ("backward", "kto-step", "kto-loss"):
        return median_seconds(run, device, repeats) * 1e3
    return median_seconds(run, device, repeats, setup=prepare) * 1e3


def peak_row(provider: Provider, shape, case: str, device: torch.device) -> float:
    """Peak MiB beyond what is live before the measured call (inputs; for "backward", the saved forward).

    On CPU this switches the process's allocator to mmap large blocks (see ``bench.memory``): take
    every timing of a run before its first peak.
    """
    prepare, run = _runner(provider, shape, case, device)
    run(*prepare())  # warm-up (compiles)
    args = prepare()
    peak, _ = peak_extra_bytes(lambda: run(*args), device)
    return peak / 2**20
