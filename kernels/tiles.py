"""The tiles every kernel is built from: the projection, and dL/dy for the backward schedules.

Naming (fla-org style): ``b_`` blocks, ``p_`` pointers, ``o_`` offsets, ``m_`` masks.
"""

import triton
import triton.language as tl

from .transform import logit_transform, logit_transform_grad


def partial_kinds(stats_mask: int) -> int:
    """Partials per row and piece: max, Σ exp, target logit, and with any statistic four more (``halo_ops.partials``;
    ``stats_mask`` is its ``kernel_stats_mask``, a kernel's ``STATS``)."""
    return 7 if stats_mask else 3


@triton.jit
def projection_tile(
    h_ptr, w_ptr, bias_ptr,
    o_n, m_n, o_v, m_v,
    D, stride_hn, stride_hd, stride_wv, stride_wd,
    HAS_BIAS: tl.constexpr, UPCAST_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Raw projection ``y = h[o_n] · W[o_v]ᵀ + b[o_v]``: [BLOCK_N, BLOCK_V] fp32, accumulated over D."""
    p_h = h_ptr + o_n[:, None].to(tl.int64) * stride_hn
    p_w = w_ptr + o_v[None, :].to(tl.int64) * stride_wv
    b_y = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_h = tl.load(p_h + o_d[None, :] * stride_hd, mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_w = tl.load(p_w + o_d[:, None] * stride_wd, mask=m_d[:, None] & m_v[None, :], other=0.0)
        if UPCAST_BF16:
            # The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584)
            b_h = b_h.to(tl.float32)
            b_w = b_w.to(tl.float32)
        b_y = tl.dot(b_h, b_w, b_y, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        b_y += tl.load(bias_ptr + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    return b_y


@triton.jit
def has_gradient(b_g, grad_ptr, stride_grad, o_n, m_n, HAS_ENTROPY_GRAD: tl.constexpr):
    """True unless every row of the block has a zero coefficient (ignored tokens, forward-only rows): the
    block's recompute is then skipped. ``grad_ptr`` holds [1 or 3, N] per-row coefficients (``dlogits_tile``)."""
    b_any = tl.max(tl.abs(b_g), axis=0)
    if HAS_ENTROPY_GRAD:
        b_any += tl.max(tl.abs(tl.load(grad_ptr + 2 * stride_grad + o_n, mask=m_n, other=0.0)), axis=0)
    return b_any != 0.0


@triton.jit
def dlogits_tile(
    h_ptr, w_ptr, bias_ptr, targets_ptr, lse_ptr, b_g, grad_ptr, stride_grad, o_n, m_n, o_v, m_v, D,
    stride_hn, stride_hd, stride_wv, stride_wd, logit_scale, softcap, temperature, inv_temperature, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_FILTER: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    UPCAST_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dL/dy for one [BLOCK_N, BLOCK_V] tile, 0 outside the problem: ``(g · onehot − p · c) · dz/dy`` with
    p = exp(z − lse), where c = g, or with HAS_ENTROPY_GRAD (an entropy gradient g_H, ∂H/∂z = −p (log p + H))
    c = a + b · z from the coefficient rows ``grad_ptr`` [3, N] = (g, a = g + g_H (H − lse), b = g_H);
    ``b_g`` is row 0. With HAS_FILTER, p < filter_eps is taken as 0 (gradient filtering)."""
    b_y = projection_tile(
        h_ptr, w_ptr, bias_ptr, o_n, m_n, o_v, m_v, D, stride_hn, stride_hd, stride_wv, stride_wd,
        HAS_BIAS, UPCAST_BF16, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
    )
    return dlogits_from_projection(b_y, targets_ptr, lse_ptr, b_g, grad_ptr, stride_grad, o_n, m_n, o_v, m_v,
                                   logit_scale, softcap, temperature, inv_temperature, filter_eps, HAS_SOFTCAP,
                                   HAS_FILTER, HAS_ENTROPY_GRAD)


@triton.jit
def dlogits_from_projection(b_y, targets_ptr, lse_ptr, b_g, grad_ptr, stride_grad, o_n, m_n, o_v, m_v, logit_scale,
                            softcap, temperature, inv_temperature, filter_eps, HAS_SOFTCAP: tl.constexpr,
                            HAS_FILTER: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr):
    """dL/dy from a tile of the raw projection y (bias included), however it was computed (see ``dlogits_tile``)."""
    b_target = tl.load(targets_ptr + o_n, mask=m_n, other=-1)
    b_lse = tl.load(lse_ptr + o_n, mask=m_n, other=float("inf"))
    b_z = logit_transform(b_y, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
    b_onehot = tl.where(o_v[None, :] == b_target[:, None], 1.0, 0.0)
    b_p = tl.exp(b_z - b_lse[:, None])
    if HAS_FILTER:
        b_p = tl.where(b_p >= filter_eps, b_p, 0.0)
    if HAS_ENTROPY_GRAD:
        b_a = tl.load(grad_ptr + stride_grad + o_n, mask=m_n, other=0.0)
        b_b = tl.load(grad_ptr + 2 * stride_grad + o_n, mask=m_n, other=0.0)
        b_dz = b_g[:, None] * b_onehot - b_p * (b_a[:, None] + b_b[:, None] * b_z)
    else:
        b_dz = b_g[:, None] * (b_onehot - b_p)
    b_dz = b_dz * logit_transform_grad(b_z, logit_scale, softcap, temperature, inv_temperature, HAS_SOFTCAP)
    return tl.where(m_n[:, None] & m_v[None, :], b_dz, 0.0)


@triton.jit
def fold_tile(b_z, o_v, m_v, b_target, b_max, b_sum_exp, b_target_logit, b_centered_sum, b_logit_sum, b_sq_sum_exp,
              b_max_before, STATS: tl.constexpr):
    """Fold a [BLOCK_N, BLOCK_V] tile of transformed logits into each row's running partials (the online form
    of ``halo_ops.partials``): max, Σ exp(z − max), the target's logit, and the kinds the ``STATS`` mask names
    (``halo_ops.partials.kernel_stats_mask``): 2 the centered sum Σ exp(z − max)(z − max), 4 Σ z, 8
    Σ exp(2(z − max)), 16 the max over the columns before the target's. Returns the seven [BLOCK_N] blocks, those
    not named as they came."""
    b_z = tl.where(m_v[None, :], b_z, float("-inf"))
    b_target_logit += tl.sum(tl.where(o_v[None, :] == b_target[:, None], b_z, 0.0), axis=1)
    if STATS & 16:  # first, while few tiles are live (the fp32 forward spilled with it later)
        b_before = tl.where(o_v[None, :] < b_target[:, None], b_z, float("-inf"))
        b_max_before = tl.maximum(b_max_before, tl.max(b_before, axis=1))
    b_max_new = tl.maximum(b_max, tl.max(b_z, axis=1))
    b_alpha = tl.exp(b_max - b_max_new)
    b_e = tl.exp(b_z - b_max_new[:, None])
    if STATS & 2:
        b_centered = tl.where(m_v[None, :], b_z - b_max_new[:, None], 0.0)
        b_shift = b_sum_exp * tl.where(b_sum_exp > 0, b_max - b_max_new, 0.0)  # s = 0 while m = −inf
        b_centered_sum = (b_centered_sum + b_shift) * b_alpha + tl.sum(b_e * b_centered, axis=1)
    if STATS & 4:
        b_logit_sum += tl.sum(tl.where(m_v[None, :], b_z, 0.0), axis=1)
    if STATS & 8:
        b_sq_sum_exp = b_sq_sum_exp * b_alpha * b_alpha + tl.sum(b_e * b_e, axis=1)
    b_sum_exp = b_sum_exp * b_alpha + tl.sum(b_e, axis=1)
    return b_max_new, b_sum_exp, b_target_logit, b_centered_sum, b_logit_sum, b_sq_sum_exp, b_max_before


@triton.jit
def grouped_program(pid, blocks_n, blocks_other, GROUP_N: tl.constexpr):
    """(token block, other block) of program ``pid`` in the grouped order: GROUP_N token blocks take every
    other block before the next group starts (Triton's matmul tutorial), so the programs in flight share a
    few rows of H while the other operand streams."""
    per_group = GROUP_N * blocks_other
    first_n = (pid // per_group) * GROUP_N
    group_n = tl.minimum(blocks_n - first_n, GROUP_N)
    return first_n + (pid % per_group) % group_n, (pid % per_group) // group_n


@triton.jit
def empty_fold(BLOCK_N: tl.constexpr):
    """The running partials of ``fold_tile`` before any tile: the maxima −inf, every sum 0."""
    zeros = tl.zeros((BLOCK_N,), tl.float32)
    minus_inf = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    return minus_inf, zeros, zeros, zeros, zeros, zeros, minus_inf


@triton.jit
def store_partials(partials_ptr, stride_kind, o_out, m_n, b_max, b_sum_exp, b_target_logit, b_centered_sum,
                   b_logit_sum, b_sq_sum_exp, b_max_before, STATS: tl.constexpr):
    """Write the rows' partials at offsets ``o_out`` of each kind's row of ``partials_ptr`` (``halo_ops.partials``
    order, ``stride_kind`` apart): 3 kinds, or all 7 with any statistic (``STATS`` ≠ 0; a kind not folded keeps
    ``empty_fold``'s value)."""
    tl.store(partials_ptr + o_out, b_max, mask=m_n)
    tl.store(partials_ptr + stride_kind + o_out, b_sum_exp, mask=m_n)
    tl.store(partials_ptr + 2 * stride_kind + o_out, b_target_logit, mask=m_n)
    if STATS:
        tl.store(partials_ptr + 3 * stride_kind + o_out, b_centered_sum, mask=m_n)
        tl.store(partials_ptr + 4 * stride_kind + o_out, b_logit_sum, mask=m_n)
        tl.store(partials_ptr + 5 * stride_kind + o_out, b_sq_sum_exp, mask=m_n)
        tl.store(partials_ptr + 6 * stride_kind + o_out, b_max_before, mask=m_n)
