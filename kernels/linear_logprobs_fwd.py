"""Forward kernel: per-token log-probs of transform(h · Wᵀ + b) with an online logsumexp.

Grid: (token blocks, vocabulary splits). Each program owns BLOCK_N tokens and one contiguous
vocabulary range; it streams BLOCK_V-wide tiles of logits computed with ``tl.dot`` over D, folds
each into a running max ``m``, ``s = Σ exp(z − m)`` and, with stats, ``u = Σ exp(z − m)(z − m)``
and ``Σ z``, and picks the target logit inside the tile. It writes those per-split partials
([S, N], O(N) memory); the launcher merges the splits. No logits leave the registers. Blocks whose
targets are all ignored are skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import (
    BlockConfig,
    device_arch,
    dot_options,
    launch_options,
    select_config,
    transform_args,
    vocab_splits,
)
from .tiles import logit_transform, projection_tile


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None})
@triton.jit
def linear_logprobs_fwd_kernel(
    h_ptr, w_ptr, bias_ptr, targets_ptr,
    max_ptr, sumexp_ptr, target_logit_ptr, u_ptr, zsum_ptr,
    N, V, D, vocab_per_split,
    stride_hn, stride_hd, stride_wv, stride_wd,
    ignore_index, logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_STATS: tl.constexpr,
    UPCAST_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_t = tl.load(targets_ptr + o_n, mask=m_n, other=ignore_index)
    v_lo = pid_s * vocab_per_split
    v_hi = tl.minimum(v_lo + vocab_per_split, V)

    b_m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    b_s = tl.zeros((BLOCK_N,), tl.float32)
    b_tz = tl.zeros((BLOCK_N,), tl.float32)
    b_u = tl.zeros((BLOCK_N,), tl.float32)
    b_zs = tl.zeros((BLOCK_N,), tl.float32)
    n_valid = tl.sum((m_n & (b_t != ignore_index)).to(tl.int32), axis=0)
    if n_valid > 0:
        for v0 in range(v_lo, v_hi, BLOCK_V):
            o_v = v0 + tl.arange(0, BLOCK_V)
            m_v = o_v < v_hi
            b_y = projection_tile(
                h_ptr, w_ptr, bias_ptr, o_n, m_n, o_v, m_v, D, stride_hn, stride_hd, stride_wv, stride_wd,
                HAS_BIAS, UPCAST_BF16, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
            )
            b_z = logit_transform(b_y, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
            b_z = tl.where(m_v[None, :], b_z, float("-inf"))
            b_tz += tl.sum(tl.where(o_v[None, :] == b_t[:, None], b_z, 0.0), axis=1)
            b_m_new = tl.maximum(b_m, tl.max(b_z, axis=1))
            b_alpha = tl.exp(b_m - b_m_new)
            b_e = tl.exp(b_z - b_m_new[:, None])
            if WITH_STATS:
                b_zc = tl.where(m_v[None, :], b_z - b_m_new[:, None], 0.0)
                b_shift = b_s * tl.where(b_s > 0, b_m - b_m_new, 0.0)  # s = 0 while m = −inf
                b_u = (b_u + b_shift) * b_alpha + tl.sum(b_e * b_zc, axis=1)
                b_zs += tl.sum(tl.where(m_v[None, :], b_z, 0.0), axis=1)
            b_s = b_s * b_alpha + tl.sum(b_e, axis=1)
            b_m = b_m_new

    o_out = pid_s.to(tl.int64) * N + o_n
    tl.store(max_ptr + o_out, b_m, mask=m_n)
    tl.store(sumexp_ptr + o_out, b_s, mask=m_n)
    tl.store(target_logit_ptr + o_out, b_tz, mask=m_n)
    if WITH_STATS:
        tl.store(u_ptr + o_out, b_u, mask=m_n)
        tl.store(zsum_ptr + o_out, b_zs, mask=m_n)


def linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    ignore_index: int,
    logit_scale: float,
    softcap: float | None,
    temperature: float,
    with_stats: bool,
    config: BlockConfig | None = None,
    splits: int | None = None,
):
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] int64 → (logps, lse, entropy, mean_logit).

    Each output is [N] fp32. logps, entropy and mean_logit are 0 and lse is +inf at ignored
    targets; entropy and mean_logit are None unless ``with_stats``. ``config``: block sizes, warps
    and stages (default: the tuned table's entry for this GPU, dtype and shape, or the dtype's default).
    """
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    config = config or select_config("forward", hidden.dtype, dim, vocab, device_arch(hidden.device))
    splits = splits or vocab_splits(n_tokens, vocab, config, hidden.device)
    vocab_per_split = triton.cdiv(triton.cdiv(vocab, splits), config.block_v) * config.block_v
    splits = triton.cdiv(vocab, vocab_per_split)
    n_partials = 5 if with_stats else 3
    partials = torch.empty((n_partials, splits, n_tokens), dtype=torch.float32, device=hidden.device)
    stats_ptrs = (partials[3], partials[4]) if with_stats else (None, None)
    grid = (triton.cdiv(n_tokens, config.block_n), splits)
    linear_logprobs_fwd_kernel[grid](
        hidden, weight, bias, targets,
        partials[0], partials[1], partials[2], *stats_ptrs,
        n_tokens, vocab, dim, vocab_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        ignore_index,
        WITH_STATS=with_stats,
        **transform_args(logit_scale, softcap, temperature),
        **dot_options(hidden.dtype),
        **launch_options(config),
    )
    return merge_vocab_splits(partials, targets != ignore_index, vocab)


def merge_vocab_splits(partials: torch.Tensor, valid: torch.Tensor, vocab: int):
    """Combine per-split (m, s, target logit[, u, Σz]) [S, N] into per-token outputs [N]."""
    split_max, split_sum, split_target = partials[0], partials[1], partials[2]
    row_max = split_max.amax(0)
    weight = torch.exp(split_max - row_max)  # [S, N]
    sum_exp = (split_sum * weight).sum(0)
    lse = row_max + torch.log(sum_exp)
    logps = torch.where(valid, split_target.sum(0) - lse, 0.0)
    entropy = mean_logit = None
    if partials.shape[0] == 5:
        split_u, split_zsum = partials[3], partials[4]
        # u relative to the global max: u_k + s_k (m_k − M), each scaled by exp(m_k − M)
        u = (weight * (split_u + split_sum * (split_max - row_max))).sum(0)
        entropy = torch.where(valid, torch.log(sum_exp) - u / sum_exp, 0.0)
        mean_logit = torch.where(valid, split_zsum.sum(0) / vocab, 0.0)
    return logps, torch.where(valid, lse, float("inf")), entropy, mean_logit
