"""Plain-PyTorch reference: builds the full ``[N, V]`` logits. Ground truth for tests and benchmarks.

Call it with float64 inputs for ground truth, or with the fast path's dtype to see what plain
PyTorch achieves in that dtype (the projection in that dtype, the log-softmax in float32 or
float64, as TRL's ``selective_log_softmax`` does).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .reduction import check_reduction, reduce_last_dim
from .transform import LogitTransform


class ReferenceLogProbs(NamedTuple):
    logps: torch.Tensor  # per token [...] or per row, by reduction
    entropy: torch.Tensor  # per token [...], 0 at ignored positions
    mean_logit: torch.Tensor  # per token [...], 0 at ignored positions
    log_sum_sq_probs: torch.Tensor  # per token [...]: log Σ_v p_v², 0 at ignored positions
    is_top1: torch.Tensor  # per token [...], bool: argmax(z) == target (the first argmax), False where ignored


def linear_logprobs_reference(
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
) -> ReferenceLogProbs:
    """log softmax(transform(hidden · weightᵀ + bias))[targets], differentiable, with per-token stats.

    Shapes: hidden [..., D], weight [V, D], bias [V], targets [...]. Outputs are float64 for float64
    inputs and float32 otherwise.
    """
    check_reduction(reduction)
    transform = LogitTransform(logit_scale, softcap, temperature)
    y = torch.nn.functional.linear(hidden, weight, bias)
    z = transform.apply(y.to(torch.float64 if y.dtype == torch.float64 else torch.float32))
    logsm = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    picked = logsm.gather(-1, torch.where(valid, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    zero = picked.new_zeros(())
    per_token = torch.where(valid, picked, zero)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return ReferenceLogProbs(
        logps=reduce_last_dim(per_token, valid, reduction),
        entropy=torch.where(valid, entropy, zero),  # differentiable, as the fast paths' entropy
        mean_logit=torch.where(valid, z.mean(-1), zero).detach(),
        log_sum_sq_probs=torch.where(valid, torch.logsumexp(2 * logsm, -1), zero).detach(),
        is_top1=valid & (z.argmax(-1) == targets),
    )
