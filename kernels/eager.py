"""The eager schedule on the Triton path: a sequence-level loss's gradients formed in its forward, three GEMMs.

When the loss's coefficient dloss/dlogp_t of a sequence's tokens depends on that sequence alone, a chunk
of whole sequences can finish its gradients as soon as its logits exist. Per chunk of ``rows`` tokens:

1. ``Y = H_c · Wᵀ`` over the whole vocabulary into an fp32 slab (GEMM 1);
2. ``fold_logits`` folds Y into the rows' partials in one launch (a piece per ``FOLD_COLUMNS`` columns, so
   that a chunk of few rows still fills the GPU), and the caller turns them into log-probs, the
   logsumexp and the coefficients g (``chunk_coefficients``: the merge and the loss live in
   ``halo_ops``);
3. ``dlogits_from_slab_kernel`` writes ``dL/dy = g · (onehot − exp(z − lse)) · dz/dy`` (in the inputs'
   dtype, over Y itself for fp32);
4. ``dH_c = dL/dy · W`` (GEMM 2, fp32, complete: the chunk's rows of dH, rounded once into the hidden's
   dtype) and ``dW += dL/dyᵀ · H_c`` (GEMM 3, into an fp32 accumulator); ``db += Σ dL/dy``.

No recompute: three GEMMs where the recompute schedules need four. Memory: the chunk's slabs,
``rows · V · (4 + 2)`` bytes for bf16/fp16 (``rows · V · 4`` for fp32) and an fp32 [rows, D] for half-precision
dH, and the dH [N, D] (the hidden's dtype) and fp32 dW [V, D] that the forward hands to the backward.
"""

from __future__ import annotations

import torch
import triton

from .config import config_for, launch_options
from .gemm_schedule import dlogits_from_slab_kernel, fold_logits, projection_fp32
from .slab_backward import add_product_fp32, window
from .transform import transform_args

FOLD_COLUMNS = 8192  # columns per piece of the fold: 16 pieces per row block at V = 128256


def eager_row_bytes(vocab: int, dtype: torch.dtype) -> int:
    """Slab bytes per token of a chunk: fp32 logits, and dL/dy beside them for half precision."""
    return vocab * (4 + (dtype.itemsize if dtype != torch.float32 else 0))


def eager_gradients(hidden, weight, bias, targets, options, rows: int, chunk_coefficients, needs, *, config=None):
    """(dH [N, D] in the hidden's dtype, fp32 dW [V, D], fp32 db [V]) of Σ_t g_t · logp_t, None where ``needs`` says
    no, formed chunk by chunk.

    ``rows``: tokens per chunk (whole sequences). ``chunk_coefficients(r0, r1, partials) -> (lse, g)``, both
    [r1 − r0] fp32, is called once per chunk with the chunk's partials [3 or 7, S, r1 − r0]
    (``halo_ops.partials``); ``g`` is 0 at ignored targets. ``options``: a ``halo_ops.options.TokenOptions``
    (transform, kernel_stats, grad_filter_eps).
    """
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    rows = max(1, min(rows, n_tokens))
    needs_h, needs_w, needs_b = needs[0], needs[1], needs[2] and bias is not None
    f32 = {"dtype": torch.float32, "device": hidden.device}
    half = hidden.dtype != torch.float32
    grad_h = torch.empty((n_tokens, dim), dtype=hidden.dtype, device=hidden.device) if needs_h else None  # all set
    chunk_grad_h = torch.empty((rows, dim), **f32) if needs_h and half else None
    grad_w = torch.zeros((vocab, dim), **f32) if needs_w else None
    grad_b = torch.zeros((vocab,), **f32) if needs_b else None
    logits = torch.empty((rows, vocab), **f32)
    dlogits = torch.empty((rows, vocab), dtype=hidden.dtype, device=hidden.device) if half else None
    cfg = config or config_for("fold", options, hidden, weight)
    eps = float(options.grad_filter_eps)
    for r0 in range(0, n_tokens, rows):
        r1 = min(r0 + rows, n_tokens)
        h_c, t_c = hidden[r0:r1], targets[r0:r1]
        y = projection_fp32(window(logits, r1 - r0, vocab), h_c, weight)  # GEMM 1
        partials = fold_logits(y, bias, t_c, options, cfg, split_v=FOLD_COLUMNS)
        lse, grad = chunk_coefficients(r0, r1, partials)
        dy = window(dlogits, r1 - r0, vocab) if half else y
        dlogits_from_slab_kernel[(triton.cdiv(r1 - r0, cfg.block_n), triton.cdiv(vocab, cfg.block_v))](
            y, bias, t_c, lse.contiguous(), grad.contiguous(), dy, r1 - r0, vocab, y.stride(0), dy.stride(0), 0,
            filter_eps=eps, HAS_FILTER=eps > 0, HAS_ENTROPY_GRAD=False, **transform_args(options.transform),
            **launch_options(cfg, with_block_d=False),
        )
        if needs_h and half:  # GEMM 2: fp32, then one rounding
            grad_h[r0:r1] = projection_fp32(window(chunk_grad_h, r1 - r0, dim), dy, weight.t())
        elif needs_h:
            torch.mm(dy, weight, out=grad_h[r0:r1])
        if needs_w:
            add_product_fp32(grad_w, dy.t(), h_c)  # GEMM 3
        if needs_b:
            grad_b += dy.sum(0, dtype=torch.float32)
    return grad_h, grad_w, grad_b
