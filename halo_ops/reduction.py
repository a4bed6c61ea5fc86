"""Reduction of per-token log-probs over the last dimension, shared by every path."""

from __future__ import annotations

import torch

REDUCTIONS = ("none", "sum", "mean")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce_last_dim(per_token: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """``per_token [..., T]`` (0 at ignored positions) → ``[..., T]``, ``[...]`` sum, or ``[...]`` mean.

    The mean divides by the number of valid tokens in the row and is 0 for a row with none.
    """
    if reduction == "none":
        return per_token
    total = per_token.sum(-1)
    if reduction == "sum":
        return total
    count = valid.sum(-1).clamp(min=1).to(total.dtype)
    return total / count
