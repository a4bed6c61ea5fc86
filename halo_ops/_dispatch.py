"""Backend choice and the token-level forward/backward every op shares (no autograd here)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from . import chunked
from ._validation import check_linear_inputs
from ._zero3 import gathered
from .transform import LogitTransform

IMPLS = ("auto", "triton", "torch")
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class OpSpec:
    impl: str  # "triton" or "torch", already resolved
    transform: LogitTransform
    ignore_index: int
    with_stats: bool
    deterministic: bool = False
    grad_filter_eps: float = 0.0


def _interpreting() -> bool:
    from .kernels import interpreting

    return interpreting()


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """Pick the backend: Triton on CUDA (and on CPU under TRITON_INTERPRET=1), chunked PyTorch otherwise.

    ``auto`` also takes the PyTorch path for float64, which the kernels do not take; both compute
    the same function.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    triton_device = _TRITON_INSTALLED and (device.type == "cuda" or (device.type == "cpu" and _interpreting()))
    if impl == "auto":
        return "triton" if triton_device and dtype != torch.float64 else "torch"
    if not _TRITON_INSTALLED:
        raise RuntimeError("impl='triton' needs the triton package; install it or use impl='torch'")
    if not triton_device:
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; got device {device}"
        )
    if dtype == torch.float64:
        raise TypeError("impl='triton' takes float32, bfloat16 or float16; use impl='torch' for float64")
    return "triton"


def forward_tokens(spec: OpSpec, hidden, weight, bias, targets):
    """(logps, lse, entropy, mean_logit), each [N], from the chosen backend; autocast off, N = 0 handled."""
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=chunked.accumulation_dtype(hidden.dtype))
        stat = empty.clone() if spec.with_stats else None
        return empty, empty.clone(), stat, None if stat is None else stat.clone()
    t = spec.transform
    with torch.autocast(hidden.device.type, enabled=False):
        if spec.impl == "torch":
            return chunked.chunked_forward(hidden, weight, bias, targets, t, spec.ignore_index, spec.with_stats)
        from .kernels import linear_logprobs_forward

        return linear_logprobs_forward(
            hidden, weight, bias, targets, ignore_index=spec.ignore_index, logit_scale=t.logit_scale,
            softcap=t.softcap, temperature=t.temperature, with_stats=spec.with_stats,
        )


def backward_tokens(spec: OpSpec, hidden, weight, bias, targets, lse, grad_logps, needs):
    """Gradients of Σ_t grad_logps[t] · logp[t] for (hidden, weight, bias); None where not needed.

    ``grad_logps`` [N] may be None (no gradient: zeros); it is zeroed at ignored targets here.
    """
    if grad_logps is None or hidden.shape[0] == 0:
        return tuple(torch.zeros_like(x) if need and x is not None else None
                     for x, need in zip((hidden, weight, bias), needs))
    grad_logps = torch.where(targets != spec.ignore_index, grad_logps, 0.0)
    grad_logps = grad_logps.to(chunked.accumulation_dtype(hidden.dtype)).contiguous()
    t = spec.transform
    # ZeRO-3 re-partitions the head after the forward; the recompute needs it whole again
    with torch.autocast(hidden.device.type, enabled=False), gathered(weight, bias):
        if spec.impl == "torch":
            return chunked.chunked_backward(hidden, weight, bias, targets, lse, grad_logps, t, needs,
                                            grad_filter_eps=spec.grad_filter_eps)
        from .kernels import linear_logprobs_backward

        return linear_logprobs_backward(
            hidden, weight, bias, targets, lse, grad_logps, logit_scale=t.logit_scale, softcap=t.softcap,
            temperature=t.temperature, needs=needs, deterministic=spec.deterministic,
            grad_filter_eps=spec.grad_filter_eps,
        )


def _autocast(tensor: torch.Tensor | None, device_type: str) -> torch.Tensor | None:
    if tensor is None or not torch.is_autocast_enabled(device_type):
        return tensor
    dtype = torch.get_autocast_dtype(device_type)
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def prepare_linear_inputs(hidden, weight, targets, bias, *, ignore_index, logit_scale, softcap, temperature, impl,
                          with_stats, check_targets, check_finite, deterministic=False, grad_filter_eps=0.0):
    """Autocast, validation and backend choice shared by the public ops.

    Returns (hidden [N, D], weight, bias, targets [N] int64 contiguous, spec).
    """
    transform = LogitTransform(logit_scale, softcap, temperature)
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    hidden, weight, bias = (_autocast(x, device_type) for x in (hidden, weight, bias))
    check_linear_inputs(hidden, weight, targets, bias, ignore_index=ignore_index,
                        check_targets=check_targets, check_finite=check_finite)
    if not (isinstance(grad_filter_eps, (int, float)) and 0 <= grad_filter_eps < float("inf")):
        raise ValueError(f"grad_filter_eps must be a finite number >= 0, got {grad_filter_eps!r}")
    spec = OpSpec(resolve_impl(impl, hidden.device, hidden.dtype), transform, int(ignore_index), with_stats,
                   bool(deterministic), float(grad_filter_eps))
    flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
    return hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_targets, spec
