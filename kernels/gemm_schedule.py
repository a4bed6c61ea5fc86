"""GEMM schedule: every product a torch GEMM (cuBLAS on a GPU), Triton only for the folds, slab by slab.

Forward, for each vocabulary slice of ``cols`` columns (and each chunk of ``rows`` tokens when all of
them do not fit the byte budget): ``Y = H · W[slice]ᵀ`` into an fp32 slab, then ``logits_fold_kernel``
folds it, with the bias and the logit transform, into per-row partials of that slice
(``halo_ops.partials``; the token op merges the slices).

Backward, per slice: the same GEMM again, then ``dlogits_from_slab_kernel`` writes
``dL/dy = g · (onehot − exp(z − lse)) · dz/dy`` into a slab in the inputs' dtype, then
``dW[slice] = dL/dyᵀ · H`` (straight into dW's dtype), ``dH += dL/dy · W[slice]`` (fp32) and
``db[slice] = Σ dL/dy``. Three GEMMs in the backward and one in the forward, all at the GEMM library's
rate; the folds read and write the slabs, O(N · V) bytes of traffic that the fused kernels avoid.
Where the GEMM can write fp32 from half-precision operands (``out_dtype``, CUDA, torch 2.8+) the
logits slab is fp32, as the fused kernels' logits are; elsewhere on CUDA it is in the inputs' dtype
(as in TRL's head). Deterministic: no atomics.
"""

import torch
import triton
import triton.language as tl

from .config import BlockConfig, config_for, launch_options, vocab_splits
from .slab_backward import backward_by_slabs, fp32_output_gemm, slab_shape, window
from .tiles import dlogits_from_projection, empty_fold, fold_tile, partial_kinds, store_partials
from .transform import logit_transform, transform_args


@triton.jit
def load_projection(y_ptr, bias_ptr, o_n, m_n, o_v, m_v, stride_y, HAS_BIAS: tl.constexpr):
    """A [BLOCK_N, BLOCK_V] tile of a projection slab in fp32, the bias added (0 outside the slab)."""
    b_y = tl.load(y_ptr + o_n[:, None].to(tl.int64) * stride_y + o_v[None, :], mask=m_n[:, None] & m_v[None, :],
                  other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_y += tl.load(bias_ptr + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    return b_y


@triton.jit
def fold_slab_columns(y_ptr, bias_ptr, b_target, o_n, m_n, v_lo, v_hi, stride_y, logit_scale, softcap,
                      inv_temperature, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      STATS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """The seven running partials of ``fold_tile`` for BLOCK_N rows of a projection slab over its columns
    [v_lo, v_hi), tile by tile (bias and logit transform applied)."""
    b_max, b_sum_exp, b_target_logit, b_centered_sum, b_logit_sum, b_sq_sum_exp, b_max_before = empty_fold(BLOCK_N)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < v_hi
        b_y = load_projection(y_ptr, bias_ptr, o_n, m_n, o_v, m_v, stride_y, HAS_BIAS)
        b_z = logit_transform(b_y, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
        b_max, b_sum_exp, b_target_logit, b_centered_sum, b_logit_sum, b_sq_sum_exp, b_max_before = fold_tile(
            b_z, o_v, m_v, b_target, b_max, b_sum_exp, b_target_logit, b_centered_sum, b_logit_sum, b_sq_sum_exp,
            b_max_before, STATS)
    return b_max, b_sum_exp, b_target_logit, b_centered_sum, b_logit_sum, b_sq_sum_exp, b_max_before


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None})
@triton.jit
def logits_fold_kernel(
    y_ptr, bias_ptr, targets_ptr, partials_ptr, stride_kind, stride_piece,
    N, V, stride_y, split_v, logit_scale, softcap, temperature, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, STATS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Program (i, s) folds BLOCK_N rows of the slab over its columns [s · split_v, (s + 1) · split_v) into the
    rows' partials of piece s (at ``s · stride_piece`` in each partial's array; ``split_v`` a multiple of BLOCK_V). The
    targets are relative to the slab's first column; an ignored row's target logit is masked when the pieces
    merge."""
    o_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    pid_s = tl.program_id(1)
    m_n = o_n < N
    b_target = tl.load(targets_ptr + o_n, mask=m_n, other=-1)
    b_max, b_sum_exp, b_target_logit, b_centered_sum, b_logit_sum, b_sq_sum_exp, b_max_before = fold_slab_columns(
        y_ptr, bias_ptr, b_target, o_n, m_n, pid_s * split_v, tl.minimum((pid_s + 1) * split_v, V), stride_y,
        logit_scale, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP, STATS, BLOCK_N, BLOCK_V)
    store_partials(partials_ptr, stride_kind, pid_s.to(tl.int64) * stride_piece + o_n, m_n, b_max, b_sum_exp, b_target_logit,
                   b_centered_sum, b_logit_sum, b_sq_sum_exp, b_max_before, STATS)


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None})
@triton.jit
def dlogits_from_slab_kernel(
    y_ptr, bias_ptr, targets_ptr, lse_ptr, grad_ptr, dy_ptr,
    N, V, stride_y, stride_dy, stride_grad, logit_scale, softcap, temperature, inv_temperature, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_FILTER: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """dL/dy for one [BLOCK_N, BLOCK_V] tile of the projection slab, into the dL/dy slab."""
    o_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    m_n = o_n < N
    m_v = o_v < V
    m = m_n[:, None] & m_v[None, :]
    b_g = tl.load(grad_ptr + o_n, mask=m_n, other=0.0)
    b_y = load_projection(y_ptr, bias_ptr, o_n, m_n, o_v, m_v, stride_y, HAS_BIAS)
    b_dz = dlogits_from_projection(b_y, targets_ptr, lse_ptr, b_g, grad_ptr, stride_grad, o_n, m_n, o_v, m_v,
                                   logit_scale, softcap, temperature, inv_temperature, filter_eps, HAS_SOFTCAP,
                                   HAS_FILTER, HAS_ENTROPY_GRAD)
    p_dy = dy_ptr + o_n[:, None].to(tl.int64) * stride_dy + o_v[None, :]
    tl.store(p_dy, b_dz.to(dy_ptr.dtype.element_ty), mask=m)


def projection_fp32(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden · weightᵀ`` into ``out`` (a contiguous fp32 slab window). On CUDA where torch cannot write fp32
    from half-precision operands (:func:`fp32_output_gemm`, torch < 2.8), a product in the inputs' dtype is
    returned instead, as TRL's head computes its logits. Off CUDA: upcast, exact."""
    if hidden.dtype == torch.float32:
        return torch.mm(hidden, weight.t(), out=out)
    if hidden.device.type != "cuda":
        return torch.mm(hidden.float(), weight.float().t(), out=out)
    if fp32_output_gemm(hidden.device):
        return torch.mm(hidden, weight.t(), out_dtype=torch.float32, out=out)
    return hidden @ weight.t()


def _slices(n_tokens: int, vocab: int, slab_bytes: int | None):
    """(rows, cols) of the fp32 projection slab, and the vocabulary slices and token chunks it walks."""
    rows, cols = slab_shape(n_tokens, vocab, 4, slab_bytes)
    return rows, cols, [(v0, min(v0 + cols, vocab)) for v0 in range(0, vocab, cols)], \
        [(n0, min(n0 + rows, n_tokens)) for n0 in range(0, n_tokens, rows)]


def fold_split_columns(rows: int, cols: int, config: BlockConfig, device: torch.device, splits: int | None = None) -> int:
    """Columns per fold piece of a ``rows`` × ``cols`` slab (a multiple of BLOCK_V): enough pieces that the fold's
    programs fill the GPU twice over (``config.vocab_splits`` with every row block in flight), or ``splits``."""
    splits = splits or vocab_splits(rows, cols, config, device, group=rows)
    return max(config.block_v, cols // splits // config.block_v * config.block_v)


def fold_layout(rows: int, slices, config: BlockConfig, device: torch.device, splits: int | None = None):
    """Per vocabulary slice, its fold's columns per piece (``fold_split_columns`` at the slice's width), and where
    its first piece lies among all the pieces (``offsets``, one entry more: their number)."""
    split_columns = [fold_split_columns(rows, v1 - v0, config, device, splits) for v0, v1 in slices]
    offsets = [0]
    for (v0, v1), split_v in zip(slices, split_columns):
        offsets.append(offsets[-1] + triton.cdiv(v1 - v0, split_v))
    return split_columns, offsets


def gemm_forward(hidden, weight, bias, targets, options, *, slab_bytes=None, config=None, splits=None) -> torch.Tensor:
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] → partials [3 or 7, S, N] fp32, a piece per fold
    piece of each vocabulary slice (``options``: a ``halo_ops.options.TokenOptions``; transform, ignore_index,
    kernel_stats). ``splits``: fold pieces per slice (default: enough to fill the GPU, ``fold_split_columns``)."""
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    rows, cols, slices, chunks = _slices(n_tokens, vocab, slab_bytes)
    cfg = config or config_for("fold", options, hidden, weight)
    split_columns, offsets = fold_layout(rows, slices, cfg, hidden.device, splits)
    partials = torch.empty((partial_kinds(options.kernel_stats), offsets[-1], n_tokens), dtype=torch.float32,
                           device=hidden.device)
    slab = torch.empty((rows, cols), dtype=torch.float32, device=hidden.device)
    for k, (v0, v1) in enumerate(slices):
        for n0, n1 in chunks:
            y = projection_fp32(window(slab, n1 - n0, v1 - v0), hidden[n0:n1], weight[v0:v1])
            fold_logits(y, None if bias is None else bias[v0:v1], targets[n0:n1] - v0, options, cfg,
                        out=partials[:, offsets[k] : offsets[k + 1], n0:n1], split_v=split_columns[k])
    return partials


def fold_logits(y, bias, targets, options, config, *, out=None, split_v=None) -> torch.Tensor:
    """The partials [3 or 7, S, n] fp32 of the raw projection slab ``y`` [n, V] (a contiguous-row view),
    ``bias`` [V] | None, ``targets`` [n] relative to y's first column: one piece per ``split_v`` columns
    (default all V), in one launch. ``out``: where to write them (a [:, S, n] view with unit stride in n)."""
    n, vocab = y.shape
    split_v = triton.cdiv(split_v or vocab, config.block_v) * config.block_v
    pieces = triton.cdiv(vocab, split_v)
    if out is None:
        out = torch.empty((partial_kinds(options.kernel_stats), pieces, n), dtype=torch.float32, device=y.device)
    assert out.shape[1] == pieces and out.stride(2) == 1
    logits_fold_kernel[(triton.cdiv(n, config.block_n), pieces)](
        y, bias, targets, out, out.stride(0), out.stride(1), n, vocab, y.stride(0), split_v,
        STATS=options.kernel_stats, **transform_args(options.transform),
        **launch_options(config, with_block_d=False),
    )
    return out


def gemm_backward(hidden, weight, bias, targets, lse, grad_logps, options, needs, *, slab_bytes=None, config=None):
    """Gradients of Σ_t grad_logps[t] · logps[t] by the GEMM schedule: per slice, the projection GEMM into the
    fp32 slab and ``dlogits_from_slab_kernel`` write dL/dy, then ``backward_by_slabs``'s GEMMs. Returns fp32
    dH, dW in the weight's dtype, fp32 db; None where ``needs`` says no."""
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    rows, cols, _, _ = _slices(n_tokens, vocab, slab_bytes)
    logits = torch.empty((rows, cols), dtype=torch.float32, device=hidden.device)
    cfg = config or config_for("fold", options, hidden, weight)
    eps = float(options.grad_filter_eps)

    def write_dy(n0, n1, v0, v1, dy):
        y = projection_fp32(window(logits, n1 - n0, v1 - v0), hidden[n0:n1], weight[v0:v1])
        dlogits_from_slab_kernel[(triton.cdiv(n1 - n0, cfg.block_n), triton.cdiv(v1 - v0, cfg.block_v))](
            y, None if bias is None else bias[v0:v1], targets[n0:n1] - v0, lse[n0:n1], grad_logps[..., n0:n1], dy,
            n1 - n0, v1 - v0, y.stride(0), dy.stride(0), grad_logps.stride(0) if grad_logps.dim() == 2 else 0,
            filter_eps=eps, HAS_FILTER=eps > 0, HAS_ENTROPY_GRAD=grad_logps.dim() == 2,
            **transform_args(options.transform), **launch_options(cfg, with_block_d=False),
        )

    return backward_by_slabs(hidden, weight, bias, needs, rows, cols, write_dy)
