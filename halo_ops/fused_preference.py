"""``fused_linear_preference_loss``: a paired preference loss (DPO, SimPO, CPO, ORPO) straight from hidden states.

The generic mechanism of the human-aware losses beyond KTO: per-sequence log-probs from the token op,
the loss on them in plain PyTorch (``halo_ops.losses.preference``), and the gradients from one
coefficient per token. When a backward will follow and a chunk of the eager budget holds a pair, the
eager schedule (``halo_ops.eager``) forms the gradients in the forward: the pairs are laid out side by
side, each chunk of whole pairs gets its logits once, autograd on the chunk's pair losses (plain
PyTorch, [b] tensors) gives its coefficients, and dH, dW and db follow: three GEMMs instead of four.
Otherwise, and with ``recompute=True``, autograd composes :func:`halo_ops.linear_logprobs` with the loss
(the recompute schedule). Both compute the same function.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .eager import eager_forward, eager_sequences_per_chunk
from .inputs import prepare_linear_inputs
from .linear_logprobs import linear_logprobs
from .losses import preference
from .options import accumulation_dtype

METHODS = ("dpo", "simpo", "cpo", "orpo")


class PreferenceOutput(NamedTuple):
    loss: torch.Tensor  # scalar: mean over pairs of the method's loss, + nll_weight · NLL of the chosen completions
    losses: torch.Tensor  # [B] per pair, detached
    chosen_logps: torch.Tensor  # [B] per-sequence log-probs (sum, or mean with average_log_prob), detached
    rejected_logps: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B]
    rejected_rewards: torch.Tensor  # [B]
    nll_loss: torch.Tensor  # scalar: −Σ log p over the chosen completions' tokens / their count (0 without nll)
    aux: tuple  # ORPO: (log σ(log odds ratio) [B], log odds ratio [B]); else ()


def _method(method: str, options: dict):
    """The per-pair loss ``(chosen, rejected, ref_chosen, ref_rejected, chosen_counts, rejected_counts) ->
    (losses, chosen_rewards, rejected_rewards, *aux)``."""
    if method == "dpo":
        preference.check_dpo_options(options.get("beta", 0.1), options.get("loss_type", "sigmoid"),
                                     options.get("label_smoothing", 0.0))
        return lambda c, r, rc, rr, cc, rc_counts: preference.dpo_losses(
            c, r, rc, rr, chosen_counts=cc, rejected_counts=rc_counts, **options)
    if method == "orpo":  # the counts tell it which pairs have an empty completion
        return lambda c, r, rc, rr, cc, rc_counts: preference.orpo_losses(
            c, r, chosen_counts=cc, rejected_counts=rc_counts, **options)
    fn = {"simpo": preference.simpo_losses, "cpo": preference.cpo_losses}[method]
    return lambda c, r, *_: fn(c, r, **options)


def _pair_terms(loss_fn, token_logps, valid, refs, pairs: int, average: bool, nll_weight: float, nll_tokens):
    """The loss of the pairs in ``token_logps`` [2b, T] (chosen and rejected interleaved: 0, 2, ... chosen), as a
    sum over them ÷ ``pairs`` (the batch's), plus the NLL term over their chosen tokens ÷ ``nll_tokens``.
    Returns (that loss, losses [b], chosen, rejected, rewards, aux, nll sum)."""
    counts = valid.sum(-1).to(token_logps.dtype)
    total = token_logps.sum(-1)
    logps = total / counts.clamp(min=1) if average else total
    losses, chosen_rewards, rejected_rewards, *aux = loss_fn(logps[0::2], logps[1::2], *refs, counts[0::2],
                                                              counts[1::2])
    nll_sum = -total[0::2].sum()
    loss = losses.sum() / max(pairs, 1) + (nll_weight * nll_sum / nll_tokens if nll_weight else 0.0)
    return loss, losses, logps[0::2], logps[1::2], chosen_rewards, rejected_rewards, aux, nll_sum


class _EagerPairLoss(torch.autograd.Function):
    """The eager schedule: the loss, with its gradients formed in the forward; the backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_options, seq, loss_fn, ref_logps, average, nll_weight):
        pairs = targets.shape[0] // (2 * seq)
        acc = accumulation_dtype(hidden.dtype)
        valid = (targets != token_options.ignore_index).view(2 * pairs, seq)
        nll_tokens = valid[0::2].sum().clamp(min=1).to(acc)
        per_pair = {}

        def token_coefficients(chunk_logps, first):
            rows = slice(first, first + chunk_logps.shape[0])
            with torch.enable_grad():
                leaf = chunk_logps.detach().to(acc).requires_grad_()
                refs = tuple(None if r is None else r[first // 2: first // 2 + leaf.shape[0] // 2] for r in ref_logps)
                loss, *terms = _pair_terms(loss_fn, leaf, valid[rows], refs, pairs, average, nll_weight, nll_tokens)
                (grad,) = torch.autograd.grad(loss, leaf)
            per_pair[first] = [t.detach() if isinstance(t, torch.Tensor) else tuple(a.detach() for a in t)
                               for t in terms]
            return grad

        needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        _, grads = eager_forward(hidden, weight, bias, targets, token_options, seq, token_coefficients, needs, group=2)
        chunks = [per_pair[k] for k in sorted(per_pair)]
        losses, chosen, rejected, chosen_rewards, rejected_rewards = (torch.cat([c[i] for c in chunks])
                                                                      for i in range(5))
        aux = tuple(torch.cat([c[5][i] for c in chunks]) for i in range(len(chunks[0][5])))
        nll_sum = sum(c[6] for c in chunks)
        loss = losses.sum() / max(pairs, 1) + (nll_weight * nll_sum / nll_tokens if nll_weight else 0.0)
        ctx.dtypes = tuple(None if x is None else x.dtype for x in (hidden, weight, bias))
        ctx.save_for_backward(*(hidden.new_empty(0) if g is None else g for g in grads))
        nll_loss = nll_sum / nll_tokens if nll_weight else loss.new_zeros(())
        ctx.mark_non_differentiable(losses, chosen, rejected, chosen_rewards, rejected_rewards, nll_loss, *aux)
        return loss, losses, chosen, rejected, chosen_rewards, rejected_rewards, nll_loss, *aux

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grads = tuple(None if g.numel() == 0 or dtype is None else (grad_loss * g).to(dtype)
                      for g, dtype in zip(ctx.saved_tensors, ctx.dtypes))
        return (*grads, None, None, None, None, None, None, None)


def fused_linear_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    method: str = "dpo",
    bias: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    average_log_prob: bool = False,
    nll_weight: float = 0.0,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    recompute: bool | None = None,
    impl: str = "auto",
    check_targets: bool = True,
    **method_options,
) -> PreferenceOutput:
    """A paired preference loss from the policy's last hidden states, never building the logits.

    Args:
        hidden: ``[2B, T, D]``, the B chosen completions first, then the B rejected ones (TRL's and Liger's
            layout); ``hidden[:, t]`` predicts ``targets[:, t]``.
        weight, bias: the LM head ``[V, D]``, ``[V]``.
        targets: ``[2B, T]`` token ids, ``ignore_index`` on prompts and padding.
        method: ``"dpo"`` (``method_options``: ``beta``, ``loss_type``, ``label_smoothing``, ``discopop_tau``;
            reference-free when the reference log-probs are None), ``"simpo"`` (``beta``, ``gamma``,
            ``label_smoothing``), ``"cpo"`` (``beta``, ``label_smoothing``) or ``"orpo"`` (``beta``); the
            formulas are in ``halo_ops.losses.preference``.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference log-probs (constants), DPO only.
        average_log_prob: per-sequence log-probs are means over the scored tokens (SimPO and ORPO use them).
        nll_weight: adds ``nll_weight`` · the NLL of the chosen completions (−Σ log p over their tokens ÷ their
            count), CPO's and ORPO's term.
        logit_scale, softcap, temperature, ignore_index, impl, check_targets: as :func:`halo_ops.linear_logprobs`.
        recompute: ``True`` composes :func:`halo_ops.linear_logprobs` and the loss under autograd (the backward
            recomputes the logits: four GEMMs). Otherwise, when a backward will follow and one chunk of
            ``halo_ops.eager``'s budget holds a pair, the eager schedule forms the gradients in the forward
            (three GEMMs), holding the fp32 dH and dW until the backward.

    Returns a :class:`PreferenceOutput`; ``loss`` is differentiable with respect to hidden, weight and bias.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "dpo" and (ref_chosen_logps is not None or ref_rejected_logps is not None):
        raise ValueError(f"method={method!r} is reference-free; reference log-probs are for DPO")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[0] % 2:
        raise ValueError(f"hidden must be [2B, T, D] (B chosen, then B rejected), got {tuple(getattr(hidden, 'shape', ()))}")
    loss_fn = _method(method, method_options)
    pairs, seq = hidden.shape[0] // 2, hidden.shape[1]
    transform = {"logit_scale": logit_scale, "softcap": softcap, "temperature": temperature}
    hidden2d, weight, bias, flat_targets, options, sharding = prepare_linear_inputs(
        hidden, weight, targets, bias, ignore_index=ignore_index, impl=impl, return_stats=False,
        check_targets=check_targets, check_finite=False, deterministic=False, grad_filter_eps=0.0, **transform)
    acc = accumulation_dtype(hidden2d.dtype)
    refs = tuple(None if r is None else r.detach().to(acc) for r in (ref_chosen_logps, ref_rejected_logps))
    needs = tuple(x is not None and x.requires_grad for x in (hidden2d, weight, bias))
    eager = (torch.is_grad_enabled() and any(needs) and recompute is not True and sharding is None and pairs > 0
             and eager_sequences_per_chunk(seq, hidden2d, weight, options.impl, needs) >= 2)
    if eager:
        # chosen and rejected side by side, so that a chunk of whole sequences holds whole pairs
        order = torch.stack([torch.arange(pairs), pairs + torch.arange(pairs)], 1).reshape(-1).to(hidden2d.device)
        paired = hidden2d.view(2 * pairs, seq, -1).index_select(0, order).reshape(-1, hidden2d.shape[-1])
        paired_targets = flat_targets.view(2 * pairs, seq).index_select(0, order).reshape(-1)
        loss, losses, chosen, rejected, chosen_rewards, rejected_rewards, nll_loss, *aux = _EagerPairLoss.apply(
            paired, weight, bias, paired_targets, options, seq, loss_fn, refs, bool(average_log_prob),
            float(nll_weight))
        return PreferenceOutput(loss, losses, chosen, rejected, chosen_rewards, rejected_rewards, nll_loss, tuple(aux))
    token_logps = linear_logprobs(hidden, weight, targets, bias, ignore_index=ignore_index, impl=impl,
                                  check_targets=False, recompute=recompute, **transform)
    valid = targets != ignore_index
    order = torch.stack([torch.arange(pairs), pairs + torch.arange(pairs)], 1).reshape(-1).to(token_logps.device)
    nll_tokens = valid[:pairs].sum().clamp(min=1).to(token_logps.dtype)
    loss, losses, chosen, rejected, chosen_rewards, rejected_rewards, aux, nll_sum = _pair_terms(
        loss_fn, token_logps[order], valid[order], refs, pairs, bool(average_log_prob), float(nll_weight), nll_tokens)
    nll_loss = (nll_sum / nll_tokens).detach() if nll_weight else loss.new_zeros(())
    return PreferenceOutput(loss, losses.detach(), chosen.detach(), rejected.detach(), chosen_rewards.detach(),
                            rejected_rewards.detach(), nll_loss, tuple(a.detach() for a in aux))

