"""Forward kernel: per-token log-probs of transform(h · Wᵀ + b) with an online logsumexp.

Grid: token blocks × vocabulary splits, in one grouped dimension: GROUP_N token blocks run with
every split before the next group starts, so that the programs in flight share a few blocks of H
(which stay in L2) and each tile of W is read by GROUP_N programs at about the same time (the
GROUP_SIZE_M order of Triton's matmul tutorial). Each program owns BLOCK_N tokens and one contiguous
vocabulary range; it streams BLOCK_V-wide tiles of logits computed with ``tl.dot`` over D, folds
each into a running max ``m``, ``s = Σ exp(z − m)`` and the partials of the statistics asked for
(``STATS``), and picks the target logit inside the tile (the online form of the merge in
``halo_ops.partials``). It writes those per-split partials ([3 or 7, S, N], O(N) memory), which the
token op merges. No logits leave the registers. Blocks whose targets are all ignored are skipped.
"""

import torch
import triton
import triton.language as tl

from . import gemm_schedule
from .config import BlockConfig, config_for, dot_options, launch_options, vocab_splits
from .tiles import empty_fold, fold_tile, grouped_program, partial_kinds, projection_tile, store_partials
from .transform import logit_transform, transform_args

GROUP_N = 8  # token blocks per group of the grid's order


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None})
@triton.jit
def linear_logprobs_fwd_kernel(
    h_ptr, w_ptr, bias_ptr, targets_ptr,
    partials_ptr, stride_kind,
    N, V, D, vocab_per_split,
    stride_hn, stride_hd, stride_wv, stride_wd,
    ignore_index, logit_scale, softcap, temperature, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, STATS: tl.constexpr,
    UPCAST_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid_n, pid_s = grouped_program(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, vocab_per_split), GROUP_N)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_target = tl.load(targets_ptr + o_n, mask=m_n, other=ignore_index)
    v_lo = pid_s * vocab_per_split
    v_hi = tl.minimum(v_lo + vocab_per_split, V)

    b_max, b_sum_exp, b_target_logit, b_centered_sum, b_logit_sum, b_sq_sum_exp, b_max_before = empty_fold(BLOCK_N)
    n_valid = tl.sum((m_n & (b_target != ignore_index)).to(tl.int32), axis=0)
    if n_valid > 0:
        for v0 in range(v_lo, v_hi, BLOCK_V):
            o_v = v0 + tl.arange(0, BLOCK_V)
            m_v = o_v < v_hi
            b_y = projection_tile(
                h_ptr, w_ptr, bias_ptr, o_n, m_n, o_v, m_v, D, stride_hn, stride_hd, stride_wv, stride_wd,
                HAS_BIAS, UPCAST_BF16, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
            )
            b_z = logit_transform(b_y, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
            b_max, b_sum_exp, b_target_logit, b_centered_sum, b_logit_sum, b_sq_sum_exp, b_max_before = fold_tile(
                b_z, o_v, m_v, b_target, b_max, b_sum_exp, b_target_logit, b_centered_sum, b_logit_sum, b_sq_sum_exp, b_max_before, STATS)

    store_partials(partials_ptr, stride_kind, pid_s.to(tl.int64) * N + o_n, m_n, b_max, b_sum_exp, b_target_logit,
                   b_centered_sum, b_logit_sum, b_sq_sum_exp, b_max_before, STATS)


def linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    options,
    *,
    config: BlockConfig | None = None,
    splits: int | None = None,
    group: int = GROUP_N,
) -> torch.Tensor:
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] int64 → partials [3 or 7, S, N] fp32.

    ``options``: a ``halo_ops.options.TokenOptions`` (transform, ignore_index, kernel_stats are read; its
    schedule ``"gemm"`` runs ``gemm_schedule.gemm_forward`` instead of the fused kernel).
    The partials are those of ``halo_ops.partials`` (max, Σ exp, target logit[, centered sum, Σ z]) per
    vocabulary split; ``halo_ops.partials.merge_partials`` turns them into log-probs. ``config``: block
    sizes, warps and stages (default: the tuned table's entry for this GPU, dtype and shape, or the
    dtype's default); ``splits``: vocabulary splits (default: enough to fill the GPU with ``group`` token
    blocks in flight); ``group``: token blocks per group of the grid's order.
    """
    if options.schedule == "gemm":
        return gemm_schedule.gemm_forward(hidden, weight, bias, targets, options, config=config)
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    config = config or config_for("forward", options, hidden, weight)
    splits = splits or vocab_splits(n_tokens, vocab, config, hidden.device, group)
    vocab_per_split = triton.cdiv(triton.cdiv(vocab, splits), config.block_v) * config.block_v
    splits = triton.cdiv(vocab, vocab_per_split)
    stats = options.kernel_stats
    partials = torch.empty((partial_kinds(stats), splits, n_tokens), dtype=torch.float32, device=hidden.device)
    grid = (triton.cdiv(n_tokens, config.block_n) * splits,)
    linear_logprobs_fwd_kernel[grid](
        hidden, weight, bias, targets,
        partials, partials.stride(0),
        n_tokens, vocab, dim, vocab_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        options.ignore_index,
        STATS=stats, GROUP_N=group,
        **transform_args(options.transform),
        **dot_options(hidden.dtype),
        **launch_options(config),
    )
    return partials
