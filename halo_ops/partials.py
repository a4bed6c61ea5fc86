"""Per-token partials over a piece of the vocabulary, and their merge: the one home of the logsumexp merge.

Every path computes, for each token and each piece ``k`` of the vocabulary it visits (a Triton
vocabulary split, a chunk of the PyTorch path, a tensor-parallel shard), with ``z`` the transformed
logits over that piece:

    m_k = max_v z_v                        s_k = Σ_v exp(z_v − m_k)
    t_k = z_target if the target is in the piece, else 0
    u_k = Σ_v exp(z_v − m_k) · (z_v − m_k)  c_k = Σ_v z_v          (u, c, q, b only with statistics)
    q_k = Σ_v exp(2 (z_v − m_k))           b_k = max of z_v over the piece's columns before the target's

stacked as ``partials [3 or 7, K, N]`` in that order. Merging over the pieces, with M = max_k m_k:

    S = Σ_k s_k e^{m_k − M},   lse = M + log S,   logp = Σ_k t_k − lse
    U = Σ_k e^{m_k − M} (u_k + s_k (m_k − M)),   entropy = log S − U / S,   mean logit = Σ_k c_k / V
    Q = Σ_k q_k e^{2 (m_k − M)},   log Σ_v p_v² = log Q − 2 log S
    is_top1 = (Σ_k t_k ≥ M) and (Σ_k t_k > max_k b_k)     (the target is the first argmax, as torch.argmax)

A piece a row never visited holds m = b = −inf, s = q = 0; ignored rows come out as logp 0, lse +inf
(so a backward reads their softmax as 0), the statistics 0 (is_top1 False).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

MAX, SUM_EXP, TARGET_LOGIT, CENTERED_SUM, LOGIT_SUM, SQ_SUM_EXP, MAX_BEFORE_TARGET = range(7)


class TokenStats(NamedTuple):
    """The per-token statistics of softmax(z) the partials give, each [N], 0 (False) at ignored targets."""

    entropy: torch.Tensor  # −Σ p log p
    mean_logit: torch.Tensor  # Σ_v z_v / V
    log_sum_sq_probs: torch.Tensor  # log Σ_v p_v²
    is_top1: torch.Tensor  # bool: the target is the argmax (the first one, on ties)


def n_partials(return_stats: bool) -> int:
    return 7 if return_stats else 3


def empty_partials(pieces: int, n_tokens: int, return_stats: bool, dtype, device) -> torch.Tensor:
    """Partials of rows no piece has visited yet: m = −inf, every sum 0."""
    partials = torch.zeros((n_partials(return_stats), pieces, n_tokens), dtype=dtype, device=device)
    partials[MAX] = float("-inf")
    if return_stats:
        partials[MAX_BEFORE_TARGET] = float("-inf")
    return partials


def combine_pieces(partials: torch.Tensor) -> torch.Tensor:
    """``partials [3 or 7, K, N]`` → the same rows' partials over all K pieces as one piece, ``[3 or 7, 1, N]``
    (relative to M = max_k m_k). A tensor-parallel rank sends this, and the ranks' pieces merge again."""
    piece_max = partials[MAX]
    row_max = piece_max.amax(0)
    shift = piece_max - torch.where(row_max == float("-inf"), 0.0, row_max)  # −inf on pieces never visited
    scale = torch.exp(shift)  # [K, N], 0 where a piece was never visited
    pieces = [row_max, (partials[SUM_EXP] * scale).sum(0), partials[TARGET_LOGIT].sum(0)]
    if partials.shape[0] == 7:
        moved = torch.where(partials[SUM_EXP] > 0, partials[SUM_EXP] * shift, 0.0)  # s_k (m_k − M), 0 when s_k = 0
        pieces += [(scale * (partials[CENTERED_SUM] + moved)).sum(0), partials[LOGIT_SUM].sum(0),
                   (partials[SQ_SUM_EXP] * scale * scale).sum(0), partials[MAX_BEFORE_TARGET].amax(0)]
    return torch.stack(pieces).unsqueeze(1)


def merge_partials(partials: torch.Tensor, valid: torch.Tensor, vocab):
    """``partials [3 or 7, K, N]`` → (logps [N], lse [N], ``TokenStats`` or None without statistics).

    ``vocab``: the vocabulary size the mean logit divides by (an int, or a 0-d tensor)."""
    merged = combine_pieces(partials)[:, 0]
    sum_exp = merged[SUM_EXP]
    lse = merged[MAX] + torch.log(sum_exp)  # NaN or −inf only on rows no piece visited, masked below
    target_logit = merged[TARGET_LOGIT]
    logps = torch.where(valid, target_logit - lse, 0.0)
    stats = None
    if partials.shape[0] == 7:
        log_sum_exp = torch.log(sum_exp)
        is_top1 = valid & (target_logit >= merged[MAX]) & (target_logit > merged[MAX_BEFORE_TARGET])
        stats = TokenStats(
            entropy=torch.where(valid, log_sum_exp - merged[CENTERED_SUM] / sum_exp, 0.0),
            mean_logit=torch.where(valid, merged[LOGIT_SUM] / vocab, 0.0),
            log_sum_sq_probs=torch.where(valid, torch.log(merged[SQ_SUM_EXP]) - 2 * log_sum_exp, 0.0),
            is_top1=is_top1,
        )
    return logps, torch.where(valid, lse, float("inf")), stats
