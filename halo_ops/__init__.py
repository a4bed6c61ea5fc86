"""halo-ops: the KTO loss and its log-probs straight from hidden states and the LM-head weight.

Public API (see README.md and DESIGN.md):
    linear_logprobs(hidden, weight, targets, bias=None, *, ...)  per-token / per-sequence log-probs
    kto_loss(policy_logps, ref_logps, labels, *, kl=None, ...)  KTO from per-sequence log-probs
    kto_kl(policy_kl_logps, ref_kl_logps, *, process_group=None)  the reference point z0
    fused_linear_kto_loss(hidden, weight, targets, labels, ref_logps, *, ...)  KTO from hidden states
    FusedLinearKTOLoss(**options)  the nn.Module form
"""

from .fused_kto import FusedLinearKTOLoss, fused_linear_kto_loss
from .kto import KTOOutput, kto_kl, kto_loss
from .linear_logprobs import LinearLogProbs, linear_logprobs
from .reference import linear_logprobs_reference

__all__ = [
    "FusedLinearKTOLoss",
    "KTOOutput",
    "LinearLogProbs",
    "fused_linear_kto_loss",
    "kto_kl",
    "kto_loss",
    "linear_logprobs",
    "linear_logprobs_reference",
]
__version__ = "0.1.0"
