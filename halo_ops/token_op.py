"""The token op: per-token log-probs of a linear LM head, its backward, and their ``torch.library`` registration.

``forward_tokens`` runs a backend (the chunked PyTorch path or the Triton forward kernel), each giving
per-piece partials that ``halo_ops.partials`` merges into log-probs, the logsumexp the backward needs
and the statistics. ``backward_tokens`` runs the backend's backward on one coefficient per token and
returns gradients in the inputs' dtypes. Both are registered as custom ops (``halo_ops::token_logprobs``
and ``halo_ops::token_logprobs_backward``) with fake implementations, and autograd is registered on
the forward, so ``torch.compile`` traces through without a graph break. The options travel as one
encoded ``TokenOptions`` string (``halo_ops.options``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import options as opts
from .options import TokenOptions, accumulation_dtype
from .partials import (STATISTICS, TokenStats, add_linear_logit_sums, linear_logit_sums, merge_partials, stat_dtype,
                       zero_stats)
from .zero3 import gathered

# A bf16/fp16 weight's gradient is built in vocabulary slices of at most this many bytes of fp32, each cast
# into the output, so no fp32 copy of the whole [V, D] gradient exists (2 GiB at V=128256, D=4096).
ACCUMULATOR_BYTES = 1 << 28


def weight_slice_rows(vocab: int, dim: int, weight_dtype: torch.dtype) -> int:
    """Vocabulary rows per dW slice: all of them when dW accumulates in the weight's own dtype (fp32, fp64),
    else as many as ``ACCUMULATOR_BYTES`` of fp32 hold, in multiples of 256 (every kernel's BLOCK_V divides it)."""
    if accumulation_dtype(weight_dtype) == weight_dtype:
        return vocab
    return min(vocab, max(256, ACCUMULATOR_BYTES // (4 * dim) // 256 * 256))


def token_partials(options: TokenOptions, hidden, weight, bias, targets):
    """The backend's per-piece partials [3 or 7, K, N] (``halo_ops.partials``, the statistics ``options.stats``
    asks for) in the accumulation dtype, and the Jacobian d logp_t / d h_t [N, D] with ``options.save_jacobian``,
    else None. Autocast is off inside; N > 0."""
    jacobian = None
    with torch.autocast(hidden.device.type, enabled=False):
        if options.impl == "torch":
            from .chunked import chunked_forward

            partials, jacobian = chunked_forward(hidden, weight, bias, targets, options)
        elif options.save_jacobian:
            from .kernels.jacobian import jacobian_forward

            partials, jacobian = jacobian_forward(hidden, weight, bias, targets, options)
        else:
            from .kernels import linear_logprobs_forward

            partials = linear_logprobs_forward(hidden, weight, bias, targets, options)
        partials = partials.to(accumulation_dtype(hidden.dtype))
        add_linear_logit_sums(partials, hidden, linear_logit_sums(weight, bias, options, partials.dtype))
    return partials, jacobian


def forward_tokens(options: TokenOptions, hidden, weight, bias, targets):
    """(logps [N], lse [N], stats, jacobian): the first two in the accumulation dtype; ``stats`` a
    ``partials.TokenStats`` of ``options.stats`` (None without statistics); the Jacobian d logp_t / d h_t [N, D]
    with ``options.save_jacobian``, else None. Autocast is off inside; N = 0 is handled."""
    acc = accumulation_dtype(hidden.dtype)
    if hidden.shape[0] == 0:
        jacobian = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if options.save_jacobian else None
        empty = hidden.new_zeros(0, dtype=acc)
        stats = zero_stats(options.stats, 0, acc, hidden.device) if options.stats else None
        return empty, empty.clone(), stats, jacobian
    partials, jacobian = token_partials(options, hidden, weight, bias, targets)
    return (*merge_partials(partials, targets != options.ignore_index, weight.shape[0], options.stats), jacobian)


def jacobian_grad(jacobian, targets, grad_logps, ignore_index: int):
    """dH = g_t · J_t [N, D] from the forward's Jacobian (a frozen head: the weight and bias need no gradient)."""
    grad = torch.where(targets != ignore_index, grad_logps, 0.0).to(jacobian.dtype)
    return grad.unsqueeze(1) * jacobian


def backward_accumulators(options: TokenOptions, hidden, weight, bias, targets, lse, grad_logps, needs,
                          grad_entropy=None, entropy=None):
    """Gradients of Σ_t grad_logps[t] · logp[t] (+ grad_entropy[t] · H[t]) for (hidden, weight, bias) as the backend
    leaves them (fp32, or fp64 for fp64 inputs; dW already in its dtype when built in slices); None where not needed.

    ``grad_logps`` [N] may be None (no gradient: zeros); it is zeroed at ignored targets here. With
    ``grad_entropy`` [N] (and the forward's ``entropy``), the entropy's gradient ∂H/∂z = −p (log p + H) joins in
    the same recompute: the backends take coefficient rows (g, a, b) [3, N] and form
    dL/dz = g · onehot − p · (a + b · z), with a = g + g_H (H − lse) and b = g_H.
    """
    needs = (needs[0], needs[1], needs[2] and bias is not None)
    if (grad_logps is None and grad_entropy is None) or hidden.shape[0] == 0:
        return tuple(torch.zeros_like(x) if need else None for x, need in zip((hidden, weight, bias), needs))
    acc = accumulation_dtype(hidden.dtype)
    valid = targets != options.ignore_index
    grad_logps = torch.where(valid, grad_logps, 0.0).to(acc) if grad_logps is not None else lse.new_zeros(lse.shape)
    if grad_entropy is not None:
        grad_entropy = torch.where(valid, grad_entropy, 0.0).to(acc)
        shift = torch.where(valid, entropy.to(acc) - lse, 0.0)  # H − lse; lse is +inf at ignored targets
        grad_logps = torch.stack([grad_logps, grad_logps + grad_entropy * shift, grad_entropy])
    grad_logps = grad_logps.contiguous()
    slice_rows = weight_slice_rows(*weight.shape, weight.dtype)
    # ZeRO-3 re-partitions the head after the forward; the recompute needs it whole again
    with torch.autocast(hidden.device.type, enabled=False), gathered(weight, bias):
        if options.impl == "torch":
            from .chunked import chunked_backward as backend
        else:
            from .kernels import linear_logprobs_backward as backend
        return backend(hidden, weight, bias, targets, lse, grad_logps, options, needs, slice_rows=slice_rows)


def backward_tokens(options: TokenOptions, hidden, weight, bias, targets, lse, grad_logps, needs, grad_entropy=None,
                    entropy=None):
    """``backward_accumulators``' gradients in the inputs' dtypes; None where not needed."""
    grads = backward_accumulators(options, hidden, weight, bias, targets, lse, grad_logps, needs, grad_entropy,
                                  entropy)
    return tuple(None if g is None else g.to(x.dtype) for g, x in zip(grads, (hidden, weight, bias)))


@torch.library.custom_op("halo_ops::token_logprobs", mutates_args=())
def _token_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                    options: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(logps, lse, entropy, mean_logit, log_sum_sq_probs, is_top1) [N] and the Jacobian [N, D]; a statistic
    not in ``stats`` is empty [0], the Jacobian without save_jacobian."""
    logps, lse, stats, jacobian = forward_tokens(opts.decode(options), hidden, weight, bias, targets)
    stats = stats or (None,) * len(STATISTICS)
    stats = (logps.new_empty(0, dtype=stat_dtype(name, logps.dtype)) if stat is None else stat
             for name, stat in zip(STATISTICS, stats))
    return logps, lse, *stats, logps.new_empty(0) if jacobian is None else jacobian


@_token_logprobs.register_fake
def _(hidden, weight, bias, targets, options):
    n, dtype, decoded = hidden.shape[0], accumulation_dtype(hidden.dtype), opts.decode(options)
    stats = (hidden.new_empty(n if name in decoded.stats else 0, dtype=stat_dtype(name, dtype)) for name in STATISTICS)
    return (hidden.new_empty(n, dtype=dtype), hidden.new_empty(n, dtype=dtype), *stats,
            hidden.new_empty(hidden.shape if decoded.save_jacobian else 0, dtype=dtype))


@torch.library.custom_op("halo_ops::token_logprobs_backward", mutates_args=())
def token_logprobs_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
                            grad_logps: Optional[Tensor], options: str, needs_hidden: bool, needs_weight: bool,
                            needs_bias: bool, grad_entropy: Optional[Tensor] = None,
                            entropy: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for (hidden, weight, bias) of Σ_t grad_logps[t] · logp[t] (+ grad_entropy[t] · H[t]); empty [0]
    where not needed."""
    grads = backward_tokens(opts.decode(options), hidden, weight, bias, targets, lse, grad_logps,
                            (needs_hidden, needs_weight, needs_bias), grad_entropy, entropy)
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@token_logprobs_backward.register_fake
def _(hidden, weight, bias, targets, lse, grad_logps, options, needs_hidden, needs_weight, needs_bias,
      grad_entropy=None, entropy=None):
    return (torch.empty_like(hidden) if needs_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if needs_weight else hidden.new_empty(0),
            torch.empty_like(bias) if needs_bias and bias is not None else hidden.new_empty(0))


def projection_grads(hidden, weight, bias, targets, lse, grad_logps, options: str, needs, grad_entropy=None,
                     entropy=None) -> tuple:
    """The autograd gradients for (hidden, weight, bias) of Σ_t grad_logps[t] · logp[t] (+ grad_entropy[t] · H[t]):
    None where not needed.

    The backward of every op built on the token op (the fused losses too) ends here.
    """
    grads = token_logprobs_backward(hidden, weight, bias, targets, lse, grad_logps, options, *needs, grad_entropy,
                                    entropy)
    return tuple(g if need else None for g, need in zip(grads, needs))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, options = inputs
    decoded = opts.decode(options)
    ctx.options = options
    ctx.dtype = hidden.dtype
    ctx.set_materialize_grads(False)  # an unused entropy must bring None, not zeros that the backward would carry
    entropy = output[2] if "entropy" in decoded.stats else None  # kept for its gradient
    if decoded.save_jacobian and entropy is None:  # the backward only scales the Jacobian
        ctx.save_for_backward(None, None, None, targets, output[1], output[6], None)
    else:  # the entropy's gradient, if one comes, needs a recompute beside the Jacobian
        ctx.save_for_backward(hidden, weight, bias, targets, output[1], output[6] if decoded.save_jacobian else None,
                              entropy)


def _backward(ctx, grad_logps, _grad_lse, grad_entropy, *_other_stat_grads):
    hidden, weight, bias, targets, lse, jacobian, entropy = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if grad_entropy is not None and grad_entropy.numel() == 0:
        grad_entropy = None
    if jacobian is None:
        grads = projection_grads(hidden, weight, bias, targets, lse, grad_logps, ctx.options, needs, grad_entropy,
                                 entropy)
        return (*grads, None, None)
    grad_h = None
    if needs[0]:
        grad_logps = torch.zeros_like(lse) if grad_logps is None else grad_logps
        grad_h = jacobian_grad(jacobian, targets, grad_logps, opts.decode(ctx.options).ignore_index)
        if grad_entropy is not None:  # a frozen head whose entropy carries gradient: recompute that part
            grad_h = grad_h + projection_grads(hidden, weight, bias, targets, lse, None, ctx.options,
                                               (True, False, False), grad_entropy, entropy)[0]
        grad_h = grad_h.to(ctx.dtype)
    return grad_h, None, None, None, None


_token_logprobs.register_autograd(_backward, setup_context=_setup_context)


def token_logprobs(hidden, weight, bias, targets, options: TokenOptions):
    """(logps [N], ``partials.TokenStats`` of ``options.stats``, None without statistics), differentiable in logps
    and in the entropy (the other statistics are detached)."""
    logps, _, *stats, _ = _token_logprobs(hidden, weight, bias, targets, opts.encode(options))
    if not options.stats:
        return logps, None
    return logps, TokenStats(*(None if name not in options.stats else stat if name == "entropy" else stat.detach()
                               for name, stat in zip(STATISTICS, stats)))
