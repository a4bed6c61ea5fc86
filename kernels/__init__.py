"""Triton kernels and their launchers (``halo_ops.kernels``). No autograd here.

Importing this package imports Triton; ``halo_ops`` only does so when Triton is installed.

A file that holds ``@triton.jit`` kernels has no ``from __future__ import annotations``: Triton 3.1's
interpreter recognizes a ``tl.constexpr`` parameter by its annotation object, not by a string.
"""

from . import slab_backward
from .config import BlockConfig, interpreting
from .eager import eager_gradients
from .jacobian import jacobian_forward
from .kto_sequence import kto_sequence_terms
from .linear_logprobs_bwd import linear_logprobs_backward
from .linear_logprobs_fwd import linear_logprobs_forward

__all__ = [
    "BlockConfig",
    "eager_gradients",
    "interpreting",
    "jacobian_forward",
    "kto_sequence_terms",
    "linear_logprobs_backward",
    "linear_logprobs_forward",
    "slab_backward",
]
