"""The eager schedule of the fused sequence losses: the gradients formed in the forward, three GEMMs, no recompute.

A loss whose coefficient dloss/dlogp_t for a sequence's tokens depends on that sequence alone (given
constants such as the batch size) can finish a chunk of whole sequences as soon as the chunk's logits
exist: its per-token log-probs give the sequences' coefficients, which give dL/dy = g · (onehot − p) ·
dz/dy, then dH and dW. Both paths have it: ``chunked.chunked_eager`` (PyTorch) and
``kernels.eager.eager_gradients`` (cuBLAS GEMMs and Triton folds over the chunk's slabs; the merge and the
loss stay here). A chunk's logits are bounded by ``eager_budget``; a sequence longer than that makes the
caller recompute instead.
"""

from __future__ import annotations

import torch

from .options import TokenOptions, accumulation_dtype
from .partials import TokenStats, merge_partials

# Bytes of one chunk's kept logits (on the Triton path with half-precision dL/dy beside them): 256 MiB on CPU
# (bench/NOTES.md items 20 and 23). On a GPU 1 GiB holds two
# sequences of 512 tokens at V = 128256 in bf16 (rows · V · 6 bytes), beside the fp32 dH and dW kept anyway.
EAGER_BYTES = 1 << 28
EAGER_BYTES_CUDA = 1 << 30


def eager_budget(device: torch.device) -> int:
    return EAGER_BYTES_CUDA if device.type == "cuda" else EAGER_BYTES


def eager_row_bytes(impl: str, vocab: int, dtype: torch.dtype) -> int:
    """Bytes per token of a chunk: its kept logits (PyTorch path), or the Triton path's slabs."""
    if impl == "torch":
        return vocab * accumulation_dtype(dtype).itemsize
    from .kernels.eager import eager_row_bytes as triton_row_bytes

    return triton_row_bytes(vocab, dtype)


def eager_sequences_per_chunk(seq: int, vocab: int, dtype: torch.dtype, impl: str, device: torch.device) -> int:
    """Whole sequences per chunk of the eager schedule within the budget; 0 when one sequence does not fit."""
    return eager_budget(device) // max(1, seq * eager_row_bytes(impl, vocab, dtype))


def eager_forward(hidden, weight, bias, targets, options: TokenOptions, seq: int, token_coefficients, needs,
                  group: int = 1):
    """The token op's forward and the gradients of a sequence-level loss in the same pass.

    ``token_coefficients(logps [b, T], first_sequence) -> [b, T]`` gives dloss/dlogp_t for a chunk of b whole
    sequences of T = ``seq`` tokens from their per-token log-probs; b is a multiple of ``group`` (2 for a
    paired loss whose pairs are adjacent). Returns (logps, lse, stats) as ``token_op.forward_tokens`` does,
    and the gradients (dH [N, D], dW [V, D], db [V]) of the loss in the accumulation dtype, None where
    ``needs`` says no.
    """
    per_chunk = eager_sequences_per_chunk(seq, weight.shape[0], hidden.dtype, options.impl, hidden.device)
    per_chunk = per_chunk // group * group
    if per_chunk < 1:
        raise ValueError(f"a sequence of {seq} tokens does not fit the eager chunk ({eager_budget(hidden.device)} "
                         "bytes)")
    with torch.autocast(hidden.device.type, enabled=False):
        if options.impl == "torch":
            from .chunked import chunked_eager

            return chunked_eager(hidden, weight, bias, targets, options, seq, per_chunk, token_coefficients, needs)
        return _triton_eager(hidden, weight, bias, targets, options, seq, per_chunk, token_coefficients, needs)


def _triton_eager(hidden, weight, bias, targets, options: TokenOptions, seq, per_chunk, token_coefficients, needs):
    from .kernels.eager import eager_gradients

    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    valid = targets != options.ignore_index
    f32 = {"dtype": torch.float32, "device": hidden.device}
    logps, lse = torch.empty(n_tokens, **f32), torch.empty(n_tokens, **f32)
    stats = None
    if options.return_stats:
        stats = TokenStats(*(torch.empty(n_tokens, **f32) for _ in range(3)),
                           torch.empty(n_tokens, dtype=torch.bool, device=hidden.device))

    def chunk_coefficients(r0, r1, partials):
        logps_c, lse_c, stats_c = merge_partials(partials, valid[r0:r1], vocab)
        logps[r0:r1], lse[r0:r1] = logps_c, lse_c
        if stats is not None:
            for field, value in zip(stats, stats_c):
                field[r0:r1] = value
        grad = token_coefficients(logps_c.view(-1, seq), r0 // seq).reshape(-1)
        return lse_c, torch.where(valid[r0:r1], grad, 0.0).float()

    grads = eager_gradients(hidden, weight, bias, targets, options, per_chunk * seq, chunk_coefficients, needs)
    return (logps, lse, stats), grads
