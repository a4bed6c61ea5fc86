"""The token-level op as ``torch.library`` custom ops, so ``torch.compile`` traces through it without a break.

``halo_ops::token_logprobs`` (forward) and ``halo_ops::token_logprobs_backward`` carry the options as
primitives (custom ops take no Python objects); ``OpSpec`` is rebuilt inside. Autograd is registered
on the forward: it saves hidden, weight, bias, targets and the per-token logsumexp, and its backward
calls the backward op. Each has a fake implementation for tracing.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._dispatch import OpSpec, backward_tokens, forward_tokens
from .chunked import accumulation_dtype
from .transform import LogitTransform


def spec_args(spec: OpSpec) -> tuple:
    """OpSpec as custom-op arguments: (impl, ignore_index, logit_scale, softcap (0: none), temperature,
    with_stats, deterministic, grad_filter_eps)."""
    t = spec.transform
    return (spec.impl, spec.ignore_index, float(t.logit_scale), float(t.softcap or 0.0), float(t.temperature),
            spec.with_stats, spec.deterministic, float(spec.grad_filter_eps))


N_SPEC_ARGS = 8  # len(spec_args(...)): the custom ops take them right after their tensor inputs


def spec_from_args(impl, ignore_index, logit_scale, softcap, temperature, with_stats, deterministic,
                   grad_filter_eps) -> OpSpec:
    transform = LogitTransform(logit_scale, softcap if softcap > 0 else None, temperature)
    return OpSpec(impl=impl, transform=transform, ignore_index=ignore_index, with_stats=with_stats,
                  deterministic=deterministic, grad_filter_eps=grad_filter_eps)


@torch.library.custom_op("halo_ops::token_logprobs", mutates_args=())
def _token_logprobs(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, impl: str, ignore_index: int,
    logit_scale: float, softcap: float, temperature: float, with_stats: bool, deterministic: bool,
    grad_filter_eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logps, lse, entropy, mean_logit) [N]; the stats are empty [0] unless with_stats."""
    spec = spec_from_args(impl, ignore_index, logit_scale, softcap, temperature, with_stats, deterministic,
                          grad_filter_eps)
    logps, lse, entropy, mean_logit = forward_tokens(spec, hidden, weight, bias, targets)
    if entropy is None:
        entropy, mean_logit = logps.new_empty(0), logps.new_empty(0)
    return logps, lse, entropy, mean_logit


@_token_logprobs.register_fake
def _(hidden, weight, bias, targets, impl, ignore_index, logit_scale, softcap, temperature, with_stats,
      deterministic, grad_filter_eps):
    n, dtype = hidden.shape[0], accumulation_dtype(hidden.dtype)
    stat = n if with_stats else 0
    return (hidden.new_empty(n, dtype=dtype), hidden.new_empty(n, dtype=dtype), hidden.new_empty(stat, dtype=dtype),
            hidden.new_empty(stat, dtype=dtype))


@torch.library.custom_op("halo_ops::token_logprobs_backward", mutates_args=())
def token_logprobs_backward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor, grad_logps: Tensor,
    impl: str, ignore_index: int, logit_scale: float, softcap: float, temperature: float, with_stats: bool,
    deterministic: bool, grad_filter_eps: float, needs_hidden: bool, needs_weight: bool, needs_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for (hidden, weight, bias) of Σ_t grad_logps[t] · logp[t]; empty [0] where not needed."""
    spec = spec_from_args(impl, ignore_index, logit_scale, softcap, temperature, with_stats, deterministic,
                          grad_filter_eps)
    grads = backward_tokens(spec, hidden, weight, bias, targets, lse, grad_logps,
                            (needs_hidden, needs_weight, needs_bias and bias is not None))
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@token_logprobs_backward.register_fake
def _(hidden, weight, bias, targets, lse, grad_logps, impl, ignore_index, logit_scale, softcap, temperature,
      with_stats, deterministic, grad_filter_eps, needs_hidden, needs_weight, needs_bias):
    return (torch.empty_like(hidden) if needs_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if needs_weight else hidden.new_empty(0),
            torch.empty_like(bias) if needs_bias and bias is not None else hidden.new_empty(0))


def input_grads(grads: tuple[Tensor, Tensor, Tensor], needs) -> tuple:
    """The backward op's outputs as autograd gradients: None where not needed."""
    return tuple(g if need else None for g, need in zip(grads, needs))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, *options = inputs
    ctx.options = options
    ctx.save_for_backward(hidden, weight, bias, targets, output[1])


def _backward(ctx, grad_logps, *_stat_grads):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:3])
    if grad_logps is None:
        grad_logps = torch.zeros_like(lse)
    grads = token_logprobs_backward(hidden, weight, bias, targets, lse, grad_logps, *ctx.options, *needs)
    return (*input_grads(grads, needs), *([None] * len(ctx.options)), None)


_token_logprobs.register_autograd(_backward, setup_context=_setup_context)


def token_logprobs(hidden, weight, bias, targets, spec: OpSpec):
    """(logps [N], entropy [N] | None, mean_logit [N] | None), differentiable in logps only."""
    logps, _, entropy, mean_logit = _token_logprobs(hidden, weight, bias, targets, *spec_args(spec))
    if not spec.with_stats:
        return logps, None, None
    return logps, entropy.detach(), mean_logit.detach()
