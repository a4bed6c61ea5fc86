"""A frozen head's forward on the Triton path: the log-probs and each token's Jacobian J_t = d logp_t / d h_t.

With the weight and bias frozen (LoRA), the backward needs only dH_t = g_t · J_t, where

    J_t = dz/dy(z_t,y_t) · W[y_t] − Σ_v p_tv · dz/dy(z_tv) · W_v

(``halo_ops.chunked.chunked_forward`` builds the same on the PyTorch path). A [BLOCK_N, D] accumulator
does not fit a Triton program at D = 4096, so the sweep runs on slabs, as the GEMM schedule does. Per
vocabulary slice of ``cols`` columns (and chunk of ``rows`` tokens when all do not fit the budget):

1. ``Y = H · W[slice]ᵀ`` into an fp32 slab (a GEMM; at most ``CHUNK_ROWS`` tokens per slab);
2. ``gemm_schedule.fold_logits`` folds Y into the slice's partials (``halo_ops.partials``), in enough
   column pieces to fill the GPU; each row's running max M rises to cover the slice, and
   ``exp_weights_kernel`` (one program per tile) overwrites the slab with ``E = exp(z − M) · dz/dy``
   (in the inputs' dtype, so the next GEMM runs on tensor cores); ``α = exp(M_old − M)``;
3. ``A = α · A + E · W[slice]`` into the fp32 accumulator A [N, D] (a GEMM): the flash-attention
   recurrence with W as both keys and values.

At the end ``J = dz/dy(target) · W[target] − A / Σ_v exp(z_v − M)``. Two GEMMs in all (the recompute
schedules need three), and the backward is elementwise. Extra memory: the slab (``SLAB_BYTES``; fp32
logits, plus the weights' half-precision copy for bf16/fp16) and A, which is the Jacobian that is kept.
"""

import torch
import triton
import triton.language as tl

from .config import config_for, launch_options
from .gemm_schedule import fold_layout, fold_logits, load_projection, projection_fp32
from .slab_backward import add_product_fp32, slab_shape, window
from .tiles import partial_kinds
from .transform import logit_transform, logit_transform_grad, transform_args


# Tokens per slab at most. Each vocabulary slice rescales and re-reads a chunk's fp32 accumulator (16 bytes per
# element: the rescale's and the GEMM's read and write), and each chunk reads W twice (bf16): the accumulator moves
# (N / rows)·(V / cols)·rows·D·16 bytes and W (N / rows)·V·D·4. At N = 16384, D = 4096, V = 128256 in bf16 with
# 128 MiB slabs, all 16384 rows (101 slices of 1280 columns) would move 108 GB of accumulator; 2048 rows (12 slices
# of 10752) move 13 GB of it and 17 GB of W (bench/NOTES.md item 22).
CHUNK_ROWS = 2048


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None})
@triton.jit
def exp_weights_kernel(
    y_ptr, bias_ptr, e_ptr, running_max_ptr, N, V, stride_y, stride_e, logit_scale, softcap, temperature,
    inv_temperature, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """E = exp(z − M) · dz/dy for one [BLOCK_N, BLOCK_V] tile of the slab, M being each row's running max (E may
    alias Y: each element is read before it is written, by the same program)."""
    o_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    m_n = o_n < N
    m_v = o_v < V
    b_max = tl.load(running_max_ptr + o_n, mask=m_n, other=0.0)
    b_y = load_projection(y_ptr, bias_ptr, o_n, m_n, o_v, m_v, stride_y, HAS_BIAS)
    b_z = logit_transform(b_y, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
    b_e = tl.exp(b_z - b_max[:, None]) * logit_transform_grad(b_z, logit_scale, softcap, temperature,
                                                             inv_temperature, HAS_SOFTCAP)
    tl.store(e_ptr + o_n[:, None].to(tl.int64) * stride_e + o_v[None, :], b_e.to(e_ptr.dtype.element_ty),
             mask=m_n[:, None] & m_v[None, :])


def jacobian_forward(hidden, weight, bias, targets, options, *, slab_bytes=None, config=None, splits=None):
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] → (partials [3 or 7, S, N] fp32, a piece per fold
    piece of each vocabulary slice, and the Jacobian J [N, D] fp32 of each token's log-prob with respect to its
    hidden state).

    ``options``: a ``halo_ops.options.TokenOptions`` (transform, ignore_index, kernel_stats). Rows with an ignored
    target get J = 0. ``slab_bytes``: the budget of the fp32 logits slab and the weights' copy together.
    ``splits``: fold pieces per slice (default: enough to fill the GPU, ``gemm_schedule.fold_layout``).
    """
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    half = hidden.dtype != torch.float32  # E goes to its own half-precision slab; fp32 E overwrites the logits
    rows, cols = slab_shape(min(n_tokens, CHUNK_ROWS), vocab, 4 + (hidden.dtype.itemsize if half else 0), slab_bytes)
    slices = [(v0, min(v0 + cols, vocab)) for v0 in range(0, vocab, cols)]
    cfg = config or config_for("fold", options, hidden, weight)
    split_columns, offsets = fold_layout(rows, slices, cfg, hidden.device, splits)
    f32 = {"dtype": torch.float32, "device": hidden.device}
    partials = torch.empty((partial_kinds(options.kernel_stats), offsets[-1], n_tokens), **f32)
    accumulator = torch.zeros((n_tokens, dim), **f32)
    running_max = torch.full((n_tokens,), float("-inf"), **f32)
    logits = torch.empty((rows, cols), **f32)
    weights = torch.empty((rows, cols), dtype=hidden.dtype, device=hidden.device) if half else None
    for k, (v0, v1) in enumerate(slices):
        slice_bias = None if bias is None else bias[v0:v1]
        for n0 in range(0, n_tokens, rows):
            n1 = min(n0 + rows, n_tokens)
            y = projection_fp32(window(logits, n1 - n0, v1 - v0), hidden[n0:n1], weight[v0:v1])
            piece = partials[:, offsets[k] : offsets[k + 1], n0:n1]
            fold_logits(y, slice_bias, targets[n0:n1] - v0, options, cfg, out=piece, split_v=split_columns[k])
            old_max = running_max[n0:n1].clone()
            torch.maximum(old_max, piece[0].amax(0), out=running_max[n0:n1])
            e = window(weights, n1 - n0, v1 - v0) if half else y
            exp_weights_kernel[(triton.cdiv(n1 - n0, cfg.block_n), triton.cdiv(v1 - v0, cfg.block_v))](
                y, slice_bias, e, running_max[n0:n1], n1 - n0, v1 - v0, y.stride(0), e.stride(0),
                **transform_args(options.transform), **launch_options(cfg, with_block_d=False),
            )
            accumulator[n0:n1].mul_(torch.exp(old_max - running_max[n0:n1]).unsqueeze(1))  # 0 on the first slice
            add_product_fp32(accumulator[n0:n1], e, weight[v0:v1])
    # Σ_v exp(z_v − M) from the slices' partials (max, Σ exp, target logit: halo_ops.partials' order), M being
    # every slice's max by now
    piece_max, piece_sum_exp, piece_target_logit = partials[0], partials[1], partials[2]
    sum_exp = (piece_sum_exp * torch.exp(piece_max - running_max)).sum(0)
    target_logit = piece_target_logit.sum(0)
    target_slope = options.transform.grad_from_logits_(torch.ones_like(target_logit), target_logit)
    valid = targets != options.ignore_index
    target_rows = weight[torch.where(valid, targets, 0)].float()
    jacobian = accumulator.div_(sum_exp.unsqueeze(1)).neg_().addcmul_(target_slope.unsqueeze(1), target_rows)
    return partials, jacobian.masked_fill_(~valid.unsqueeze(1), 0.0)
