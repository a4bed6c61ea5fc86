"""halo-ops: the KTO loss and its log-probs straight from hidden states and the LM-head weight.

Public API (see README.md and DESIGN.md):
    linear_logprobs(hidden, weight, targets, bias=None, *, ...)  per-token / per-sequence log-probs
"""

from .linear_logprobs import LinearLogProbs, linear_logprobs
from .reference import linear_logprobs_reference

__all__ = ["LinearLogProbs", "linear_logprobs", "linear_logprobs_reference"]
__version__ = "0.1.0"
