"""What a user would run instead, each as ``fn(hidden, weight, targets) -> per-token log-probs [N]``."""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from halo_ops import linear_logprobs, resolve_impl


@dataclass(frozen=True)
class Provider:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    available: Callable[[torch.device], str | None]  # None when it runs here, else why not


def _always(_device):
    return None


def _needs_module(module: str, cuda_only: bool = False):
    def check(device):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
        if cuda_only and device.type != "cuda":
            return "runs on CUDA only"
        return None

    return check


def plain_logprobs(hidden, weight, targets):
    """Full logits, log-softmax in fp32, gather: what a training loop writes by default."""
    logits = torch.nn.functional.linear(hidden, weight).float()
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


_compiled = None


def compiled_logprobs(hidden, weight, targets):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(plain_logprobs)
    return _compiled(hidden, weight, targets)


def trl_logprobs(hidden, weight, targets):
    from trl.kernels import ChunkedLogProbFunction

    # trl.trainer.utils.add_fused_lm_head calls it with a 32768-wide vocabulary chunk
    return ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ("log_probs",))[0]


def cce_logprobs(hidden, weight, targets):
    """cut-cross-entropy as it ships: its default gradient filter (approximate) on."""
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(hidden, weight, targets, reduction="none")


def cce_exact_logprobs(hidden, weight, targets):
    """cut-cross-entropy with its gradient filter off: the exact function halo-ops computes by default."""
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(hidden, weight, targets, reduction="none", filter_eps=None)


def torch_lce_logprobs(hidden, weight, targets):
    """PyTorch's own ``F.linear_cross_entropy`` (2.13+), on its chunked path (``options`` set), per token."""
    options = torch.nn.LinearCrossEntropyOptions()
    return -torch.nn.functional.linear_cross_entropy(hidden, weight, targets, reduction="none", options=options)


def _torch_lce_available(_device):
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no chunked F.linear_cross_entropy (2.13+)"
    return None


# Extra keyword options for every halo-ops call in a benchmark run (``python -m bench --grad-filter-eps``)
HALO_OPTIONS: dict = {}


def halo_logprobs(hidden, weight, targets):
    return linear_logprobs(hidden, weight, targets, check_targets=False, **HALO_OPTIONS)


def halo_schedule(schedule: str):
    """halo-ops with one named backward schedule (``linear_logprobs(schedule=...)``)."""

    def logprobs(hidden, weight, targets):
        return linear_logprobs(hidden, weight, targets, check_targets=False, schedule=schedule, **HALO_OPTIONS)

    return logprobs


def halo_recompute_logprobs(hidden, weight, targets):
    """halo-ops on the Triton path with recompute=True: a frozen head's backward recomputes instead of scaling the
    Jacobian built in the forward (the frozen-head case's A/B)."""
    return linear_logprobs(hidden, weight, targets, check_targets=False, recompute=True, **HALO_OPTIONS)


def halo_torch_logprobs(hidden, weight, targets):
    return linear_logprobs(hidden, weight, targets, impl="torch", check_targets=False, **HALO_OPTIONS)


def halo_torch_recompute_logprobs(hidden, weight, targets):
    """The PyTorch path with the backward recomputing the logits always (no Jacobian for a frozen head)."""
    return linear_logprobs(hidden, weight, targets, impl="torch", check_targets=False, recompute=True, **HALO_OPTIONS)


def _halo_triton_available(device):
    return None if resolve_impl("auto", device, torch.float32) == "triton" else "Triton runs on CUDA only here"


PROVIDERS = {
    p.name: p
    for p in (
        Provider("halo-ops", halo_logprobs, _halo_triton_available),
        *(Provider(f"halo-ops[{s}]", halo_schedule(s), _halo_triton_available) for s in ("atomic", "owner", "slab", "gemm")),
        Provider("halo-ops[recompute]", halo_recompute_logprobs, _halo_triton_available),
        Provider("halo-ops[torch]", halo_torch_logprobs, _always),
        Provider("halo-ops[torch/recompute]", halo_torch_recompute_logprobs, _always),
        Provider("plain", plain_logprobs, _always),
        Provider("torch.compile", compiled_logprobs, _always),
        Provider("trl", trl_logprobs, _needs_module("trl")),
        Provider("cce", cce_logprobs, _needs_module("cut_cross_entropy", cuda_only=True)),
        Provider("cce-no-filter", cce_exact_logprobs, _needs_module("cut_cross_entropy", cuda_only=True)),
        Provider("torch.linear_cross_entropy", torch_lce_logprobs, _torch_lce_available),
    )
}


def _fault_raise(hidden, weight, targets):
    raise RuntimeError("injected fault (HALO_BENCH_FAULTS)")


def _fault_hang(hidden, weight, targets):
    time.sleep(3600)  # a step past its deadline


# Checks of the device run itself (bash bench/gpu_session.sh smoke with HALO_BENCH_FAULTS=1): a provider that
# raises and one that hangs, so that the smoke run shows each as such and keeps every other row.
if os.environ.get("HALO_BENCH_FAULTS") == "1":
    PROVIDERS.update({p.name: p for p in (Provider("fault-raise", _fault_raise, _always),
                                          Provider("fault-hang", _fault_hang, _always))})
