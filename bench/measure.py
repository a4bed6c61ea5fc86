"""Time and peak memory of one provider on one case."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .memory import peak_extra_bytes
from .providers import Provider

CASES = ("forward", "backward", "forward+backward", "forward-only", "kto-step")


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


def _median_seconds(fn, device, repeats: int, setup=None) -> float:
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


def measure(provider: Provider, shape: Shape, case: str, device: torch.device, repeats: int = 3) -> dict:
    """One row: median seconds and peak extra bytes (beyond inputs) of ``case`` for ``provider``."""
    grad = case != "forward-only"
    hidden, weight, targets = shape.inputs(device, requires_grad=grad)
    upstream = torch.randn(shape.tokens, device=device)

    def forward():
        with torch.set_grad_enabled(grad):
            return provider.fn(hidden, weight, targets)

    def forward_backward():
        hidden.grad = weight.grad = None
        (forward() * upstream).sum().backward()

    if case == "backward":
        def setup():
            hidden.grad = weight.grad = None
            return (forward() * upstream).sum(),

        def run(loss):
            loss.backward()

        forward_backward()  # warm-up (compiles)
        seconds = _median_seconds(run, device, repeats, setup=setup)
        loss = setup()[0]  # what the forward saved is live before the backward starts
        peak, _ = peak_extra_bytes(lambda: run(loss), device)
    else:
        run = forward_backward if case == "forward+backward" else forward
        run()  # warm-up (compiles)
        seconds = _median_seconds(run, device, repeats)
        hidden.grad = weight.grad = None
        peak, _ = peak_extra_bytes(run, device)
    return {"provider": provider.name, "case": case, "tokens": shape.tokens, "hidden": shape.hidden,
            "vocab": shape.vocab, "dtype": str(shape.dtype).removeprefix("torch."), "ms": seconds * 1e3,
            "peak_mib": peak / 2**20}


def measure_kto_step(provider: Provider, shape, device: torch.device, repeats: int = 3) -> dict:
    """One row for the whole LM-head part of a KTO step (``bench.kto_step``): median seconds and peak bytes."""
    x = shape.inputs(device)

    def step():
        x["hidden"].grad = x["weight"].grad = None
        provider.fn(x)

    step()  # warm-up (compiles)
    seconds = _median_seconds(step, device, repeats)
    x["hidden"].grad = x["weight"].grad = None
    peak, _ = peak_extra_bytes(step, device)
    return {"provider": provider.name, "case": "kto-step", "tokens": shape.tokens, "hidden": shape.hidden,
            "vocab": shape.vocab, "dtype": str(shape.dtype).removeprefix("torch."), "ms": seconds * 1e3,
            "peak_mib": peak / 2**20}
