"""halo-ops: the KTO loss and its log-probs straight from hidden states and the LM-head weight.

Public API (README.md has the details):
    linear_logprobs(hidden, weight, targets, bias=None, *, ...)  per-token / per-sequence log-probs
    kto_loss(policy_logps, ref_logps, labels, *, kl=None, ...)  KTO from per-sequence log-probs
    kto_kl(policy_kl_logps, ref_kl_logps, *, process_group=None)  the reference point z0
    fused_linear_kto_loss(hidden, weight, targets, labels, ref_logps, *, ...)  KTO from hidden states
    FusedLinearKTOLoss(**options)  the nn.Module form
    fused_linear_preference_loss(hidden, weight, targets, *, method, ...)  DPO, SimPO, CPO, ORPO from hidden states
    resolve_impl(impl, device, dtype)  which backend impl="auto" (or a named one) runs here
    VocabParallel(start, stop, group=None, vocab=None)  a tensor-parallel rank's rows of the head

How a call reaches a kernel (one way down: integrations → halo_ops → kernels):

    linear_logprobs (linear_logprobs.py)
      → inputs.prepare_linear_inputs: autocast, validation (validation.py), the backend
        (resolve_impl) and one TokenOptions (options.py), which travels, encoded as one string,
        through torch.library
      → token_op: the custom op halo_ops::token_logprobs and its registered autograd;
        forward_tokens runs chunked.chunked_forward or kernels.linear_logprobs_forward (with a
        frozen head, kernels.jacobian_forward, which also builds d logp / d hidden), each
        returning per-piece partials that partials.merge_partials turns into log-probs, the
        logsumexp and the statistics
      ← backward: token_op.projection_grads → halo_ops::token_logprobs_backward → backward_tokens
        → chunked.chunked_backward or kernels.linear_logprobs_backward, with one coefficient per
        token; token_op picks the dW slice size and casts the gradients
    fused_linear_kto_loss (fused_kto.py): the same inputs step, then the custom op
      halo_ops::fused_linear_kto: token_op.forward_tokens, a per-sequence sum, and the KTO terms
      (losses/kto.kto_terms, or kernels.kto_sequence_terms on the Triton path); its backward is
      token_op.projection_grads with the per-sequence coefficients. When a backward will follow,
      eager.eager_forward (chunked.chunked_eager or kernels.eager_gradients) forms the gradients
      in the forward instead, chunk by chunk of whole sequences, and the backward only scales them.
    fused_linear_preference_loss (fused_preference.py): the paired losses of losses/preference.py on the
      same eager_forward (pairs side by side), or composed with linear_logprobs under autograd.
    vocab_parallel= or a DTensor head (vocab_parallel.py): token_op.token_partials on this rank's rows,
      one all_gather of combined partials, partials.merge_partials; its backward all-reduces dH.

Where each formula lives: the logit transform in transform.py (PyTorch) and kernels/transform.py
(Triton); the logsumexp/entropy merge in partials.py (the Triton forward folds its tiles with the
same formula online); the KTO loss and its coefficient in losses/kto.py (PyTorch) and
kernels/kto_sequence.py (Triton); DPO, SimPO, CPO and ORPO in losses/preference.py; the entropy's
gradient in kernels/tiles.py (dlogits_from_projection) and chunked.py; the dW slice budget in token_op.py;
the reductions over a sequence in reduction.py; the plain full-logits reference in reference.py.
"""

from .fused_kto import FusedLinearKTOLoss, fused_linear_kto_loss
from .fused_preference import PreferenceOutput, fused_linear_preference_loss
from .inputs import resolve_impl
from .linear_logprobs import LinearLogProbs, linear_logprobs
from .losses.kto import KTOOutput, kto_kl, kto_loss
from .reference import linear_logprobs_reference
from .vocab_parallel import VocabParallel

__all__ = [
    "FusedLinearKTOLoss",
    "KTOOutput",
    "LinearLogProbs",
    "PreferenceOutput",
    "VocabParallel",
    "fused_linear_kto_loss",
    "fused_linear_preference_loss",
    "kto_kl",
    "kto_loss",
    "linear_logprobs",
    "linear_logprobs_reference",
    "resolve_impl",
]
__version__ = "0.1.0"
