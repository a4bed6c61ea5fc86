"""Sequence-level KTO kernel: losses, dL/dlogp coefficients, rewards and metric sums in one launch.

One program walks the batch in BLOCK-sized pieces (B is small next to N · V), so the sums need
no atomics and are deterministic. For sequence i, with s = +1 (desirable) or −1, w = λ_D or λ_U,
and z0' = z0 (kto) or 0 (apo_zero_unpaired):

    x_i = s β (logp_i − ref_i − z0'),   loss_i = w σ(−x_i),   c_i = dL/dlogp_i = −w s β σ(x_i) σ(−x_i) / B

The sums vector follows ``halo_ops.losses.kto.SUM_KEYS``; the same formulas in PyTorch are
``halo_ops.losses.kto.kto_terms``.
"""

import torch
import triton
import triton.language as tl

N_SUMS = 12


@triton.jit
def kto_sequence_kernel(
    policy_ptr, ref_ptr, labels_ptr, kl_ptr, logit_sums_ptr, token_counts_ptr, entropy_sums_ptr,
    losses_ptr, coeff_ptr, rewards_ptr, sums_ptr,
    B, inv_batch, beta, desirable_weight, undesirable_weight,
    HAS_KL: tl.constexpr, HAS_TOKEN_STATS: tl.constexpr, BLOCK: tl.constexpr,
):
    # inv_batch = 1 / max(B, 1) comes from the host: Triton turns an integer argument equal to 1 into a
    # constexpr, so arithmetic on B itself would not compile for a batch of one
    z0 = 0.0
    if HAS_KL:
        z0 = tl.load(kl_ptr).to(tl.float32)
    # One running per-lane sum per entry of the sums vector (halo_ops.losses.kto.SUM_KEYS order)
    zeros = tl.zeros((BLOCK,), tl.float32)
    sum_loss, n_chosen, n_rejected, reward_chosen, reward_rejected = zeros, zeros, zeros, zeros, zeros
    logp_chosen, logp_rejected, logit_chosen, logit_rejected = zeros, zeros, zeros, zeros
    tokens_chosen, tokens_rejected, entropy = zeros, zeros, zeros
    for start in range(0, B, BLOCK):
        o = start + tl.arange(0, BLOCK)
        m = o < B
        b_logp = tl.load(policy_ptr + o, mask=m, other=0.0).to(tl.float32)
        b_ref = tl.load(ref_ptr + o, mask=m, other=0.0).to(tl.float32)
        b_label = tl.load(labels_ptr + o, mask=m, other=0)
        b_chosen = (b_label != 0) & m
        b_rejected = (b_label == 0) & m
        b_sign = tl.where(b_chosen, 1.0, -1.0)
        b_weight = tl.where(b_chosen, desirable_weight, undesirable_weight)
        b_x = b_sign * beta * (b_logp - b_ref - z0)
        b_sig = tl.sigmoid(b_x)
        b_sig_neg = tl.sigmoid(-b_x)
        b_loss = tl.where(m, b_weight * b_sig_neg, 0.0)
        b_coeff = -b_weight * b_sign * beta * b_sig * b_sig_neg * inv_batch
        b_reward = beta * (b_logp - b_ref)
        tl.store(losses_ptr + o, b_loss, mask=m)
        tl.store(coeff_ptr + o, b_coeff, mask=m)
        tl.store(rewards_ptr + o, b_reward, mask=m)
        sum_loss += b_loss
        n_chosen += b_chosen.to(tl.float32)
        n_rejected += b_rejected.to(tl.float32)
        reward_chosen += tl.where(b_chosen, b_reward, 0.0)
        reward_rejected += tl.where(b_rejected, b_reward, 0.0)
        logp_chosen += tl.where(b_chosen, b_logp, 0.0)
        logp_rejected += tl.where(b_rejected, b_logp, 0.0)
        if HAS_TOKEN_STATS:
            b_logit_sum = tl.load(logit_sums_ptr + o, mask=m, other=0.0)
            b_tokens = tl.load(token_counts_ptr + o, mask=m, other=0.0)
            logit_chosen += tl.where(b_chosen, b_logit_sum, 0.0)
            logit_rejected += tl.where(b_rejected, b_logit_sum, 0.0)
            tokens_chosen += tl.where(b_chosen, b_tokens, 0.0)
            tokens_rejected += tl.where(b_rejected, b_tokens, 0.0)
            entropy += tl.load(entropy_sums_ptr + o, mask=m, other=0.0)
    tl.store(sums_ptr + 0, tl.sum(sum_loss, axis=0))
    tl.store(sums_ptr + 1, tl.sum(n_chosen, axis=0))
    tl.store(sums_ptr + 2, tl.sum(n_rejected, axis=0))
    tl.store(sums_ptr + 3, tl.sum(reward_chosen, axis=0))
    tl.store(sums_ptr + 4, tl.sum(reward_rejected, axis=0))
    tl.store(sums_ptr + 5, tl.sum(logp_chosen, axis=0))
    tl.store(sums_ptr + 6, tl.sum(logp_rejected, axis=0))
    tl.store(sums_ptr + 7, tl.sum(logit_chosen, axis=0))
    tl.store(sums_ptr + 8, tl.sum(logit_rejected, axis=0))
    tl.store(sums_ptr + 9, tl.sum(tokens_chosen, axis=0))
    tl.store(sums_ptr + 10, tl.sum(tokens_rejected, axis=0))
    tl.store(sums_ptr + 11, tl.sum(entropy, axis=0))


def kto_sequence_terms(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor | None,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    token_stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    block: int = 1024,
):
    """[B] fp32 policy/ref log-probs, bool labels, 0-d z0 (None: 0) → (losses, coeff, rewards, sums).

    ``token_stats`` = (logit_sums, token_counts, entropy_sums), each [B] fp32, for the token metrics.
    """
    batch = policy_logps.shape[0]
    f32 = {"dtype": torch.float32, "device": policy_logps.device}
    losses, coeff, rewards = (torch.empty(batch, **f32) for _ in range(3))
    sums = torch.empty(N_SUMS, **f32)
    stats = tuple(t.float().contiguous() for t in token_stats) if token_stats is not None else (None, None, None)
    kto_sequence_kernel[(1,)](
        policy_logps.float().contiguous(), ref_logps.float().contiguous(), labels.to(torch.int32).contiguous(),
        kl, *stats,
        losses, coeff, rewards, sums,
        batch, 1.0 / max(batch, 1), float(beta), float(desirable_weight), float(undesirable_weight),
        HAS_KL=kl is not None, HAS_TOKEN_STATS=token_stats is not None, BLOCK=block,
        enable_fp_fusion=True,  # as every launch: kernels.config.launch_options
    )
    return losses, coeff, rewards, sums
