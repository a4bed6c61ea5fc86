"""pytest-benchmark suite: ``pytest bench/ --benchmark-only``. Timings only; nothing here asserts a time.

Shapes are small enough for a CPU run; set HALO_BENCH_TOKENS / HALO_BENCH_VOCAB / HALO_BENCH_HIDDEN for
larger ones (on a GPU, say 16384 / 128256 / 4096).
"""

import os

import pytest
import torch

from .kto_step import KTO_PROVIDERS, KTOShape
from .measure import Shape
from .providers import PROVIDERS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOKENS = int(os.environ.get("HALO_BENCH_TOKENS", 2048))
VOCAB = int(os.environ.get("HALO_BENCH_VOCAB", 8000))
HIDDEN = int(os.environ.get("HALO_BENCH_HIDDEN", 128))


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _skip_unavailable(provider):
    why_not = provider.available(DEVICE)
    if why_not:
        pytest.skip(why_not)


@pytest.mark.parametrize("case", ["forward+backward", "forward-only"])
@pytest.mark.parametrize("name", list(PROVIDERS))
def test_logprobs(benchmark, name, case):
    provider = PROVIDERS[name]
    _skip_unavailable(provider)
    hidden, weight, targets = Shape(TOKENS, HIDDEN, VOCAB, DTYPE).inputs(DEVICE, requires_grad=case != "forward-only")

    def run():
        if case == "forward-only":
            with torch.no_grad():
                provider.fn(hidden, weight, targets)
        else:
            hidden.grad = weight.grad = None
            provider.fn(hidden, weight, targets).sum().backward()
        _sync()

    benchmark.group = f"logprobs {case} N={TOKENS} D={HIDDEN} V={VOCAB}"
    benchmark.pedantic(run, warmup_rounds=1, rounds=3)


@pytest.mark.parametrize("distribution", ["random", "peaked"])
@pytest.mark.parametrize("name", list(KTO_PROVIDERS))
def test_kto_step(benchmark, name, distribution):
    provider = KTO_PROVIDERS[name]
    _skip_unavailable(provider)
    x = KTOShape(max(1, TOKENS // 256), min(TOKENS, 256), HIDDEN, VOCAB, DTYPE, peaked=distribution == "peaked").inputs(
        DEVICE)

    def run():
        x["hidden"].grad = x["weight"].grad = None
        provider.fn(x)
        _sync()

    benchmark.group = f"kto-step {distribution} N={TOKENS} D={HIDDEN} V={VOCAB}"
    benchmark.pedantic(run, warmup_rounds=1, rounds=3)
