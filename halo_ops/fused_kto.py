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
from .inputs import measured_schedule, prepare_linear_inputs, with_frozen_head_jacobian
from .losses.kto import (
    SUM_KEYS,
    KTOOutput,
    as_bool_labels,
    check_kto_options,
    kto_loss,
    kto_terms,
    metric_sums,
    metrics_from_sums,
    reference_point,
)
from .eager import eager_forward, eager_sequences_per_chunk
from .options import accumulation_dtype
from .token_op import forward_tokens, jacobian_grad, projection_grads
from .validation import check_sequence_tensor
from .vocab_parallel import vocab_parallel_logprobs


# The per-token statistics TRL's KTO metrics need (logits/chosen, logits/rejected, entropy); no other is computed
KTO_STATISTICS = ("entropy", "mean_logit")


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
    # (hidden, weight, bias) gradients to form in the forward (the eager schedule), or None to recompute
    eager: Optional[tuple] = None


def _sequence_terms(impl, policy_logps, ref_logps, labels, kl, options: KTOOptions, token_stats):
    """(losses, coeff, rewards, sums) [B], [B], [B], [len(SUM_KEYS)]: the Triton sequence kernel, or
    ``kto_terms`` in PyTorch in the log-probs' dtype (float64 stays float64)."""
    weights = {"beta": options.beta, "desirable_weight": options.desirable_weight,
               "undesirable_weight": options.undesirable_weight}
    if impl == "triton":
        from .kernels import kto_sequence_terms

        return kto_sequence_terms(policy_logps, ref_logps, labels, kl, token_stats=token_stats, **weights)
    losses, coeff, rewards = kto_terms(policy_logps, ref_logps, labels, kl, *weights.values())
    sums = metric_sums(losses, policy_logps, rewards, labels, *(token_stats or ()))
    return losses.detach(), coeff, rewards, sums


def _sequence_logps(token_logps, counts, kto: KTOOptions):
    """[b, T] per-token log-probs → [b] per-sequence log-probs: the sum, or the mean over scored tokens."""
    total = token_logps.sum(-1)
    return total / counts.clamp(min=1) if kto.average_log_prob else total


def _token_coefficients(coeff, counts, batch: int, kto: KTOOptions):
    """dloss/dlogp_t [b, T] from the sequences' dloss/dlogp_i [b]: saturated ones dropped, ÷ count for the mean."""
    if kto.saturation_threshold > 0:
        coeff = torch.where(coeff.abs() < kto.saturation_threshold / max(batch, 1), 0.0, coeff)
    if kto.average_log_prob:
        coeff = coeff / counts.clamp(min=1)
    return coeff.unsqueeze(1).expand(-1, kto.seq)


def _eager_forward(token, kto: KTOOptions, hidden, weight, bias, targets, ref_logps, labels, kl, counts, batch):
    """The forward with the gradients formed in the same pass (``halo_ops.eager``): three GEMMs."""
    weights = (kto.beta, kto.desirable_weight, kto.undesirable_weight)

    def token_coefficients(chunk_logps, first):
        rows = slice(first, first + chunk_logps.shape[0])
        policy = _sequence_logps(chunk_logps, counts[rows], kto)
        coeff = kto_terms(policy, ref_logps[rows], labels[rows], kl, *weights, batch=batch)[1]
        return _token_coefficients(coeff, counts[rows], batch, kto)

    return eager_forward(hidden, weight, bias, targets, token, kto.seq, token_coefficients, kto.eager)


def _composed_kto(token_logps, stats, valid, labels, ref_logps, z0, weights, average) -> KTOOutput:
    """:func:`kto_loss` on per-token log-probs ``[B, T]`` (differentiable) and their statistics (None without token
    metrics), with the fused op's detached fields: the vocabulary-parallel path."""
    counts = valid.sum(-1).to(token_logps.dtype)
    total = token_logps.sum(-1)
    token_stats = {}
    if stats is not None:
        token_stats = {"logit_sums": stats.mean_logit.view_as(token_logps).sum(-1), "token_counts": counts,
                       "entropy_sums": stats.entropy.view_as(token_logps).sum(-1)}
    out = kto_loss(total / counts.clamp(min=1) if average else total, ref_logps.to(token_logps.dtype), labels,
                   kl=z0.to(token_logps.dtype), beta=weights[0], desirable_weight=weights[1],
                   undesirable_weight=weights[2], **token_stats)
    return dataclasses.replace(out, kl=z0, losses=out.losses.detach(), policy_logps=out.policy_logps.detach(),
                               rewards=out.rewards.detach())


@torch.library.custom_op("halo_ops::fused_linear_kto", mutates_args=())
def _fused_linear_kto(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, labels: Tensor, ref_logps: Tensor,
    kl: Tensor, token_options: str, kto_options: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, D], targets [N] (N = B·T) → (loss, losses [B], policy_logps [B], rewards [B], sums, lse [N],
    token coefficients [N] = dloss/dlogp_t, and with the eager schedule the gradients dH [N, D] (the hidden's
    dtype), dW [V, D], db [V] of the loss, else empty), in the accumulation dtype but for dH and the float32
    sums."""
    token, kto = opts.decode(token_options), opts.decode(kto_options)
    batch = targets.shape[0] // kto.seq if kto.seq else 0
    acc = accumulation_dtype(hidden.dtype)
    counts = (targets != token.ignore_index).view(batch, kto.seq).sum(-1).to(acc)
    ref_logps, kl = ref_logps.to(acc), kl.to(acc)
    grads = jacobian = None
    if kto.eager is not None:
        (token_logps, lse, stats), grads = _eager_forward(
            token, kto, hidden, weight, bias, targets, ref_logps, labels, kl, counts, batch)
    else:
        token_logps, lse, stats, jacobian = forward_tokens(token, hidden, weight, bias, targets)
    policy_logps = _sequence_logps(token_logps.view(batch, kto.seq), counts, kto)
    token_stats = None
    if token.stats:
        token_stats = (stats.mean_logit.view(batch, kto.seq).sum(-1), counts,
                       stats.entropy.view(batch, kto.seq).sum(-1))
    losses, coeff, rewards, sums = _sequence_terms(token.impl, policy_logps, ref_logps, labels, kl, kto, token_stats)
    losses, coeff, rewards = (t.to(acc) for t in (losses, coeff, rewards))
    token_coeff = _token_coefficients(coeff, counts, batch, kto).reshape(-1).clone()
    loss = losses.sum() / max(batch, 1)
    if jacobian is not None:  # a frozen head: dH is known now, the coefficients times the Jacobian
        grads = (jacobian_grad(jacobian, targets, token_coeff, token.ignore_index).to(hidden.dtype), None, None)
    grads = tuple(hidden.new_empty(0, dtype=acc) if g is None else g for g in grads or (None,) * 3)
    return loss, losses, policy_logps, rewards, sums, lse, token_coeff, *grads


@_fused_linear_kto.register_fake
def _(hidden, weight, bias, targets, labels, ref_logps, kl, token_options, kto_options):
    n, batch = targets.shape[0], labels.shape[0]
    acc = {"dtype": accumulation_dtype(hidden.dtype)}
    eager = opts.decode(kto_options).eager or ((True, False, False) if opts.decode(token_options).save_jacobian
                                               else (False, False, False))
    grads = (hidden.new_empty(hidden.shape if eager[0] else 0),
             hidden.new_empty(weight.shape if eager[1] else 0, **acc),
             hidden.new_empty(bias.shape if eager[2] and bias is not None else 0, **acc))
    return (hidden.new_empty((), **acc), *(hidden.new_empty(batch, **acc) for _ in range(3)),
            hidden.new_empty(len(SUM_KEYS), dtype=torch.float32), hidden.new_empty(n, **acc),
            hidden.new_empty(n, **acc), *grads)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, _labels, _ref_logps, _kl, token_options, kto_options = inputs
    ctx.token_options = token_options
    ctx.eager = opts.decode(kto_options).eager is not None or opts.decode(token_options).save_jacobian
    if ctx.eager:  # the gradients are formed already: the backward only scales them
        ctx.dtypes = tuple(None if x is None else x.dtype for x in (hidden, weight, bias))
        ctx.save_for_backward(*output[7:10])
    else:
        ctx.save_for_backward(hidden, weight, bias, targets, output[5], output[6])


def _backward(ctx, grad_loss, *_unused):
    unused = [None] * (len(ctx.needs_input_grad) - 3)
    if ctx.eager:
        grads = tuple((grad_loss * g).to(dtype) if need else None
                      for g, need, dtype in zip(ctx.saved_tensors, ctx.needs_input_grad[:3], ctx.dtypes))
        return (*grads, *unused)
    hidden, weight, bias, targets, lse, token_coeff = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = token_coeff.new_zeros(())
    grads = projection_grads(hidden, weight, bias, targets, lse, grad_loss * token_coeff, ctx.token_options,
                             ctx.needs_input_grad[:3])
    return (*grads, *unused)


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
    recompute: bool | None = None,
    token_metrics: bool = True,
    impl: str = "auto",
    check_targets: bool = True,
    check_finite: bool = False,
    deterministic: bool = False,
    grad_filter_eps: float = 0.0,
    schedule: str = "auto",
    vocab_parallel=None,
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
            deterministic, grad_filter_eps, schedule, vocab_parallel: as :func:`halo_ops.linear_logprobs`.
            With a vocabulary-parallel head (``vocab_parallel``, or a DTensor weight) the loss is composed
            from the vocabulary-parallel log-probs and :func:`halo_ops.losses.kto.kto_terms` in PyTorch
            autograd (the recompute schedule; ``saturation_threshold`` must be 0).
        average_log_prob: the per-sequence log-prob is the mean over its scored tokens instead of
            the sum (TRL's default is the sum).
        recompute: the gradients' schedule. ``True``: the forward keeps only the logsumexp and the backward
            recomputes the logits (four GEMMs; on the Triton path the backward runs ``schedule``).
            Otherwise, when a backward will follow, the forward forms the gradients itself, on both paths:
            from each chunk of whole sequences' logits, built once (the eager schedule, ``halo_ops.eager``:
            three GEMMs. It holds dW [V, D] in fp32 and dH [N, D] in the hidden's dtype from the forward to
            the backward, and a chunk's logits beside them, all within ``eager.eager_memory_bound``: the fp32
            gradients of hidden and weight plus 256 MiB, 2.46 GiB at N=16384, D=4096, V=128256 in bf16; the
            chunk gets what the kept gradients leave, at most 256 MiB on CPU and 1 GiB on a GPU), or, with a
            frozen head and no gradient filtering, from each token's Jacobian as :func:`halo_ops.linear_logprobs`
            builds it (two GEMMs). ``None`` (default) and ``False`` both choose that; the measured gains are in
            bench/NOTES.md items 20 and 32. A sequence too long for one chunk recomputes.
        token_metrics: compute TRL's per-token metrics (``logits/chosen``, ``logits/rejected``, ``entropy``)
            in the same pass: the entropy's partial per logits tile, and the mean logit in closed form without
            softcap (``halo_ops.partials``); no other statistic is computed (bench/NOTES.md item 32 has their
            cost). ``False`` skips them (the metrics dict then leaves them out).
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
    hidden2d, weight, bias, flat_targets, token_options, sharding = prepare_linear_inputs(
        hidden, weight, targets, bias, ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
        temperature=temperature, impl=impl, return_stats=KTO_STATISTICS if token_metrics else (),
        check_targets=check_targets, check_finite=check_finite, deterministic=deterministic,
        grad_filter_eps=grad_filter_eps,
        schedule=schedule, vocab_parallel=vocab_parallel)
    labels = as_bool_labels(labels, batch, hidden.device)
    check_sequence_tensor("ref_logps", ref_logps, batch, hidden.device)
    z0 = reference_point(kl, loss_type, ref_logps.to(accumulation_dtype(hidden2d.dtype)))
    if sharding is not None:
        if saturation_threshold > 0:
            raise ValueError("saturation_threshold is not supported with a vocabulary-parallel head; leave it at 0")
        token_options = measured_schedule(token_options, hidden2d, weight, bias, flat_targets, schedule=schedule,
                                          deterministic=deterministic)
        token_logps, stats = vocab_parallel_logprobs(hidden2d, weight, bias, flat_targets, token_options, *sharding)
        weights = (float(beta), float(desirable_weight), float(undesirable_weight))
        return _composed_kto(token_logps.view(batch, seq), stats, flat_targets.view(batch, seq) !=
                             ignore_index, labels, ref_logps.detach(), z0, weights, bool(average_log_prob))
    token_options = with_frozen_head_jacobian(token_options, hidden2d, weight, bias, recompute)
    needs = tuple(x is not None and x.requires_grad for x in (hidden2d, weight, bias))
    eager = (torch.is_grad_enabled() and any(needs) and recompute is not True and not token_options.save_jacobian
             and eager_sequences_per_chunk(seq, hidden2d, weight, token_options.impl, needs))
    if not eager:
        token_options = measured_schedule(token_options, hidden2d, weight, bias, flat_targets, schedule=schedule,
                                          deterministic=deterministic)
    kto_options = KTOOptions(seq=seq, beta=float(beta), desirable_weight=float(desirable_weight),
                             undesirable_weight=float(undesirable_weight), average_log_prob=bool(average_log_prob),
                             saturation_threshold=float(saturation_threshold), eager=needs if eager else None)
    loss, losses, policy_logps, rewards, sums, *_ = _fused_linear_kto(
        hidden2d, weight, bias, flat_targets, labels, ref_logps.detach(), z0, opts.encode(token_options),
        opts.encode(kto_options))
    losses, policy_logps, rewards, sums = (t.detach() for t in (losses, policy_logps, rewards, sums))
    return KTOOutput(loss=loss, losses=losses, kl=z0, policy_logps=policy_logps, rewards=rewards, labels=labels,
                     metrics=metrics_from_sums(sums, z0, with_token_stats=bool(token_metrics)))


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
