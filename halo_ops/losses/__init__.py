"""Sequence-level losses: small PyTorch functions on per-sequence log-probs ``[B]``.

Each loss here is plain, differentiable PyTorch on the per-sequence log-probs that the token op gives,
with its closed-form coefficient ``dloss/dlogp_i`` where a fused op drives a projection backward with
it. ``kto`` holds the KTO loss of TRL's KTOTrainer.
"""

from .kto import KTOOutput, kto_kl, kto_loss

__all__ = ["KTOOutput", "kto_kl", "kto_loss"]
