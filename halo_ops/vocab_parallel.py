"""Vocabulary-parallel LM heads: each rank holds rows [start, stop) of the head, every rank gets every log-prob.

Under tensor parallelism the head is split over the vocabulary (torch's ``ColwiseParallel``, Megatron's
vocab-parallel heads): no rank holds a row's full logits. Every rank holds the full hidden states and
the global target ids. Then, with P partials per token (3, or 5 with statistics; ``halo_ops.partials``):

- forward: each rank folds its shard into per-token partials, combines them into one piece, and one
  ``all_gather`` of P · N values per rank brings every rank's piece; ``partials.merge_partials`` merges
  them as it merges vocabulary splits. Every rank returns the same log-probs, logsumexp and
  statistics. Sent per rank: P · N · 4 bytes (fp32; 8 for fp64).
- backward: each rank computes dW and db for its shard and its share of dH (the sum over its rows of
  the vocabulary) with the recompute schedule of its backend; one ``all_reduce`` of dH [N, D] (in the
  accumulation dtype) gives every rank the full dH. Sent per rank: N · D · 4 bytes (ring: about twice
  that on the wire).

No rank holds the full weight or [N, V] logits. The frozen head's Jacobian and the fused losses'
eager schedule are off here: both need the global softmax inside the sweep.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from .options import TokenOptions, accumulation_dtype
from .partials import STATISTICS, TokenStats, combine_pieces, merge_partials, zero_stats
from .token_op import backward_accumulators, token_partials


@dataclasses.dataclass(frozen=True)
class VocabParallel:
    """This rank holds rows ``[start, stop)`` of the LM head (and of its bias) in a vocabulary-parallel group.

    ``group``: the ``torch.distributed`` process group over which the vocabulary is split (None: the default
    group). ``vocab``: the full vocabulary size; when None it is summed over the group (one all-reduce and a
    host read) where it is needed: for the mean-logit statistic and for ``check_targets``.
    """

    start: int
    stop: int
    group: Optional[Any] = None
    vocab: Optional[int] = None

    def __post_init__(self):
        if not (isinstance(self.start, int) and isinstance(self.stop, int) and 0 <= self.start <= self.stop):
            raise ValueError(f"VocabParallel needs integers 0 <= start <= stop, got start={self.start!r}, "
                             f"stop={self.stop!r}")
        if self.vocab is not None and self.vocab < self.stop:
            raise ValueError(f"VocabParallel: vocab={self.vocab} is smaller than stop={self.stop}")


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return ()
    return DTensor


def is_dtensor(tensor) -> bool:
    return isinstance(tensor, _dtensor_type()) if tensor is not None else False


def from_dtensor_head(weight, bias):
    """(local weight, local bias, VocabParallel) for a head that is a DTensor sharded on dim 0 over a 1-D mesh (as
    ``ColwiseParallel`` leaves it; the shards follow ``torch.chunk``), or (local weight, local bias, None) for a
    replicated DTensor. The local tensors stay differentiable: their gradients flow back into the DTensors."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = weight.device_mesh, weight.placements
    if mesh.ndim != 1 or len(placements) != 1:
        raise ValueError(f"a DTensor LM head must live on a 1-D mesh (vocabulary-parallel); got a {mesh.ndim}-D mesh "
                         f"with placements {placements}: gather it (full_tensor()) or use VocabParallel")
    bias_local = None
    if bias is not None:
        if not is_dtensor(bias) or bias.placements != placements:
            raise ValueError(f"the LM head's bias must be a DTensor placed like its weight ({placements})")
        bias_local = bias.to_local()
    if isinstance(placements[0], Replicate):
        return weight.to_local(), bias_local, None
    if not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise ValueError(f"a DTensor LM head must be sharded over the vocabulary (Shard(0)) or replicated, "
                         f"got {placements}")
    vocab, world = weight.shape[0], mesh.size()
    rank = mesh.get_local_rank()
    per_rank = -(-vocab // world)  # torch.chunk's split: full chunks first, a shorter (or empty) one last
    start = min(rank * per_rank, vocab)
    local = weight.to_local()
    if local.shape[0] != min(per_rank, vocab - start):
        raise ValueError(f"rank {rank} holds {local.shape[0]} rows of a {vocab}-row DTensor head; expected torch.chunk "
                         f"shards of {per_rank}")
    return local, bias_local, VocabParallel(start, start + local.shape[0], group=mesh.get_group(), vocab=vocab)


def global_vocab(vocab_parallel: VocabParallel, device) -> int:
    """The full vocabulary size: ``vocab_parallel.vocab``, or the shards' sizes summed over the group."""
    if vocab_parallel.vocab is not None:
        return vocab_parallel.vocab
    total = torch.tensor([vocab_parallel.stop - vocab_parallel.start], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(total, group=vocab_parallel.group)
    return int(total.item())


def local_targets(targets, vocab_parallel: VocabParallel, ignore_index: int):
    """Targets in the shard's coordinates: ``target − start`` inside the shard and ``ignore_index`` where ignored.
    A target on another rank (scored, but its logit is not here) becomes an id that matches no column and is not
    ``ignore_index``: −1 (or −2) below the shard, 2⁶² above it, so that every column counts as before the target
    (the ``is_top1`` statistic's partial)."""
    below = -1 if ignore_index != -1 else -2
    shifted = torch.where(targets < vocab_parallel.start, below, targets - vocab_parallel.start)
    shifted = torch.where(targets >= vocab_parallel.stop, 1 << 62, shifted)
    return torch.where(targets == ignore_index, targets, shifted)


class _VocabParallelTokens(torch.autograd.Function):
    """(logps, *the statistics of ``options.stats``) [N] on every rank from this rank's shard; differentiable in logps
    and the entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, options: TokenOptions, vocab_parallel: VocabParallel, vocab):
        dist = torch.distributed
        local = local_targets(targets, vocab_parallel, options.ignore_index)
        acc = accumulation_dtype(hidden.dtype)
        if hidden.shape[0] == 0:  # every rank has the same N: no rank waits in a collective
            stats = tuple(stat for stat in zero_stats(options.stats, 0, acc, hidden.device) if stat is not None)
            logps, lse = hidden.new_zeros(0, dtype=acc), hidden.new_zeros(0, dtype=acc)
        else:
            partials, _ = token_partials(options, hidden, weight, bias, local)
            piece = combine_pieces(partials)[:, 0].contiguous()  # [P, N]
            pieces = [torch.empty_like(piece) for _ in range(dist.get_world_size(vocab_parallel.group))]
            dist.all_gather(pieces, piece, group=vocab_parallel.group)
            logps, lse, stats = merge_partials(torch.stack(pieces, 1), targets != options.ignore_index, vocab,
                                               options.stats)
            stats = tuple(stat for stat in stats if stat is not None) if stats is not None else ()
        ctx.options, ctx.vocab_parallel = options, vocab_parallel
        ctx.set_materialize_grads(False)  # an entropy used for logging only brings no gradient term
        entropy = stats[0] if "entropy" in options.stats else None
        ctx.save_for_backward(hidden, weight, bias, local, lse, entropy)
        for stat in stats[entropy is not None:]:  # the entropy is differentiable, the other statistics are not
            ctx.mark_non_differentiable(stat)
        return (logps, *stats) if stats else logps

    @staticmethod
    def backward(ctx, grad_logps, *stat_grads):
        hidden, weight, bias, local, lse, entropy = ctx.saved_tensors
        grad_entropy = stat_grads[0] if entropy is not None else None
        needs = ctx.needs_input_grad[:3]
        grads = backward_accumulators(ctx.options, hidden, weight, bias, local, lse, grad_logps, needs, grad_entropy,
                                      entropy)
        grad_h, grad_w, grad_b = grads
        if needs[0]:
            torch.distributed.all_reduce(grad_h, group=ctx.vocab_parallel.group)  # Σ over the vocabulary's shards
        cast = [None if g is None or not need else g.to(x.dtype)
                for g, x, need in zip((grad_h, grad_w, grad_b), (hidden, weight, bias), needs)]
        return (*cast, None, None, None, None)


def vocab_parallel_logprobs(hidden, weight, bias, targets, options: TokenOptions, vocab_parallel: VocabParallel,
                            vocab: int):
    """(logps [N], ``partials.TokenStats`` | None without statistics) of the full vocabulary from this rank's shard
    ``weight`` [stop − start, D] (and ``bias``), ``targets`` [N] global ids; logps and the entropy differentiable."""
    if options.save_jacobian:
        options = dataclasses.replace(options, save_jacobian=False)
    out = _VocabParallelTokens.apply(hidden, weight, bias, targets, options, vocab_parallel, vocab)
    if not options.stats:
        return out, None
    given = dict(zip(options.stats, out[1:]))
    return out[0], TokenStats(*(given.get(name) for name in STATISTICS))
