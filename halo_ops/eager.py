"""The eager schedule of the fused sequence losses: the gradients formed in the forward, three GEMMs, no recompute.

A loss whose coefficient dloss/dlogp_t for a sequence's tokens depends on that sequence alone (given
constants such as the batch size) can finish a chunk of whole sequences as soon as the chunk's logits
exist: its per-token log-probs give the sequences' coefficients, which give dL/dy = g · (onehot − p) ·
dz/dy, then dH and dW. Both paths have it: ``chunked.chunked_eager`` (PyTorch) and
``kernels.eager.eager_gradients`` (cuBLAS GEMMs and Triton folds over the chunk's slabs; the merge and the
loss stay here).

Memory. The schedule keeps the gradients from its forward to its backward: dW [V, D] (and db) in the
accumulation dtype, since every chunk adds to it, and dH [N, D] in the hidden's own dtype, since each chunk's
rows are complete after that chunk (a sum over the whole vocabulary), rounded once. Beside them a chunk's
logits (``eager_row_bytes`` per token). All of it stays within ``eager_memory_bound``: the gradients of both
head inputs in the accumulation dtype plus ``EAGER_WORKSPACE`` (at N=16384, D=4096, V=128256 in bf16, 2.46 GiB,
what TRL's head holds in its backward: fp32 dH and dW and a 256 MiB logits buffer). The chunk's logits get what
the kept gradients leave of it, at most ``eager_budget``; when that holds no whole sequence the caller
recomputes instead (bench/NOTES.md item 33 has the arithmetic). Casting dW to the weight's dtype at the end of
the forward would halve what is kept, but the cast holds both copies at once: a higher peak, so it is not done.
The PyTorch path's cache-sized tile temporaries (a few of ``chunked.TILE_ELEMENTS``) come on top.
"""

from __future__ import annotations

import torch

from .options import TokenOptions, accumulation_dtype
from .partials import add_linear_logit_sums, linear_logit_sums, merge_partials, zero_stats

# The most bytes one chunk's kept logits take (on the Triton path with half-precision dL/dy beside them): 256 MiB
# on CPU (bench/NOTES.md items 20 and 23), 1 GiB on a GPU; within that, eager_memory_bound decides (item 33).
EAGER_BYTES = 1 << 28
EAGER_BYTES_CUDA = 1 << 30
# Bytes the schedule may hold beyond the gradients of both head inputs (in the accumulation dtype)
EAGER_WORKSPACE = 1 << 28


def eager_budget(device: torch.device) -> int:
    return EAGER_BYTES_CUDA if device.type == "cuda" else EAGER_BYTES


def eager_row_bytes(impl: str, vocab: int, dtype: torch.dtype) -> int:
    """Bytes per token of a chunk: its kept logits (PyTorch path), or the Triton path's slabs."""
    if impl == "torch":
        return vocab * accumulation_dtype(dtype).itemsize
    from .kernels.eager import eager_row_bytes as triton_row_bytes

    return triton_row_bytes(vocab, dtype)


def eager_memory_bound(n_tokens: int, dim: int, vocab: int, dtype: torch.dtype) -> int:
    """The most the eager schedule holds beyond its inputs and outputs: (V + N) · D · the accumulation dtype's size
    plus ``EAGER_WORKSPACE``."""
    return (vocab + n_tokens) * dim * accumulation_dtype(dtype).itemsize + EAGER_WORKSPACE


def eager_kept_bytes(n_tokens: int, dim: int, vocab: int, dtype: torch.dtype, needs) -> int:
    """What the eager schedule keeps from its forward to its backward: dW [V, D] and db [V] in the accumulation dtype,
    dH [N, D] in the hidden's, each where ``needs`` (hidden, weight, bias) asks for it."""
    acc = accumulation_dtype(dtype).itemsize
    return (needs[0] * n_tokens * dim * dtype.itemsize + needs[1] * vocab * dim * acc
            + bool(needs[2]) * vocab * acc)


def eager_sequences_per_chunk(seq: int, hidden: torch.Tensor, weight: torch.Tensor, impl: str, needs) -> int:
    """Whole sequences per chunk of the eager schedule: as many as ``eager_budget`` holds and the memory bound leaves
    beside the kept gradients; 0 when one sequence does not fit (the caller recomputes). ``hidden`` [N, D]."""
    (n_tokens, dim), vocab, dtype = hidden.shape, weight.shape[0], hidden.dtype
    room = eager_memory_bound(n_tokens, dim, vocab, dtype) - eager_kept_bytes(n_tokens, dim, vocab, dtype, needs)
    slabs = min(eager_budget(hidden.device), room)
    return max(0, slabs) // max(1, seq * eager_row_bytes(impl, vocab, dtype))


def eager_forward(hidden, weight, bias, targets, options: TokenOptions, seq: int, token_coefficients, needs,
                  group: int = 1):
    """The token op's forward and the gradients of a sequence-level loss in the same pass.

    ``token_coefficients(logps [b, T], first_sequence) -> [b, T]`` gives dloss/dlogp_t for a chunk of b whole
    sequences of T = ``seq`` tokens from their per-token log-probs; b is a multiple of ``group`` (2 for a
    paired loss whose pairs are adjacent). Returns (logps, lse, stats) as ``token_op.forward_tokens`` does,
    and the gradients of the loss: dH [N, D] in the hidden's dtype, dW [V, D] and db [V] in the accumulation
    dtype, None where ``needs`` says no.
    """
    per_chunk = eager_sequences_per_chunk(seq, hidden, weight, options.impl, needs) // group * group
    if per_chunk < 1:
        raise ValueError(f"a sequence of {seq} tokens does not fit the eager chunk ({eager_budget(hidden.device)} "
                         "bytes, and the memory bound beside the kept gradients)")
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
    stats = zero_stats(options.stats, n_tokens, torch.float32, hidden.device) if options.stats else None
    logit_sums = linear_logit_sums(weight, bias, options, torch.float32)

    def chunk_coefficients(r0, r1, partials):
        add_linear_logit_sums(partials, hidden[r0:r1], logit_sums)
        logps_c, lse_c, stats_c = merge_partials(partials, valid[r0:r1], vocab, options.stats)
        logps[r0:r1], lse[r0:r1] = logps_c, lse_c
        if stats is not None:
            for field, value in zip(stats, stats_c):
                if field is not None:
                    field[r0:r1] = value
        grad = token_coefficients(logps_c.view(-1, seq), r0 // seq).reshape(-1)
        return lse_c, torch.where(valid[r0:r1], grad, 0.0).float()

    grads = eager_gradients(hidden, weight, bias, targets, options, per_chunk * seq, chunk_coefficients, needs)
    return (logps, lse, stats), grads
