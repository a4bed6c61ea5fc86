"""``linear_logprobs``: per-token log-probs of a linear LM head without building the logits."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .inputs import measured_schedule, prepare_linear_inputs, with_frozen_head_jacobian
from .reduction import check_reduction, reduce_last_dim
from .token_op import token_logprobs
from .vocab_parallel import VocabParallel, vocab_parallel_logprobs


class LinearLogProbs(NamedTuple):
    """``linear_logprobs(..., return_stats=...)``: log-probs plus per-token statistics, None where not asked for.

    The entropy is differentiable (its gradient joins the log-probs' in the same backward); the other
    statistics carry no gradient.
    """

    logps: torch.Tensor  # like targets ("none") or one value per row ("sum"/"mean"), float32
    entropy: torch.Tensor | None  # like targets: entropy of softmax(z), 0 at ignored positions
    mean_logit: torch.Tensor | None  # like targets: mean over the vocabulary of z, 0 at ignored positions
    log_sum_sq_probs: torch.Tensor | None  # like targets: log Σ_v p_v², 0 at ignored positions
    is_top1: torch.Tensor | None  # like targets, bool: the target is z's first argmax, False at ignored positions


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    reduction: str = "none",
    impl: str = "auto",
    return_stats: bool | tuple[str, ...] = False,
    check_targets: bool = True,
    check_finite: bool = False,
    deterministic: bool = False,
    grad_filter_eps: float = 0.0,
    schedule: str = "auto",
    recompute: bool | None = None,
    vocab_parallel: VocabParallel | None = None,
) -> torch.Tensor | LinearLogProbs:
    """Log-probabilities of ``targets`` under a linear LM head, never building the ``[N, V]`` logits.

    With ``y = hidden · weightᵀ + bias`` and
    ``z = softcap · tanh(logit_scale · y / softcap) / temperature`` (softcap optional),

        logp[..., t] = z[..., t, targets[..., t]] − logsumexp_v z[..., t, v]

    and 0 where ``targets == ignore_index``.

    Args:
        hidden: ``[..., D]`` last hidden states; ``hidden[..., t]`` predicts ``targets[..., t]``
            (already shifted).
        weight: ``[V, D]`` LM-head weight (may be tied to the input embedding).
        targets: ``[...]`` integer token ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``.
        reduction: ``"none"`` → ``[...]`` per token; ``"sum"`` / ``"mean"`` reduce the last
            dimension (mean over the row's non-ignored tokens, 0 for a row with none).
        impl: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (chunked
            PyTorch, any device), or ``"auto"`` (Triton where it runs, else PyTorch).
        return_stats: also return per-token statistics of ``softmax(z)`` from the same pass, as a
            :class:`LinearLogProbs`: the entropy (differentiable: ∂H/∂z = −p (log p + H) joins the
            backward), the mean logit, log Σ p², and whether the target is the first argmax (TRL's
            ``is_top1``); the last three carry no gradient. ``True`` computes all four; names among
            ``"entropy"``, ``"mean_logit"``, ``"log_sum_sq_probs"``, ``"is_top1"`` compute those alone
            (the others come back None and cost nothing: each needs its own pass over the logits, except
            the mean logit, which without softcap is ``(h · Σ_v W_v + Σ_v b_v) · scale / V``, O(D) per token).
        check_targets: raise on targets outside ``[0, V)`` (reads them on the host: one sync).
        check_finite: raise on NaN/inf in hidden, weight or bias (one extra pass and a sync).
        deterministic: a Triton backward without atomics, bitwise reproducible from run to run
            (``schedule`` ``"slab"``, ``"gemm"`` or ``"owner"``; ``"atomic"`` is then an error; the PyTorch
            path is always deterministic).
        grad_filter_eps: if > 0, the backward takes softmax probabilities below it as 0 in
            dL/dz = g · (onehot − p) (gradient filtering, as in cut-cross-entropy) and skips the
            GEMMs of tiles left all zero: faster on peaked logits, approximate (each dropped entry
            changes dL/dz by less than eps · |g_t|). Same function on every path. 0 (off) by default.
        schedule: how the Triton path runs, every schedule computing the same function. After the fused
            forward kernel, the backward is ``"slab"`` (a bounded dL/dy slab per vocabulary slice, then
            tensor-core GEMMs through torch; no atomics), ``"atomic"`` (one fused tile-parallel pass, fp32
            atomics) or ``"owner"`` (owner-computes passes, one more recompute); ``"gemm"`` runs both
            directions with every product a torch GEMM and Triton folds over bounded slabs. ``"auto"``:
            the measured winner for this GPU and shape where the tuned table has one, else the best written
            prediction (bench/NOTES.md item 26): ``"atomic"`` with gradient filtering and ``"gemm"`` otherwise. The PyTorch path has one schedule and takes
            only ``"auto"``.
        recompute: ``True`` makes the backward recompute the logits always. ``None`` (default): with a
            frozen head (weight and bias without gradient, hidden with) and no gradient filtering, the
            forward builds each token's Jacobian d logp_t / d h_t in its sweep (one more GEMM per tile; on
            the Triton path over cuBLAS slabs, ``kernels/jacobian.py``, whatever ``schedule`` says) and the
            backward only scales it: two GEMMs in all instead of three, and an fp32 [N, D] kept
            (bench/NOTES.md).
        vocab_parallel: a :class:`halo_ops.VocabParallel`: ``weight`` (and ``bias``) are this rank's rows
            ``[start, stop)`` of a head split over the vocabulary across a process group; ``hidden`` and
            ``targets`` (global ids) are the full ones on every rank. Every rank returns every log-prob; dW
            and db are the shard's, dH is summed over the group (``halo_ops/vocab_parallel.py`` gives the
            communication). A weight that is a DTensor sharded on dim 0 over a 1-D mesh (``ColwiseParallel``)
            is taken as such with no argument. The recompute schedule runs (no Jacobian).

    Returns float32 log-probs (float64 for float64 inputs), differentiable with respect to hidden,
    weight and bias; gradients come back in the inputs' dtypes. Under ``torch.autocast`` the
    projection runs in the autocast dtype.
    """
    check_reduction(reduction)
    hidden2d, weight, bias, flat_targets, options, sharding = prepare_linear_inputs(
        hidden, weight, targets, bias, ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
        temperature=temperature, impl=impl, return_stats=return_stats, check_targets=check_targets,
        check_finite=check_finite, deterministic=deterministic, grad_filter_eps=grad_filter_eps,
        schedule=schedule, vocab_parallel=vocab_parallel)
    if sharding is None:
        options = with_frozen_head_jacobian(options, hidden2d, weight, bias, recompute)
    options = measured_schedule(options, hidden2d, weight, bias, flat_targets, schedule=schedule,
                                deterministic=deterministic)
    if sharding is not None:
        logps, stats = vocab_parallel_logprobs(hidden2d, weight, bias, flat_targets, options, *sharding)
    else:
        logps, stats = token_logprobs(hidden2d, weight, bias, flat_targets, options)
    valid = targets != ignore_index
    logps = reduce_last_dim(logps.view(targets.shape), valid, reduction)
    if stats is None:
        return logps
    return LinearLogProbs(logps, *(None if stat is None else stat.view(targets.shape) for stat in stats))
