"""Per-token partials over a piece of the vocabulary, and their merge: the one home of the logsumexp merge.

Every path computes, for each token and each piece ``k`` of the vocabulary it visits (a Triton
vocabulary split, a chunk of the PyTorch path, a tensor-parallel shard), with ``z`` the transformed
logits over that piece:

    m_k = max_v z_v                        s_k = Σ_v exp(z_v − m_k)
    t_k = z_target if the target is in the piece, else 0
    u_k = Σ_v exp(z_v − m_k) · (z_v − m_k)  c_k = Σ_v z_v          (u, c, q, b only for the statistics asked for)
    q_k = Σ_v exp(2 (z_v − m_k))           b_k = max of z_v over the piece's columns before the target's

stacked as ``partials [3 or 7, K, N]`` in that order (7 when any statistic is asked for; a kind no asked-for
statistic needs keeps its empty value, 0 or −inf, and costs nothing). Merging over the pieces, with M = max_k m_k:

    S = Σ_k s_k e^{m_k − M},   lse = M + log S,   logp = Σ_k t_k − lse
    U = Σ_k e^{m_k − M} (u_k + s_k (m_k − M)),   entropy = log S − U / S,   mean logit = Σ_k c_k / V
    Q = Σ_k q_k e^{2 (m_k − M)},   log Σ_v p_v² = log Q − 2 log S
    is_top1 = (Σ_k t_k ≥ M) and (Σ_k t_k > max_k b_k)     (the target is the first argmax, as torch.argmax)

Each statistic needs one kind: the entropy u, the mean logit c, log Σ p² q, is_top1 b. Without softcap z is
linear in the projection, so Σ_v z_v = scale · (h · Σ_v W_v + Σ_v b_v) costs O(D) per token instead of a pass
over the logits (``add_linear_logit_sums``); the backends then leave c to it.

A piece a row never visited holds m = b = −inf, s = q = 0; ignored rows come out as logp 0, lse +inf
(so a backward reads their softmax as 0), the statistics 0 (is_top1 False).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

MAX, SUM_EXP, TARGET_LOGIT, CENTERED_SUM, LOGIT_SUM, SQ_SUM_EXP, MAX_BEFORE_TARGET = range(7)

# The statistics, in this order everywhere (``TokenOptions.stats`` holds a subset)
STATISTICS = ("entropy", "mean_logit", "log_sum_sq_probs", "is_top1")


class TokenStats(NamedTuple):
    """The per-token statistics of softmax(z) the partials give, each [N], 0 (False) at ignored targets, None
    where not asked for."""

    entropy: torch.Tensor | None  # −Σ p log p
    mean_logit: torch.Tensor | None  # Σ_v z_v / V
    log_sum_sq_probs: torch.Tensor | None  # log Σ_v p_v²
    is_top1: torch.Tensor | None  # bool: the target is the argmax (the first one, on ties)


def stat_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of statistic ``name`` for log-probs in ``dtype``: bool for is_top1, else ``dtype``."""
    return torch.bool if name == "is_top1" else dtype


def zero_stats(stats: tuple[str, ...], n_tokens: int, dtype, device) -> TokenStats:
    """``TokenStats`` of zeros [n_tokens] (False for is_top1) for the statistics in ``stats``, None for the others."""
    return TokenStats(*(torch.zeros(n_tokens, dtype=stat_dtype(name, dtype), device=device) if name in stats
                        else None for name in STATISTICS))


def requested_statistics(return_stats) -> tuple[str, ...]:
    """A public call's ``return_stats`` as the statistics to compute, in ``STATISTICS`` order: ``True`` → all of
    them, ``False`` / ``None`` → none, an iterable of names → those."""
    if return_stats is None or isinstance(return_stats, bool):
        return STATISTICS if return_stats else ()
    names = (return_stats,) if isinstance(return_stats, str) else tuple(return_stats)
    unknown = [name for name in names if name not in STATISTICS]
    if unknown:
        raise ValueError(f"return_stats: unknown statistic {unknown[0]!r}; choose among {', '.join(STATISTICS)} "
                         "(or True for all, False for none)")
    return tuple(name for name in STATISTICS if name in names)


def kernel_stats_mask(stats: tuple[str, ...], softcap: bool) -> int:
    """The partial kinds a backend folds for ``stats``, as the bit mask the kernels take (``STATS``): 0 without
    statistics (3 kinds); else bit 0 (7 kinds stored) and a bit per kind folded: 2 the centered sum (entropy),
    4 Σ z (the mean logit, with softcap only: ``add_linear_logit_sums`` gives it otherwise), 8 Σ exp(2 (z − m))
    (log Σ p²), 16 the max before the target (is_top1)."""
    if not stats:
        return 0
    bits = {"entropy": 2, "mean_logit": 4 if softcap else 0, "log_sum_sq_probs": 8, "is_top1": 16}
    return 1 | sum(bits[name] for name in stats)


def n_partials(stats: tuple[str, ...]) -> int:
    return 7 if stats else 3


def empty_partials(pieces: int, n_tokens: int, stats: tuple[str, ...], dtype, device) -> torch.Tensor:
    """Partials of rows no piece has visited yet: m = −inf, every sum 0."""
    partials = torch.zeros((n_partials(stats), pieces, n_tokens), dtype=dtype, device=device)
    partials[MAX] = float("-inf")
    if stats:
        partials[MAX_BEFORE_TARGET] = float("-inf")
    return partials


def logit_sum_coefficients(weight, bias, scale: float, dtype):
    """(a, c) with Σ_v z_v = h · a + c for z = scale · (h · Wᵀ + b): a = scale · Σ_v W_v [D] and c = scale · Σ_v b_v
    (0 without bias), in ``dtype``. It reads the whole weight: compute it once per call."""
    return weight.sum(0, dtype=dtype) * scale, 0.0 if bias is None else bias.sum(dtype=dtype) * scale  # no sync


def linear_logit_sums(weight, bias, options, dtype):
    """``logit_sum_coefficients`` of ``options``' transform (a ``TokenOptions``) where it asks for the mean logit
    without softcap, when z is linear in the projection; else None."""
    transform = options.transform
    if "mean_logit" not in options.stats or transform.softcap is not None:
        return None
    return logit_sum_coefficients(weight, bias, transform.logit_scale / transform.temperature, dtype)


def add_linear_logit_sums(partials, hidden, sums, rows: int = 4096) -> None:
    """Σ_v z_v from ``sums`` (``linear_logit_sums``; nothing when None) for every row of ``hidden`` [n, D], into the
    first piece of ``partials [7, K, n]``' Σ z kind (the others 0), ``rows`` rows of hidden converted at a time."""
    if sums is None:
        return
    weight_sum, bias_sum = sums
    partials[LOGIT_SUM] = 0.0
    for r0 in range(0, hidden.shape[0], rows):
        torch.mv(hidden[r0 : r0 + rows].to(partials.dtype), weight_sum, out=partials[LOGIT_SUM, 0, r0 : r0 + rows])
    partials[LOGIT_SUM, 0] += bias_sum


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


def merge_partials(partials: torch.Tensor, valid: torch.Tensor, vocab, stats: tuple[str, ...] = STATISTICS):
    """``partials [3 or 7, K, N]`` → (logps [N], lse [N], ``TokenStats`` of ``stats`` or None without statistics).

    ``vocab``: the vocabulary size the mean logit divides by (an int, or a 0-d tensor)."""
    merged = combine_pieces(partials)[:, 0]
    sum_exp = merged[SUM_EXP]
    lse = merged[MAX] + torch.log(sum_exp)  # NaN or −inf only on rows no piece visited, masked below
    target_logit = merged[TARGET_LOGIT]
    logps = torch.where(valid, target_logit - lse, 0.0)
    if partials.shape[0] == 3 or not stats:
        return logps, torch.where(valid, lse, float("inf")), None
    log_sum_exp = torch.log(sum_exp)
    formulas = {
        "entropy": lambda: torch.where(valid, log_sum_exp - merged[CENTERED_SUM] / sum_exp, 0.0),
        "mean_logit": lambda: torch.where(valid, merged[LOGIT_SUM] / vocab, 0.0),
        "log_sum_sq_probs": lambda: torch.where(valid, torch.log(merged[SQ_SUM_EXP]) - 2 * log_sum_exp, 0.0),
        "is_top1": lambda: valid & (target_logit >= merged[MAX]) & (target_logit > merged[MAX_BEFORE_TARGET]),
    }
    token_stats = TokenStats(*(formulas[name]() if name in stats else None for name in STATISTICS))
    return logps, torch.where(valid, lse, float("inf")), token_stats
