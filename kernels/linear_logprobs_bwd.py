"""Backward kernel: dH, dW, db of Σ_t g_t · logp_t, recomputing each logits tile.

Grid: (token blocks, vocabulary blocks). Each program recomputes its [BLOCK_N, BLOCK_V] tile
of z from h, W and b, then

    dL/dz = g · (onehot(target) − exp(z − lse)),   dL/dy = dL/dz · dz/dy

and adds ``dL/dy · W`` into dH and ``dL/dyᵀ · H`` into dW (and ``Σ dL/dy`` into db), D chunk by
D chunk, with fp32 atomics: three GEMMs' worth of work in all. ``deterministic=True`` runs two
owner-computes kernels instead (``linear_logprobs_bwd_dh_kernel`` over token blocks,
``linear_logprobs_bwd_dw_kernel`` over vocabulary blocks): no atomics, a fixed summation order, one
more logits recompute. Token blocks whose coefficients
are all exactly zero (ignored tokens, forward-only rows) return at once. The saved lse is +inf
at ignored tokens, so their softmax reads as 0 and no NaN appears.
"""

import torch
import triton
import triton.language as tl

from .config import BlockConfig, config_for, dot_options, launch_options
from . import gemm_schedule
from . import slab_backward as slab
from .tiles import dlogits_tile, has_gradient
from .transform import transform_args


@triton.jit
def tile_has_gradient(b_dz, HAS_FILTER: tl.constexpr):
    """False when a filtered tile contributes nothing (every entry 0): its GEMMs are skipped. Without
    filtering a tile is all zero only if every p underflows, so the check would not pay for its
    tile-wide reduction and barrier; such a tile just adds zeros."""
    if HAS_FILTER:
        return tl.max(tl.max(tl.abs(b_dz), axis=1), axis=0) > 0.0
    else:
        return True


@triton.jit
def gemm_operand(b_dz, like_ptr, UPCAST_BF16: tl.constexpr):
    """dL/dy in the inputs' dtype, for the tensor cores (the GEMMs accumulate in fp32); fp32 for bf16
    under the interpreter."""
    b_dz_in = b_dz.to(like_ptr.dtype.element_ty)
    if UPCAST_BF16:
        b_dz_in = b_dz_in.to(tl.float32)
    return b_dz_in


@triton.jit
def add_product_tile(out_ptr, src_ptr, b_a, o_out, m_out, o_src, m_src, D, stride_src_row, stride_src_d,
                     TRANS_A: tl.constexpr, ATOMIC: tl.constexpr, UPCAST_BF16: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[o_out] += op(b_a) · src[o_src], D chunk by D chunk (fp32 out, contiguous [rows, D]): atomic, or owned.

    dH: b_a = dL/dy, src = W; dW: TRANS_A, src = H. (Transposing inside the loop, not before it, is what
    keeps the fp32 owner pass free of spills on sm_90.)"""
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        p_src = src_ptr + o_src[:, None].to(tl.int64) * stride_src_row + o_d[None, :] * stride_src_d
        b_src = tl.load(p_src, mask=m_src[:, None] & m_d[None, :], other=0.0)
        if UPCAST_BF16:
            b_src = b_src.to(tl.float32)
        if TRANS_A:
            b_out = tl.dot(tl.trans(b_a), b_src, input_precision=INPUT_PRECISION)
        else:
            b_out = tl.dot(b_a, b_src, input_precision=INPUT_PRECISION)
        p_out = out_ptr + o_out[:, None].to(tl.int64) * D + o_d[None, :]
        m = m_out[:, None] & m_d[None, :]
        if ATOMIC:
            tl.atomic_add(p_out, b_out, mask=m, sem="relaxed")
        else:
            tl.store(p_out, tl.load(p_out, mask=m, other=0.0) + b_out, mask=m)


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None})
@triton.jit
def linear_logprobs_bwd_kernel(
    h_ptr, w_ptr, bias_ptr, targets_ptr, lse_ptr, grad_ptr,
    dh_ptr, dw_ptr, db_ptr,
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_grad,
    logit_scale, softcap, temperature, inv_temperature, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_FILTER: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    UPCAST_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_g = tl.load(grad_ptr + o_n, mask=m_n, other=0.0)
    if has_gradient(b_g, grad_ptr, stride_grad, o_n, m_n, HAS_ENTROPY_GRAD):
        o_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_dz = dlogits_tile(
            h_ptr, w_ptr, bias_ptr, targets_ptr, lse_ptr, b_g, grad_ptr, stride_grad, o_n, m_n, o_v, m_v, D,
            stride_hn, stride_hd, stride_wv, stride_wd, logit_scale, softcap, temperature, inv_temperature,
            filter_eps, HAS_BIAS, HAS_SOFTCAP, HAS_FILTER, HAS_ENTROPY_GRAD, UPCAST_BF16, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        if tile_has_gradient(b_dz, HAS_FILTER):
            if COMPUTE_DB:
                tl.atomic_add(db_ptr + o_v, tl.sum(b_dz, axis=0), mask=m_v, sem="relaxed")
            b_dz_in = gemm_operand(b_dz, h_ptr, UPCAST_BF16)
            if COMPUTE_DH:
                add_product_tile(dh_ptr, w_ptr, b_dz_in, o_n, m_n, o_v, m_v, D, stride_wv, stride_wd, False, True,
                                 UPCAST_BF16, INPUT_PRECISION, BLOCK_D)
            if COMPUTE_DW:
                add_product_tile(dw_ptr, h_ptr, b_dz_in, o_v, m_v, o_n, m_n, D, stride_hn, stride_hd, True, True,
                                 UPCAST_BF16, INPUT_PRECISION, BLOCK_D)


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None})
@triton.jit
def linear_logprobs_bwd_dh_kernel(
    h_ptr, w_ptr, bias_ptr, targets_ptr, lse_ptr, grad_ptr, dh_ptr,
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_grad,
    logit_scale, softcap, temperature, inv_temperature, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_FILTER: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr, UPCAST_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Deterministic dH: one program per token block owns its dH rows and walks the vocabulary in order."""
    o_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_g = tl.load(grad_ptr + o_n, mask=m_n, other=0.0)
    if has_gradient(b_g, grad_ptr, stride_grad, o_n, m_n, HAS_ENTROPY_GRAD):
        for v0 in range(0, V, BLOCK_V):
            o_v = v0 + tl.arange(0, BLOCK_V)
            m_v = o_v < V
            b_dz = dlogits_tile(
                h_ptr, w_ptr, bias_ptr, targets_ptr, lse_ptr, b_g, grad_ptr, stride_grad, o_n, m_n, o_v, m_v, D,
                stride_hn, stride_hd, stride_wv, stride_wd, logit_scale, softcap, temperature, inv_temperature,
                filter_eps, HAS_BIAS, HAS_SOFTCAP, HAS_FILTER, HAS_ENTROPY_GRAD, UPCAST_BF16, INPUT_PRECISION, BLOCK_N, BLOCK_V,
                BLOCK_D,
            )
            if tile_has_gradient(b_dz, HAS_FILTER):
                add_product_tile(dh_ptr, w_ptr, gemm_operand(b_dz, h_ptr, UPCAST_BF16), o_n, m_n, o_v, m_v, D,
                                 stride_wv, stride_wd, False, False, UPCAST_BF16, INPUT_PRECISION, BLOCK_D)


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None})
@triton.jit
def linear_logprobs_bwd_dw_kernel(
    h_ptr, w_ptr, bias_ptr, targets_ptr, lse_ptr, grad_ptr, dw_ptr, db_ptr,
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_grad,
    logit_scale, softcap, temperature, inv_temperature, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_FILTER: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    UPCAST_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Deterministic dW and db: one program per vocabulary block owns its rows and walks the tokens in order."""
    o_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    m_v = o_v < V
    b_db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        b_g = tl.load(grad_ptr + o_n, mask=m_n, other=0.0)
        if has_gradient(b_g, grad_ptr, stride_grad, o_n, m_n, HAS_ENTROPY_GRAD):
            b_dz = dlogits_tile(
                h_ptr, w_ptr, bias_ptr, targets_ptr, lse_ptr, b_g, grad_ptr, stride_grad, o_n, m_n, o_v, m_v, D,
                stride_hn, stride_hd, stride_wv, stride_wd, logit_scale, softcap, temperature, inv_temperature,
                filter_eps, HAS_BIAS, HAS_SOFTCAP, HAS_FILTER, HAS_ENTROPY_GRAD, UPCAST_BF16, INPUT_PRECISION, BLOCK_N, BLOCK_V,
                BLOCK_D,
            )
            b_db += tl.sum(b_dz, axis=0)
            if COMPUTE_DW:
                if tile_has_gradient(b_dz, HAS_FILTER):
                    add_product_tile(dw_ptr, h_ptr, gemm_operand(b_dz, h_ptr, UPCAST_BF16), o_v, m_v, o_n, m_n, D,
                                     stride_hn, stride_hd, True, False, UPCAST_BF16, INPUT_PRECISION, BLOCK_D)
    if COMPUTE_DB:
        tl.store(db_ptr + o_v, b_db, mask=m_v)


def linear_logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logps: torch.Tensor,
    options,
    needs: tuple[bool, bool, bool],
    *,
    slice_rows: int | None = None,
    config: BlockConfig | None = None,
):
    """fp32 accumulators of the gradients of Σ_t grad_logps[t] · logps[t] for (hidden, weight, bias).

    ``options``: a ``halo_ops.options.TokenOptions`` (transform, schedule, grad_filter_eps are read).
    ``grad_logps`` [N] fp32 is 0 at ignored targets. None where ``needs`` says no (db also without a bias).
    ``slice_rows`` < V: dW is computed that many vocabulary rows at a time, each slice accumulated in
    fp32 and copied into a dW in the weight's dtype, so the extra memory is fp32 dH [N, D] plus one
    slice; the token op picks it (``halo_ops.token_op.weight_slice_rows``). Default: one slice.
    ``options.schedule``: ``"atomic"``, one tile-parallel pass with fp32 atomics (three GEMMs' work, sums in
    a run-dependent order); ``"owner"``, two owner-computes passes, one for dH and one for dW and db, that
    write each row in a fixed order (four GEMMs' work: the logits are recomputed once more); ``"slab"``,
    ``slab_backward`` (a dL/dy slab per vocabulary slice, then torch GEMMs).
    ``options.grad_filter_eps`` > 0 takes softmax probabilities below it as 0 in dL/dz = g · (onehot − p);
    tiles left all zero (no target, every p below it) skip their GEMMs. ``config``: block sizes, warps
    and stages for every kernel launched (default: each kernel's tuned or default config).
    """
    if options.schedule == "slab":
        return slab.slab_backward(hidden, weight, bias, targets, lse, grad_logps, options, needs, config=config)
    if options.schedule == "gemm":
        return gemm_schedule.gemm_backward(hidden, weight, bias, targets, lse, grad_logps, options, needs,
                                           config=config)
    if options.schedule not in ("atomic", "owner"):
        raise ValueError(f"the Triton backward runs schedule 'atomic', 'owner', 'slab' or 'gemm', got "
                         f"{options.schedule!r}")
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    needs_h, needs_w, needs_b = needs
    needs_b = needs_b and bias is not None
    deterministic, eps = options.schedule == "owner", float(options.grad_filter_eps)
    f32 = {"dtype": torch.float32, "device": hidden.device}
    rows = min(slice_rows or vocab, vocab) if needs_w else vocab
    sliced = rows < vocab
    grad_h = torch.zeros((n_tokens, dim), **f32) if needs_h else None
    grad_b = torch.zeros((vocab,), **f32) if needs_b else None
    grad_w = None
    if needs_w:
        if not sliced:
            grad_w = torch.zeros((vocab, dim), **f32)
        else:  # every slice is written below, or zeros when there is nothing to add
            grad_w = (torch.empty if n_tokens else torch.zeros)((vocab, dim), dtype=weight.dtype, device=weight.device)
    if n_tokens > 0 and (needs_h or needs_w or needs_b):
        def launch(kernel, name, grid_axes, v0, v1, *outputs, **flags):
            """``kernel`` over vocabulary rows [v0, v1): W, b and the targets are taken relative to v0."""
            cfg = config or config_for(name, options, hidden, weight)
            blocks = {"tokens": triton.cdiv(n_tokens, cfg.block_n), "vocab": triton.cdiv(v1 - v0, cfg.block_v)}
            kernel[tuple(blocks[axis] for axis in grid_axes)](
                hidden, weight[v0:v1], None if bias is None else bias[v0:v1], targets - v0 if v0 else targets,
                lse, grad_logps, *outputs,
                n_tokens, v1 - v0, dim, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                grad_logps.stride(0) if grad_logps.dim() == 2 else 0,
                filter_eps=eps, HAS_FILTER=eps > 0, HAS_ENTROPY_GRAD=grad_logps.dim() == 2,
                **transform_args(options.transform),
                **dot_options(hidden.dtype), **launch_options(cfg), **flags,
            )

        if deterministic and needs_h:  # owns whole token rows: walks the full vocabulary in one launch
            launch(linear_logprobs_bwd_dh_kernel, "backward_dh", ("tokens",), 0, vocab, grad_h)
        # the vocabulary slices: dW and db (and dH, in the tile-parallel pass)
        slices = range(0, vocab, rows) if needs_w or needs_b or not deterministic else ()
        for v0 in slices:
            v1 = min(v0 + rows, vocab)
            dw = (torch.zeros((v1 - v0, dim), **f32) if sliced else grad_w[v0:v1]) if needs_w else None
            db = grad_b[v0:v1] if needs_b else None
            if deterministic:
                launch(linear_logprobs_bwd_dw_kernel, "backward_dw", ("vocab",), v0, v1, dw, db,
                       COMPUTE_DW=needs_w, COMPUTE_DB=needs_b)
            else:
                launch(linear_logprobs_bwd_kernel, "backward", ("tokens", "vocab"), v0, v1, grad_h, dw, db,
                       COMPUTE_DH=needs_h, COMPUTE_DW=needs_w, COMPUTE_DB=needs_b)
            if sliced:
                grad_w[v0:v1].copy_(dw)
    return grad_h, grad_w, grad_b
