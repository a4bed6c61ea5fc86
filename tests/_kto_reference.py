"""An independent float64 statement of TRL 1.16's KTOTrainer loss and metrics (trl/trainer/kto_trainer.py).

Written the way TRL writes it (index_select into chosen and rejected, ``1 - sigmoid``, ``cat``,
``nanmean``), so halo-ops' unified formula is checked against TRL's structure, not against itself.
"""

import torch


def trl_kto(policy_logps, ref_logps, labels, kl, *, beta, desirable_weight=1.0, undesirable_weight=1.0,
            loss_type="kto", mean_logits=None, completion_mask=None, entropy=None):
    """Returns (loss, metrics); metrics["losses"] are TRL's concatenated per-sequence losses (chosen first).

    ``mean_logits``/``entropy``/``completion_mask`` are [B, T] per token.
    """
    labels = torch.as_tensor(labels).bool()
    chosen_idx = torch.nonzero(labels, as_tuple=False).view(-1)
    rejected_idx = torch.nonzero(~labels, as_tuple=False).view(-1)
    chosen_logps, rejected_logps = policy_logps.index_select(0, chosen_idx), policy_logps.index_select(0, rejected_idx)
    ref_chosen, ref_rejected = ref_logps.index_select(0, chosen_idx), ref_logps.index_select(0, rejected_idx)
    if loss_type == "kto":
        kl = torch.as_tensor(0.0 if kl is None else kl, dtype=policy_logps.dtype).clamp(min=0)
    else:
        kl = torch.zeros((), dtype=policy_logps.dtype)
    chosen_logratios = chosen_logps - ref_chosen
    rejected_logratios = rejected_logps - ref_rejected
    if loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    else:
        chosen_losses = 1 - torch.sigmoid(beta * chosen_logratios)
        rejected_losses = torch.sigmoid(beta * rejected_logratios)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    loss = losses.nanmean()

    n_chosen, n_rejected = len(chosen_idx), len(rejected_idx)
    metrics = {"kl": kl, "losses": losses.detach()}
    if n_chosen:
        metrics["rewards/chosen"] = chosen_rewards.nansum() / n_chosen
        metrics["logps/chosen"] = chosen_logps.detach().nansum() / n_chosen
    if n_rejected:
        metrics["rewards/rejected"] = rejected_rewards.nansum() / n_rejected
        metrics["logps/rejected"] = rejected_logps.detach().nansum() / n_rejected
    if n_chosen and n_rejected:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    if mean_logits is not None:
        chosen_mask = completion_mask.index_select(0, chosen_idx)
        rejected_mask = completion_mask.index_select(0, rejected_idx)
        if chosen_mask.sum() > 0:
            metrics["logits/chosen"] = mean_logits.index_select(0, chosen_idx)[chosen_mask.bool()].sum() / chosen_mask.sum()
        if rejected_mask.sum() > 0:
            metrics["logits/rejected"] = (mean_logits.index_select(0, rejected_idx)[rejected_mask.bool()].sum()
                                          / rejected_mask.sum())
        if completion_mask.sum() > 0:
            metrics["entropy"] = (entropy * completion_mask).sum() / completion_mask.sum()
    return loss, metrics
