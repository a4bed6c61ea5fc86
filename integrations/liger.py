"""Drop-ins for Liger's fused linear preference losses (``liger_kernel.chunked_loss``) that never build the logits.

``LigerFusedLinearKTOLoss``, ``LigerFusedLinearDPOLoss``, ``LigerFusedLinearORPOLoss``,
``LigerFusedLinearCPOLoss``, ``LigerFusedLinearSimPOLoss`` and the functional forms Liger exports
(``liger_fused_linear_kto``, ``..._dpo``, ``..._orpo``, ``..._cpo``, ``..._simpo``) take Liger's constructor
arguments, forward signatures and positional orders, and return Liger's structures. Liger's ``compiled``
and ``chunk_size`` are accepted and have no effect. Beyond Liger, each takes a keyword-only ``impl``.

The paired losses (DPO, ORPO, CPO, SimPO) take ``_input`` [2B, T, D] and ``target`` [2B, T], the B chosen
completions first, and return

    loss, (chosen_logps [B], rejected_logps [B], chosen_logits_mean, rejected_logits_mean, nll_loss, *aux)

with ``aux`` the method's rewards (and for ORPO the mean log σ(log odds ratio) and mean log odds ratio).
They run on :func:`halo_ops.fused_linear_preference_loss`: one pass over the 2B sequences, the loss from
``halo_ops.losses.preference`` in PyTorch, and, when a backward follows, the gradients formed in the forward
(the eager schedule, three GEMMs). The logits means run over every position and vocabulary entry, in closed form
(Σ_v h·W_v + b_v = h·ΣW + Σb). Differences: ``loss_type="ipo"`` works here (Liger raises), length-normalized
as TRL does; a sequence with no scored token has an averaged log-prob of 0 here, NaN in Liger, and an ORPO pair
with such a completion gets an odds-ratio term of 0 with no gradient (``orpo_losses``), NaN in Liger. The
option errors open with Liger's own words.

The KTO module, with the same constructor, forward signature, input shapes and return structure as
Liger's:

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

from .. import fused_linear_kto_loss, fused_linear_preference_loss, linear_logprobs
from ..losses.preference import check_dpo_options
from ..partials import logit_sum_coefficients


def _logits_sums(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor):
    """Σ over chosen (rejected) sequences, positions and vocabulary of h · Wᵀ + b, without the logits.

    Σ_v (h_t · W_v + b_v) = h_t · (Σ_v W_v) + Σ_v b_v (``partials.logit_sum_coefficients``), so the sums cost
    O(B·T·D + V·D).
    """
    with torch.no_grad():
        weight_sum, bias_sum = logit_sum_coefficients(weight, bias, 1.0, torch.float32)
        per_sequence = hidden.float().sum(1) @ weight_sum + hidden.shape[1] * bias_sum  # [B]
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


def liger_fused_linear_kto(_input, weight, target, preference_labels, bias=None, ref_input=None, ref_weight=None,
                           ref_bias=None, kl=None, ignore_index=-100, beta=0.1, compiled=True, use_ref_model=True,
                           average_log_prob=False, chunk_size=1):
    """Liger's ``liger_fused_linear_kto`` (``LigerFusedLinearKTOFunction.apply``): the same positional order."""
    module = LigerFusedLinearKTOLoss(ignore_index, beta, compiled, use_ref_model, average_log_prob, chunk_size)
    return module(_input, weight, target, bias, preference_labels, ref_input, ref_weight, ref_bias, kl)


def _paired_loss(method, _input, weight, target, bias, *, ignore_index, alpha, compute_nll_loss, average_log_prob,
                 nll_target=None, reference=None, impl="auto", **method_options):
    """The paired losses' common body (see the module docstring), on :func:`halo_ops.fused_linear_preference_loss`
    (its eager schedule when a backward follows). ``reference``: (ref_input, ref_weight, ref_bias) or None."""
    if _input.dim() != 3 or target.shape != _input.shape[:2] or target.shape[0] % 2:
        raise ValueError(f"_input must be [2B, T, D] and target [2B, T] (chosen first), got {tuple(_input.shape)} and "
                         f"{tuple(target.shape)}")
    half = target.shape[0] // 2
    refs = {}
    if reference is not None:
        with torch.no_grad():
            ref_logps = linear_logprobs(*reference[:2], target, reference[2], ignore_index=ignore_index,
                                        reduction="mean" if average_log_prob else "sum", impl=impl)
        refs = {"ref_chosen_logps": ref_logps[:half], "ref_rejected_logps": ref_logps[half:]}
    # An NLL target of its own needs its own log-probs: then the NLL term is a second, composed call
    nll_inside = compute_nll_loss and nll_target is None
    out = fused_linear_preference_loss(_input, weight, target, method=method, bias=bias, ignore_index=ignore_index,
                                       average_log_prob=average_log_prob, nll_weight=alpha if nll_inside else 0.0,
                                       impl=impl, **refs, **method_options)
    loss, nll_loss = out.loss, out.nll_loss
    if compute_nll_loss and not nll_inside:
        nll_tokens = linear_logprobs(_input[:half], weight, nll_target[:half], bias, ignore_index=ignore_index,
                                     impl=impl)
        nll = -nll_tokens.sum() / (nll_target[:half] != ignore_index).sum()
        loss, nll_loss = loss + alpha * nll, nll.detach()
    chosen = torch.arange(_input.shape[0], device=_input.device) < half
    logits_means = tuple(total / (half * _input.shape[1] * weight.shape[0])
                         for total in _logits_sums(_input, weight, bias, chosen))
    aux = tuple(a.sum() / max(half, 1) for a in out.aux)  # ORPO: the means of log σ(log odds ratio) and the ratio
    return loss, (out.chosen_logps, out.rejected_logps, *logits_means, nll_loss, out.chosen_rewards,
                  out.rejected_rewards, *aux)


class LigerFusedLinearDPOLoss(nn.Module):
    """Liger's fused linear DPO loss on halo-ops (see the module docstring); ``loss_type`` as TRL's, ipo included."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, compute_nll_loss: bool = False,
                 compiled: bool = True, use_ref_model: bool = True, average_log_prob: bool = False,
                 chunk_size: int = 1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 discopop_tau: float = 0.05, *, impl: str = "auto"):
        super().__init__()
        check_dpo_options(beta, loss_type, label_smoothing)
        self.ignore_index, self.beta, self.alpha, self.compute_nll_loss = ignore_index, beta, alpha, compute_nll_loss
        self.compiled, self.use_ref_model, self.average_log_prob = compiled, use_ref_model, average_log_prob
        self.chunk_size, self.loss_type, self.label_smoothing = chunk_size, loss_type, label_smoothing
        self.discopop_tau, self.impl = discopop_tau, impl

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        reference = None
        if self.use_ref_model:
            if ref_input is None or ref_weight is None:
                raise ValueError("use_ref_model=True needs ref_input and ref_weight")
            reference = (ref_input, ref_weight, ref_bias)

        return _paired_loss("dpo", _input, lin_weight, target, bias, ignore_index=self.ignore_index, alpha=self.alpha,
                            compute_nll_loss=self.compute_nll_loss, average_log_prob=self.average_log_prob,
                            reference=reference, impl=self.impl, beta=self.beta, loss_type=self.loss_type,
                            label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau)


class LigerFusedLinearORPOLoss(nn.Module):
    """Liger's fused linear ORPO loss on halo-ops (see the module docstring): averaged log-probs, NLL weight 1."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compute_nll_loss: bool = True,
                 compiled: bool = True, chunk_size: int = 1, *, impl: str = "auto"):
        super().__init__()
        self.ignore_index, self.beta, self.compute_nll_loss = ignore_index, beta, compute_nll_loss
        self.compiled, self.chunk_size, self.impl = compiled, chunk_size, impl

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        return _paired_loss("orpo", _input, lin_weight, target, bias, ignore_index=self.ignore_index, alpha=1.0,
                            compute_nll_loss=self.compute_nll_loss, average_log_prob=True, nll_target=nll_target,
                            impl=self.impl, beta=self.beta)


class LigerFusedLinearCPOLoss(nn.Module):
    """Liger's fused linear CPO loss on halo-ops (see the module docstring)."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
                 compute_nll_loss: bool = True, compiled: bool = True, average_log_prob: bool = False,
                 chunk_size: int = 1, *, impl: str = "auto"):
        super().__init__()
        self.ignore_index, self.beta, self.alpha, self.label_smoothing = ignore_index, beta, alpha, label_smoothing
        self.compute_nll_loss, self.compiled, self.average_log_prob = compute_nll_loss, compiled, average_log_prob
        self.chunk_size, self.impl = chunk_size, impl

    def forward(self, lin_weight, _input, target, bias=None):
        return _paired_loss("cpo", _input, lin_weight, target, bias, ignore_index=self.ignore_index, alpha=self.alpha,
                            compute_nll_loss=self.compute_nll_loss, average_log_prob=self.average_log_prob,
                            impl=self.impl, beta=self.beta, label_smoothing=self.label_smoothing)


class LigerFusedLinearSimPOLoss(nn.Module):
    """Liger's fused linear SimPO loss on halo-ops (see the module docstring): averaged log-probs, margin γ."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
                 compute_nll_loss: bool = True, compiled: bool = True, gamma: float = 0.5, chunk_size: int = 1, *,
                 impl: str = "auto"):
        super().__init__()
        self.ignore_index, self.beta, self.alpha, self.label_smoothing = ignore_index, beta, alpha, label_smoothing
        self.compute_nll_loss, self.compiled, self.gamma, self.chunk_size = compute_nll_loss, compiled, gamma, chunk_size
        self.impl = impl

    def forward(self, lin_weight, _input, target, bias=None):
        return _paired_loss("simpo", _input, lin_weight, target, bias, ignore_index=self.ignore_index, alpha=self.alpha,
                            compute_nll_loss=self.compute_nll_loss, average_log_prob=True, impl=self.impl,
                            beta=self.beta, gamma=self.gamma, label_smoothing=self.label_smoothing)


def liger_fused_linear_dpo(_input, weight, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None,
                           ignore_index=-100, beta=0.1, compute_nll_loss=False, compiled=True, use_ref_model=True,
                           average_log_prob=False, chunk_size=1, loss_type="sigmoid", label_smoothing=0.0,
                           discopop_tau=0.05, alpha=1.0):
    """Liger's ``liger_fused_linear_dpo`` (``LigerFusedLinearDPOFunction.apply``): the same positional order."""
    module = LigerFusedLinearDPOLoss(ignore_index, beta, alpha, compute_nll_loss, compiled, use_ref_model,
                                     average_log_prob, chunk_size, loss_type, label_smoothing, discopop_tau)
    return module(weight, _input, target, bias, ref_input, ref_weight, ref_bias)


def liger_fused_linear_orpo(_input, weight, target, bias=None, ignore_index=-100, beta=0.1, compute_nll_loss=True,
                            nll_target=None, compiled=True, chunk_size=1):
    """Liger's ``liger_fused_linear_orpo`` (``LigerFusedLinearORPOFunction.apply``): the same positional order."""
    return LigerFusedLinearORPOLoss(ignore_index, beta, compute_nll_loss, compiled, chunk_size)(
        weight, _input, target, bias, nll_target)


def liger_fused_linear_cpo(_input, weight, target, bias=None, ignore_index=-100, beta=0.1, alpha=1.0,
                           label_smoothing=0.0, compute_nll_loss=True, compiled=True, average_log_prob=False,
                           chunk_size=1):
    """Liger's ``liger_fused_linear_cpo`` (``LigerFusedLinearCPOFunction.apply``): the same positional order."""
    return LigerFusedLinearCPOLoss(ignore_index, beta, alpha, label_smoothing, compute_nll_loss, compiled,
                                   average_log_prob, chunk_size)(weight, _input, target, bias)


def liger_fused_linear_simpo(_input, weight, target, bias=None, ignore_index=-100, beta=0.1, alpha=1.0,
                             label_smoothing=0.0, compute_nll_loss=False, compiled=True, gamma=0.5, chunk_size=1):
    """Liger's ``liger_fused_linear_simpo`` (``LigerFusedLinearSimPOFunction.apply``): the same positional order."""
    return LigerFusedLinearSimPOLoss(ignore_index, beta, alpha, label_smoothing, compute_nll_loss, compiled, gamma,
                                     chunk_size)(weight, _input, target, bias)
