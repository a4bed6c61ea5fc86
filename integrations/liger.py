"""Drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearKTOLoss`` that never builds the logits.

Same constructor, forward signature, input shapes and return structure as Liger's module:

    loss, (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum,
           chosen_rewards_sum, rejected_rewards_sum) = module(_input, lin_weight, target, bias,
                                                             preference_labels, ref_input, ref_weight,
                                                             ref_bias, kl)

with ``_input`` [B, T, D], ``target`` [B, T], ``preference_labels`` [B] bool. As in Liger, the loss is
the mean over sequences of ``1 − σ(β (r − kl))`` (desirable) / ``1 − σ(β (kl − r))`` (undesirable),
``r`` the log-ratio to the reference (or the policy log-prob when ``use_ref_model=False``), ``kl``
used as given (None: 0), and the logits sums run over every position and vocabulary entry of the
untransformed logits. Liger's ``compiled`` and ``chunk_size`` are accepted and have no effect here.

Beyond Liger (keyword-only, defaults keep Liger's behaviour): ``desirable_weight`` and
``undesirable_weight`` (TRL's λ_D, λ_U) and ``impl``. One difference: with
``average_log_prob=True`` a sequence with no scored token has log-prob 0 here, NaN in Liger.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import fused_linear_kto_loss, linear_logprobs


def _logits_sums(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor):
    """Σ over chosen (rejected) sequences, positions and vocabulary of h · Wᵀ + b, without the logits.

    Σ_v (h_t · W_v + b_v) = h_t · (Σ_v W_v) + Σ_v b_v, so the sums cost O(B·T·D + V·D).
    """
    with torch.no_grad():
        per_sequence = hidden.float().sum(1) @ weight.float().sum(0)  # [B]
        if bias is not None:
            per_sequence = per_sequence + hidden.shape[1] * bias.float().sum()
        chosen = labels.float()
        return (per_sequence * chosen).sum(), (per_sequence * (1 - chosen)).sum()


class LigerFusedLinearKTOLoss(nn.Module):
    """Liger's fused linear KTO loss interface on halo-ops kernels (see the module docstring)."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compiled: bool = True,
        use_ref_model: bool = False,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        *,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        impl: str = "auto",
    ):
        super().__init__()
        self.ignore_index = ignore_index
        self.beta = beta
        self.compiled = compiled  # accepted for compatibility; halo-ops needs no torch.compile
        self.use_ref_model = use_ref_model
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size  # accepted for compatibility; halo-ops does not chunk sequences
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight
        self.impl = impl

    def forward(
        self,
        _input,
        lin_weight,
        target,
        bias=None,
        preference_labels=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        kl=None,
    ):
        if preference_labels is None:
            raise ValueError("preference_labels must be provided for unpaired preference loss")
        reduction = "mean" if self.average_log_prob else "sum"
        if self.use_ref_model:
            if ref_input is None or ref_weight is None:
                raise ValueError("use_ref_model=True needs ref_input and ref_weight")
            with torch.no_grad():
                ref_logps = linear_logprobs(ref_input, ref_weight, target, ref_bias, ignore_index=self.ignore_index,
                                            reduction=reduction, impl=self.impl)
        else:
            ref_logps = torch.zeros(_input.shape[0], device=_input.device)
        if kl is not None and torch.as_tensor(kl).numel() != 1:
            raise ValueError("kl must be a scalar reference point; per-sequence kl is not supported")
        out = fused_linear_kto_loss(
            _input, lin_weight, target, preference_labels, ref_logps, bias=bias, kl=kl, beta=self.beta,
            desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight,
            ignore_index=self.ignore_index, average_log_prob=self.average_log_prob, impl=self.impl,
        )
        chosen_logits_sum, rejected_logits_sum = _logits_sums(_input, lin_weight, bias, out.labels)
        m = out.metrics
        return out.loss, (m["logps/chosen_sum"], m["logps/rejected_sum"], chosen_logits_sum, rejected_logits_sum,
                          m["rewards/chosen_sum"], m["rewards/rejected_sum"])
