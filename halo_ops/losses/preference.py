"""Paired preference losses on per-sequence log-probs: DPO (TRL's loss types), SimPO, CPO and ORPO.

Each is a small function on ``[B]`` tensors (one entry per pair) returning per-pair losses and rewards,
plain differentiable PyTorch. With the log-probs from :func:`halo_ops.linear_logprobs` (``reduction="sum"``
or ``"mean"``), autograd turns each pair's dloss/dlogp into one coefficient per token, and the token op
runs one projection backward for all of them: the logits never exist. ``halo_ops.integrations.liger``
builds Liger's fused modules on these.

Notation: ``c``, ``r`` the policy log-probs of the chosen and rejected completions, ``c_ref``, ``r_ref`` the
reference's (0 when reference-free), Δ = (c − c_ref) − (r − r_ref), σ the sigmoid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
                  "apo_down", "discopop")


def check_dpo_options(beta: float, loss_type: str, label_smoothing: float) -> None:
    # Each message opens with Liger's own words for the same check, so code matching Liger's errors keeps working
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"Unsupported loss_type: {loss_type}. loss_type must be one of {DPO_LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if loss_type == "exo_pair" and not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be > 0 for loss_type='exo_pair', and < 1 (the EXO paper recommends "
                         f"1e-3), got {label_smoothing!r}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0.0, 0.5) for loss_type='robust', got {label_smoothing!r}")


def dpo_losses(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *, beta: float = 0.1,
               loss_type: str = "sigmoid", label_smoothing: float = 0.0, discopop_tau: float = 0.05,
               chosen_counts=None, rejected_counts=None):
    """(losses, chosen_rewards, rejected_rewards), each ``[B]``, as TRL's DPOTrainer computes them per pair.

    Rewards are β · (c − c_ref) and β · (r − r_ref). ``loss_type``:

    - sigmoid: −log σ(βΔ); hinge: max(0, 1 − βΔ); robust (cDPO): ((1 − ε)(−log σ(βΔ)) − ε(−log σ(−βΔ))) / (1 − 2ε);
    - exo_pair: KL(σ(±βΔ) ‖ (1 − ε, ε)); discopop: −log σ(βΔ)(1 − m) + e^{−βΔ} m with m = σ(βΔ / τ);
    - ipo: (Δ_avg − 1/(2β))², with each log-ratio divided by its completion's token count (``chosen_counts``,
      ``rejected_counts``, as TRL);
    - nca_pair, bco_pair, sppo_hard, apo_zero, apo_down: as in TRL, on the two log-ratios.

    ``label_smoothing`` is ε (robust, exo_pair); ``discopop_tau`` is τ.
    """
    check_dpo_options(beta, loss_type, label_smoothing)
    chosen_ratio = chosen_logps - (0.0 if ref_chosen_logps is None else ref_chosen_logps)
    rejected_ratio = rejected_logps - (0.0 if ref_rejected_logps is None else ref_rejected_logps)
    chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
    margin = beta * (chosen_ratio - rejected_ratio)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(margin)
    elif loss_type == "hinge":
        losses = torch.relu(1 - margin)
    elif loss_type == "ipo":
        if chosen_counts is None or rejected_counts is None:
            raise ValueError("loss_type='ipo' needs the completions' token counts (chosen_counts, rejected_counts)")
        delta = chosen_ratio / chosen_counts.clamp(min=1) - rejected_ratio / rejected_counts.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        losses = (torch.sigmoid(margin) * (F.logsigmoid(margin) - math.log1p(-eps))
                  + torch.sigmoid(-margin) * (F.logsigmoid(-margin) - math.log(eps)))
    elif loss_type == "nca_pair":
        losses = -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(margin) + eps * F.logsigmoid(-margin)) / (1 - 2 * eps)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
    elif loss_type == "sppo_hard":
        losses = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(chosen_rewards) + torch.sigmoid(rejected_rewards)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(chosen_rewards) + 1 - torch.sigmoid(margin)
    else:  # discopop
        modulation = torch.sigmoid(margin / discopop_tau)
        losses = -F.logsigmoid(margin) * (1 - modulation) + torch.exp(-margin) * modulation
    return losses, chosen_rewards, rejected_rewards


def _smoothed_sigmoid_losses(logits, label_smoothing: float):
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def simpo_losses(chosen_logps, rejected_logps, *, beta: float = 0.1, gamma: float = 0.5, label_smoothing: float = 0.0):
    """SimPO (arXiv 2405.14734), reference-free on length-averaged log-probs: with x = β(c − r) − γ,
    (1 − ε)(−log σ(x)) + ε(−log σ(−x)). Returns (losses, β·c, β·r), each ``[B]``."""
    logits = beta * (chosen_logps - rejected_logps) - gamma
    return _smoothed_sigmoid_losses(logits, label_smoothing), beta * chosen_logps, beta * rejected_logps


def cpo_losses(chosen_logps, rejected_logps, *, beta: float = 0.1, label_smoothing: float = 0.0):
    """CPO (arXiv 2401.08417), reference-free: with x = β(c − r), (1 − ε)(−log σ(x)) + ε(−log σ(−x)); its NLL term
    on the chosen completions is added by the caller. Returns (losses, β·c, β·r), each ``[B]``."""
    logits = beta * (chosen_logps - rejected_logps)
    return _smoothed_sigmoid_losses(logits, label_smoothing), beta * chosen_logps, beta * rejected_logps


def orpo_losses(chosen_logps, rejected_logps, *, beta: float = 0.1, chosen_counts=None, rejected_counts=None):
    """ORPO (arXiv 2403.07691) on length-averaged log-probs: with log odds(y) = log p − log(1 − p),
    L = −β log σ(log odds(chosen) − log odds(rejected)); its NLL term is added by the caller.

    A completion with no scored token has log-prob 0 (halo-ops' rule), so p = 1 and infinite odds: a pair with
    such a completion (``chosen_counts`` or ``rejected_counts`` 0, where given) carries no preference, and gets
    an odds-ratio loss of 0, a log odds ratio and log σ of 0, and no gradient from this term (its NLL term, if
    any, stays). Liger gives NaN there, and the plain formula +inf.

    Returns (losses, β·c, β·r, log σ(log odds ratio), log odds ratio), each ``[B]``."""
    empty = torch.zeros_like(chosen_logps, dtype=torch.bool)
    for counts in (chosen_counts, rejected_counts):
        if counts is not None:
            empty = empty | (counts == 0)
    safe_chosen, safe_rejected = (torch.where(empty, -1.0, x) for x in (chosen_logps, rejected_logps))  # no inf
    log_odds = (safe_chosen - safe_rejected) - (torch.log1p(-torch.exp(safe_chosen))
                                                - torch.log1p(-torch.exp(safe_rejected)))
    log_odds = torch.where(empty, 0.0, log_odds)
    ratio = torch.where(empty, 0.0, F.logsigmoid(log_odds))
    return -beta * ratio, beta * chosen_logps, beta * rejected_logps, ratio, log_odds
