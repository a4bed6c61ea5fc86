"""``fused_linear_kto_loss``: the KTO loss straight from hidden states and the LM head, one custom op.

Forward: the projection kernel gives per-token log-probs (and entropy and mean logit for TRL's
metrics) without logits; a per-sequence sum (or mean); then the sequence-level kernel gives the
losses, the metric sums and one coefficient per sequence, c_i = dL/dlogp_i. Saved: hidden,
weight, bias, targets, the per-token logsumexp and the coefficients. Backward: one projection
backward with per-token coefficient ``grad_loss · c_i`` (÷ token count for the mean), which skips
token blocks whose coefficient is exactly zero (ignored tokens; with ``saturation_threshold``,
saturated sequences).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

from . import options as opts
from .inputs import prepare_linear_inputs
from .losses.kto import (
    SUM_KEYS,
    KTOOutput,
    as_bool_labels,
    check_kto_options,
    kto_terms,
    metric_sums,
    metrics_from_sums,
    reference_point,
)
from .options import accumulation_dtype
from .token_op import forward_tokens, projection_grads
from .validation import check_sequence_tensor


@opts.register
@dataclasses.dataclass(frozen=True)
class KTOOptions:
    """The fused op's sequence-level options (the token op's travel separately, as ``TokenOptions``)."""

    seq: int  # tokens per sequence: the op sees [B · T] flattened tokens
    beta: float
    desirable_weight: float
    undesirable_weight: float
    average_log_prob: bool
    saturation_threshold: float


def _sequence_terms(impl, policy_logps, ref_logps, labels, kl, options: KTOOptions, token_stats):
    """(losses, coeff, rewards, sums) [B], [B], [B], [len(SUM_KEYS)]: the Triton sequence kernel, or
    ``kto_terms`` in PyTorch in the log-probs' dtype (float64 stays float64)."""
    weights = {"beta": options.beta, "desirable_weight": options.desirable_weight,
               "undesirable_weight": options.undesirable_weight}
    if impl == "triton":
        from .kernels import kto_sequence_terms

        return kto_sequence_terms(policy_logps, ref_logps, labels, kl, token_stats=token_stats, **weights)
    losses, coeff, rewards = kto_terms(policy_logps, ref_logps, labels, kl, *weights.values())
    sums = metric_sums(losses, policy_logps, rewards, labels, *token_stats)
    return losses.detach(), coeff, rewards, sums


@torch.library.custom_op("halo_ops::fused_linear_kto", mutates_args=())
def _fused_linear_kto(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, labels: Tensor, ref_logps: Tensor,
    kl: Tensor, token_options: str, kto_options: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, D], targets [N] (N = B·T) → (loss, losses [B], policy_logps [B], rewards [B], sums, lse [N],
    token coefficients [N] = dloss/dlogp_t), in the accumulation dtype but for the float32 sums."""
    token, kto = opts.decode(token_options), opts.decode(kto_options)
    batch = targets.shape[0] // kto.seq if kto.seq else 0
    token_logps, lse, entropy, mean_logit = forward_tokens(token, hidden, weight, bias, targets)
    acc = token_logps.dtype
    valid = (targets != token.ignore_index).view(batch, kto.seq)
    counts = valid.sum(-1).to(acc)
    policy_logps = token_logps.view(batch, kto.seq).sum(-1)
    if kto.average_log_prob:
        policy_logps = policy_logps / counts.clamp(min=1)
    token_stats = (mean_logit.view(batch, kto.seq).sum(-1), counts, entropy.view(batch, kto.seq).sum(-1))
    losses, coeff, rewards, sums = _sequence_terms(token.impl, policy_logps, ref_logps.to(acc), labels,
                                                   kl.to(acc), kto, token_stats)
    losses, coeff, rewards = (t.to(acc) for t in (losses, coeff, rewards))
    if kto.saturation_threshold > 0:
        coeff = torch.where(coeff.abs() < kto.saturation_threshold / max(batch, 1), 0.0, coeff)
    if kto.average_log_prob:
        coeff = coeff / counts.clamp(min=1)
    token_coeff = coeff.unsqueeze(1).expand(batch, kto.seq).reshape(-1).clone()
    loss = losses.sum() / max(batch, 1)
    return loss, losses, policy_logps, rewards, sums, lse, token_coeff


@_fused_linear_kto.register_fake
def _(hidden, weight, bias, targets, labels, ref_logps, kl, token_options, kto_options):
    n, batch = targets.shape[0], labels.shape[0]
    acc = {"dtype": accumulation_dtype(hidden.dtype)}
    return (hidden.new_empty((), **acc), *(hidden.new_empty(batch, **acc) for _ in range(3)),
            hidden.new_empty(len(SUM_KEYS), dtype=torch.float32), hidden.new_empty(n, **acc),
            hidden.new_empty(n, **acc))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, _labels, _ref_logps, _kl, token_options, _kto_options = inputs
    ctx.token_options = token_options
    ctx.save_for_backward(hidden, weight, bias, targets, output[5], output[6])


def _backward(ctx, grad_loss, *_unused):
    hidden, weight, bias, targets, lse, token_coeff = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = token_coeff.new_zeros(())
    grads = projection_grads(hidden, weight, bias, targets, lse, grad_loss * token_coeff, ctx.token_options,
                             ctx.needs_input_grad[:3])
    return (*grads, *([None] * (len(ctx.needs_input_grad) - 3)))


_fused_linear_kto.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_kto_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    labels,
    ref_logps: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    kl: torch.Tensor | float | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    average_log_prob: bool = False,
    saturation_threshold: float = 0.0,
    impl: str = "auto",
    check_targets: bool = True,
    check_finite: bool = False,
    deterministic: bool = False,
    grad_filter_eps: float = 0.0,
    schedule: str = "auto",
) -> KTOOutput:
    """The KTO loss of TRL's KTOTrainer from the policy's last hidden states, never building the logits.

    Args:
        hidden: ``[B, T, D]`` policy hidden states; ``hidden[:, t]`` predicts ``targets[:, t]``.
        weight: ``[V, D]`` LM head; ``bias`` optional ``[V]``.
        targets: ``[B, T]`` completion token ids, ``ignore_index`` on prompt and padding.
        labels: ``[B]`` bool or 0/1, True for desirable.
        ref_logps: ``[B]`` reference log-probs of the same completions (constants), e.g. from
            :func:`halo_ops.linear_logprobs` on the reference model's hidden states under
            ``torch.no_grad()`` (which saves nothing), or precomputed.
        kl: the reference point z0 from :func:`halo_ops.kto_kl`, or None for 0.
        beta, desirable_weight, undesirable_weight, loss_type: as TRL's ``KTOConfig``.
        logit_scale, softcap, temperature, ignore_index, impl, check_targets, check_finite,
            deterministic, grad_filter_eps, schedule: as :func:`halo_ops.linear_logprobs`.
        average_log_prob: the per-sequence log-prob is the mean over its scored tokens instead of
            the sum (TRL's default is the sum).
        saturation_threshold: if > 0, sequences whose gradient coefficient |dloss_i/dlogp_i| is
            below it are left out of the backward (the sigmoid is saturated there). Approximate:
            the gradient error is at most ``saturation_threshold / B · Σ_skipped ‖∇ logp_i‖``.
            Off (0) by default.

    Returns a :class:`KTOOutput`; ``loss`` is differentiable with respect to hidden, weight and
    bias, the other fields are detached values. Metrics include TRL's ``logits/*`` (mean logit
    over the completion tokens) and ``entropy``.
    """
    check_kto_options(beta, desirable_weight, undesirable_weight, loss_type)
    if not saturation_threshold >= 0:
        raise ValueError(f"saturation_threshold must be >= 0, got {saturation_threshold!r}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, D], got {tuple(getattr(hidden, 'shape', ()))}")
    batch, seq = hidden.shape[:2]
    hidden2d, weight, bias, flat_targets, token_options = prepare_linear_inputs(
        hidden, weight, targets, bias, ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
        temperature=temperature, impl=impl, return_stats=True, check_targets=check_targets,
        check_finite=check_finite, deterministic=deterministic, grad_filter_eps=grad_filter_eps,
        schedule=schedule)
    labels = as_bool_labels(labels, batch, hidden.device)
    check_sequence_tensor("ref_logps", ref_logps, batch, hidden.device)
    z0 = reference_point(kl, loss_type, ref_logps.to(accumulation_dtype(hidden2d.dtype)))
    kto_options = KTOOptions(seq=seq, beta=float(beta), desirable_weight=float(desirable_weight),
                             undesirable_weight=float(undesirable_weight), average_log_prob=bool(average_log_prob),
                             saturation_threshold=float(saturation_threshold))
    loss, losses, policy_logps, rewards, sums, _, _ = _fused_linear_kto(
        hidden2d, weight, bias, flat_targets, labels, ref_logps.detach(), z0, opts.encode(token_options),
        opts.encode(kto_options))
    losses, policy_logps, rewards, sums = (t.detach() for t in (losses, policy_logps, rewards, sums))
    return KTOOutput(loss=loss, losses=losses, kl=z0, policy_logps=policy_logps, rewards=rewards, labels=labels,
                     metrics=metrics_from_sums(sums, z0, with_token_stats=True))


class FusedLinearKTOLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_linear_kto_loss`; the constructor takes its keyword options.

    ``forward(hidden, weight, targets, labels, ref_logps, bias=None, kl=None) -> KTOOutput``.
    """

    def __init__(self, **options):
        super().__init__()
        check_kto_options(options.get("beta", 0.1), options.get("desirable_weight", 1.0),
                          options.get("undesirable_weight", 1.0), options.get("loss_type", "kto"))
        self.options = options

    def forward(self, hidden, weight, targets, labels, ref_logps, bias=None, kl=None) -> KTOOutput:
        return fused_linear_kto_loss(hidden, weight, targets, labels, ref_logps, bias=bias, kl=kl, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
