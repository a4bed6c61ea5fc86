"""The KTO loss from per-sequence log-probs, exactly as TRL's KTOTrainer (trl 1.16) computes it.

KTO (Ethayarajh et al., arXiv 2402.01306). For sequence i with policy log-prob ``logp_i``, reference
log-prob ``ref_i`` and label ``desirable_i``:

    r_i  = logp_i − ref_i                                    (implicit reward / β)
    z0   = max(0, mean over KL pairs (logp_π(y') − logp_ref(y')))   detached (``kto_kl``)
    kto:               desirable   λ_D (1 − σ(β (r_i − z0)))      undesirable  λ_U (1 − σ(β (z0 − r_i)))
    apo_zero_unpaired: desirable   λ_D (1 − σ(β r_i))             undesirable  λ_U σ(β r_i)
    loss = mean_i loss_i   (0 for an empty batch)

Both loss types are ``w_i · σ(−x_i)`` with ``x_i = s_i β (r_i − z0')``, ``s_i = ±1`` for desirable /
undesirable and ``z0' = z0`` (kto) or 0 (apo), so ``dloss_i/dlogp_i = −w_i s_i β σ(x_i) σ(−x_i)``.
``kto_terms`` is the PyTorch home of these formulas; ``halo_ops.kernels.kto_sequence`` is the Triton one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..validation import check_sequence_tensor

LOSS_TYPES = ("kto", "apo_zero_unpaired")

# Layout of the metric sums vector shared by the Triton kernel and the PyTorch path.
SUM_KEYS = (
    "loss_sum",
    "count/chosen",
    "count/rejected",
    "rewards/chosen_sum",
    "rewards/rejected_sum",
    "logps/chosen_sum",
    "logps/rejected_sum",
    "logits/chosen_sum",
    "logits/rejected_sum",
    "count/chosen_tokens",
    "count/rejected_tokens",
    "entropy_sum",
)


@dataclass
class KTOOutput:
    """What every KTO entry point returns.

    ``loss`` (scalar) is what to differentiate. ``losses`` [B] are the weighted per-sequence losses,
    ``policy_logps`` [B] and ``rewards`` [B] (β · (logp − ref), detached) are in batch order, with
    ``labels`` [B] (bool) telling desirable from undesirable. ``metrics`` holds 0-d tensors under
    TRL's names (a mean over an empty set is NaN) plus the sums and counts behind each mean
    (``*_sum``, ``count/*``), so a trainer can aggregate across ranks and accumulation steps.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    kl: torch.Tensor
    policy_logps: torch.Tensor
    rewards: torch.Tensor
    labels: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def chosen_rewards(self) -> torch.Tensor:
        return self.rewards[self.labels]

    @property
    def rejected_rewards(self) -> torch.Tensor:
        return self.rewards[~self.labels]


def check_kto_options(beta: float, desirable_weight: float, undesirable_weight: float, loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    for name, value in (("beta", beta), ("desirable_weight", desirable_weight),
                        ("undesirable_weight", undesirable_weight)):
        if not isinstance(value, (int, float)) or not value == value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value!r}")


def as_bool_labels(labels, batch: int, device: torch.device, *, check_values: bool = True) -> torch.Tensor:
    """bool [B] from bool or 0/1 integer labels; anything else is an error (values unchecked while compiling)."""
    labels = torch.as_tensor(labels, device=device)
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"labels must have shape [B={batch}], got {tuple(labels.shape)}")
    if labels.dtype == torch.bool:
        return labels
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"labels must be bool or 0/1 integers, got dtype {labels.dtype}")
    checkable = check_values and labels.numel() and not torch.compiler.is_compiling()
    if checkable and bool(((labels != 0) & (labels != 1)).any()):
        raise ValueError(f"labels must be bool or 0/1 integers, got values {labels.unique().tolist()}")
    return labels != 0


def reference_point(kl, loss_type: str, like: torch.Tensor) -> torch.Tensor:
    """z0 as a detached 0-d tensor: the given reference point for kto, 0 for apo_zero_unpaired or None."""
    if kl is None or loss_type == "apo_zero_unpaired":
        return like.new_zeros(())
    kl = torch.as_tensor(kl, dtype=like.dtype, device=like.device).detach()
    if kl.numel() != 1:
        raise ValueError(f"kl must be a scalar (the reference point z0), got shape {tuple(kl.shape)}")
    return kl.reshape(())


def kto_terms(policy_logps, ref_logps, labels, kl, beta, desirable_weight, undesirable_weight, batch=None):
    """Per-sequence weighted losses, dloss/dlogp_i in closed form, and rewards, in the log-probs' dtype.

    Differentiable in policy_logps. ``kl`` is z0 as a 0-d tensor (already 0 for apo_zero_unpaired).
    Returns (losses [B], coeff [B], rewards [B]): the batch loss is ``losses.sum() / max(B, 1)``,
    coeff_i = −w_i s_i β σ(x_i) σ(−x_i) / max(B, 1) is its gradient (detached), rewards = β (logp − ref)
    (detached). ``batch``: the B of the batch mean, when these are some of its sequences (default: all).
    """
    # Built in the log-probs' dtype: a Python-float torch.where would round the weights to float32
    new = policy_logps.new_tensor
    sign = torch.where(labels, new(1.0), new(-1.0))
    weight = torch.where(labels, new(float(desirable_weight)), new(float(undesirable_weight)))
    ref_logps = ref_logps.detach().to(policy_logps.dtype)
    x = sign * beta * (policy_logps - ref_logps - kl.to(policy_logps.dtype))
    losses = weight * torch.sigmoid(-x)
    batch = max(policy_logps.shape[0] if batch is None else batch, 1)
    coeff = (-weight * sign * beta * torch.sigmoid(x) * torch.sigmoid(-x) / batch).detach()
    rewards = (beta * (policy_logps - ref_logps)).detach()
    return losses, coeff, rewards


def metric_sums(losses, policy_logps, rewards, labels, logit_sums=None, token_counts=None, entropy_sums=None):
    """The sums vector (``SUM_KEYS`` order) from per-sequence values, all detached, float32."""
    f32 = lambda x: x.detach().float()  # noqa: E731
    chosen, rejected = labels.float(), (~labels).float()
    zero = losses.new_zeros((), dtype=torch.float32)
    logit_sums = f32(logit_sums) if logit_sums is not None else None
    token_counts = f32(token_counts) if token_counts is not None else None
    values = [
        f32(losses).sum(), chosen.sum(), rejected.sum(),
        (f32(rewards) * chosen).sum(), (f32(rewards) * rejected).sum(),
        (f32(policy_logps) * chosen).sum(), (f32(policy_logps) * rejected).sum(),
        (logit_sums * chosen).sum() if logit_sums is not None else zero,
        (logit_sums * rejected).sum() if logit_sums is not None else zero,
        (token_counts * chosen).sum() if token_counts is not None else zero,
        (token_counts * rejected).sum() if token_counts is not None else zero,
        f32(entropy_sums).sum() if entropy_sums is not None else zero,
    ]
    return torch.stack(values)


def metrics_from_sums(sums: torch.Tensor, kl: torch.Tensor, with_token_stats: bool) -> dict[str, torch.Tensor]:
    """TRL's metric names from the sums vector; means over empty sets are NaN. No host sync."""
    s = dict(zip(SUM_KEYS, sums.unbind(0)))
    nan = sums.new_full((), float("nan"))

    def mean(total, count):
        return torch.where(count > 0, total / count.clamp(min=1), nan)

    metrics = {
        "rewards/chosen": mean(s["rewards/chosen_sum"], s["count/chosen"]),
        "rewards/rejected": mean(s["rewards/rejected_sum"], s["count/rejected"]),
        "logps/chosen": mean(s["logps/chosen_sum"], s["count/chosen"]),
        "logps/rejected": mean(s["logps/rejected_sum"], s["count/rejected"]),
        "kl": kl.detach().float(),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    keys = [k for k in SUM_KEYS if k != "loss_sum"]
    if with_token_stats:
        tokens = s["count/chosen_tokens"] + s["count/rejected_tokens"]
        metrics["logits/chosen"] = mean(s["logits/chosen_sum"], s["count/chosen_tokens"])
        metrics["logits/rejected"] = mean(s["logits/rejected_sum"], s["count/rejected_tokens"])
        metrics["entropy"] = mean(s["entropy_sum"], tokens)
    else:
        keys = [k for k in keys if not k.startswith(("logits/", "entropy", "count/chosen_tok", "count/rejected_tok"))]
    metrics.update({k: s[k] for k in keys})
    return metrics


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels,
    *,
    kl: torch.Tensor | float | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    logit_sums: torch.Tensor | None = None,
    token_counts: torch.Tensor | None = None,
    entropy_sums: torch.Tensor | None = None,
) -> KTOOutput:
    """KTO loss from per-sequence log-probs (``[B]`` each), as TRL's KTOTrainer computes it.

    Args:
        policy_logps: ``[B]`` policy log-probs of the completions (differentiable).
        ref_logps: ``[B]`` reference log-probs (treated as constants).
        labels: ``[B]`` bool or 0/1: True for desirable.
        kl: the reference point z0 (see :func:`kto_kl`), or None for 0. Ignored by
            ``apo_zero_unpaired``, which has none.
        beta, desirable_weight, undesirable_weight, loss_type: as in TRL's ``KTOConfig``.
        logit_sums, token_counts: optional ``[B]`` sums over each completion's tokens of the mean
            logit, and the token counts, for TRL's ``logits/chosen`` and ``logits/rejected``.
        entropy_sums: optional ``[B]`` sums of the per-token entropy, for TRL's ``entropy``.

    The batch loss is the mean of the weighted per-sequence losses, a differentiable 0 for B = 0.
    """
    check_kto_options(beta, desirable_weight, undesirable_weight, loss_type)
    if not isinstance(policy_logps, torch.Tensor) or policy_logps.dim() != 1:
        raise ValueError("policy_logps must be a 1-D tensor [B] of per-sequence log-probs")
    batch, device = policy_logps.shape[0], policy_logps.device
    check_sequence_tensor("policy_logps", policy_logps, batch, device)
    check_sequence_tensor("ref_logps", ref_logps, batch, device)
    labels = as_bool_labels(labels, batch, device)
    z0 = reference_point(kl, loss_type, policy_logps)
    losses, _, rewards = kto_terms(policy_logps, ref_logps, labels, z0, beta, desirable_weight, undesirable_weight)
    loss = losses.sum() / max(batch, 1)
    with_token_stats = logit_sums is not None and token_counts is not None
    sums = metric_sums(losses, policy_logps, rewards, labels, logit_sums, token_counts, entropy_sums)
    return KTOOutput(loss=loss, losses=losses, kl=z0, policy_logps=policy_logps, rewards=rewards, labels=labels,
                     metrics=metrics_from_sums(sums, z0, with_token_stats))


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, *, process_group=None) -> torch.Tensor:
    """The KTO reference point z0 = max(0, mean(policy_kl_logps − ref_kl_logps)), detached, 0-d.

    ``policy_kl_logps`` and ``ref_kl_logps`` are ``[B]`` log-probs of mismatched (prompt,
    completion) pairs under the policy and the reference. In a data-parallel run the value is the
    mean of the per-rank means, as TRL's ``gather_for_metrics(kl).mean()``, clamped after the
    reduction: ``process_group`` names the group; None means the default group when
    ``torch.distributed`` is initialized with more than one rank, and no reduction otherwise.
    """
    if policy_kl_logps.shape != ref_kl_logps.shape or policy_kl_logps.dim() != 1:
        raise ValueError(f"policy_kl_logps and ref_kl_logps must both be [B], got "
                         f"{tuple(policy_kl_logps.shape)} and {tuple(ref_kl_logps.shape)}")
    local_mean = (policy_kl_logps.detach().float() - ref_kl_logps.detach().float()).mean()
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        total = local_mean.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=process_group)
        local_mean = total / dist.get_world_size(process_group)
    return local_mean.clamp(min=0)
