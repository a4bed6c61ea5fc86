"""``linear_logprobs``: per-token log-probs of a linear LM head without building the logits."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import chunked
from ._zero3 import gathered
from ._reduction import check_reduction, reduce_last_dim
from ._validation import check_linear_inputs
from .transform import LogitTransform

IMPLS = ("auto", "triton", "torch")
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


class LinearLogProbs(NamedTuple):
    """``linear_logprobs(..., return_stats=True)``: log-probs plus per-token statistics (no gradient)."""

    logps: torch.Tensor  # like targets ("none") or one value per row ("sum"/"mean"), float32
    entropy: torch.Tensor  # like targets: entropy of softmax(z), 0 at ignored positions
    mean_logit: torch.Tensor  # like targets: mean over the vocabulary of z, 0 at ignored positions


@dataclass(frozen=True)
class _OpSpec:
    impl: str  # "triton" or "torch", already resolved
    transform: LogitTransform
    ignore_index: int
    with_stats: bool
    deterministic: bool = False


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


def forward_tokens(spec: _OpSpec, hidden, weight, bias, targets):
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


def backward_tokens(spec: _OpSpec, hidden, weight, bias, targets, lse, grad_logps, needs):
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
            return chunked.chunked_backward(hidden, weight, bias, targets, lse, grad_logps, t, needs)
        from .kernels import linear_logprobs_backward

        return linear_logprobs_backward(
            hidden, weight, bias, targets, lse, grad_logps, logit_scale=t.logit_scale, softcap=t.softcap,
            temperature=t.temperature, needs=needs, deterministic=spec.deterministic,
        )


class LinearLogProbsFunction(torch.autograd.Function):
    """Autograd Function over 2-D inputs: hidden [N, D], weight [V, D], bias [V] | None, targets [N] int64.

    Returns (logps [N], entropy [N] | None, mean_logit [N] | None). Saves hidden, weight, bias,
    targets and the per-token logsumexp only when a gradient is needed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, spec: _OpSpec):
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        logps, lse, entropy, mean_logit = forward_tokens(spec, hidden, weight, bias, targets)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        # One call: each call replaces the set of non-differentiable outputs
        ctx.mark_non_differentiable(*(stat for stat in (entropy, mean_logit) if stat is not None))
        return logps, entropy, mean_logit

    @staticmethod
    def backward(ctx, grad_logps, *_unused_stat_grads):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        grads = backward_tokens(ctx.spec, hidden, weight, bias, targets, lse, grad_logps,
                                tuple(ctx.needs_input_grad[:3]))
        return (*grads, None, None)


def _autocast(tensor: torch.Tensor | None, device_type: str) -> torch.Tensor | None:
    if tensor is None or not torch.is_autocast_enabled(device_type):
        return tensor
    dtype = torch.get_autocast_dtype(device_type)
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def prepare_linear_inputs(hidden, weight, targets, bias, *, ignore_index, logit_scale, softcap, temperature, impl,
                          with_stats, check_targets, check_finite, deterministic=False):
    """Autocast, validation and backend choice shared by the public ops.

    Returns (hidden [N, D], weight, bias, targets [N] int64 contiguous, spec).
    """
    transform = LogitTransform(logit_scale, softcap, temperature)
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    hidden, weight, bias = (_autocast(x, device_type) for x in (hidden, weight, bias))
    check_linear_inputs(hidden, weight, targets, bias, ignore_index=ignore_index,
                        check_targets=check_targets, check_finite=check_finite)
    spec = _OpSpec(resolve_impl(impl, hidden.device, hidden.dtype), transform, int(ignore_index), with_stats,
                   bool(deterministic))
    flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
    return hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_targets, spec


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    reduction: str = "none",
    impl: str = "auto",
    return_stats: bool = False,
    check_targets: bool = True,
    check_finite: bool = False,
    deterministic: bool = False,
) -> torch.Tensor | LinearLogProbs:
    """Log-probabilities of ``targets`` under a linear LM head, never building the ``[N, V]`` logits.

    With ``y = hidden · weightᵀ + bias`` and
    ``z = softcap · tanh(logit_scale · y / softcap) / temperature`` (softcap optional),

        logp[..., t] = z[..., t, targets[..., t]] − logsumexp_v z[..., t, v]

    and 0 where ``targets == ignore_index``.

    Args:
        hidden: ``[..., D]`` last hidden states; ``hidden[..., t]`` predicts ``targets[..., t]``
            (already shifted).
        weight: ``[V, D]`` LM-head weight (may be tied to the input embedding).
        targets: ``[...]`` integer token ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``.
        reduction: ``"none"`` → ``[...]`` per token; ``"sum"`` / ``"mean"`` reduce the last
            dimension (mean over the row's non-ignored tokens, 0 for a row with none).
        impl: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (chunked
            PyTorch, any device), or ``"auto"`` (Triton where it runs, else PyTorch).
        return_stats: also return per-token entropy and mean logit of ``softmax(z)`` from the same
            pass (no gradient), as a :class:`LinearLogProbs`.
        check_targets: raise on targets outside ``[0, V)`` (reads them on the host: one sync).
        check_finite: raise on NaN/inf in hidden, weight or bias (one extra pass and a sync).
        deterministic: Triton backward without atomics, bitwise reproducible from run to run, at the
            cost of one more logits recompute (the PyTorch path is always deterministic).

    Returns float32 log-probs (float64 for float64 inputs), differentiable with respect to hidden,
    weight and bias; gradients come back in the inputs' dtypes. Under ``torch.autocast`` the
    projection runs in the autocast dtype.
    """
    check_reduction(reduction)
    hidden2d, weight, bias, flat_targets, spec = prepare_linear_inputs(
        hidden, weight, targets, bias, ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
        temperature=temperature, impl=impl, with_stats=return_stats, check_targets=check_targets,
        check_finite=check_finite, deterministic=deterministic)
    logps, entropy, mean_logit = LinearLogProbsFunction.apply(hidden2d, weight, bias, flat_targets, spec)
    valid = targets != ignore_index
    logps = reduce_last_dim(logps.view(targets.shape), valid, reduction)
    if not return_stats:
        return logps
    return LinearLogProbs(logps, entropy.view(targets.shape), mean_logit.view(targets.shape))
