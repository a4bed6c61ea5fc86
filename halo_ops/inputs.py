"""From a public call's arguments to the token op's inputs: autocast, validation, backend choice, options."""

from __future__ import annotations

import dataclasses
import importlib.util

import torch

from .options import TokenOptions
from .partials import requested_statistics
from .transform import LogitTransform
from .validation import check_linear_inputs

IMPLS = ("auto", "triton", "torch")
SCHEDULES = ("auto", "atomic", "owner", "slab", "gemm")
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    from .kernels import interpreting

    return interpreting()


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend a call with ``impl`` runs on tensors of this device and dtype: ``"triton"`` or ``"torch"``.

    ``auto`` picks Triton on CUDA (and on CPU under TRITON_INTERPRET=1) and the chunked PyTorch path
    elsewhere and for float64, which the kernels do not take; both compute the same function. An explicit
    ``"triton"`` that cannot run is an error, never a silent fallback.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    triton_device = _TRITON_INSTALLED and (device.type == "cuda" or (device.type == "cpu" and _interpreting()))
    if impl == "auto":
        return "triton" if triton_device and dtype != torch.float64 else "torch"
    if not _TRITON_INSTALLED:
        raise RuntimeError("impl='triton' needs the triton package; install it or use impl='torch'")
    if not triton_device:
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; got device {device}"
        )
    if dtype == torch.float64:
        raise TypeError("impl='triton' takes float32, bfloat16 or float16; use impl='torch' for float64")
    return "triton"


def resolve_schedule(schedule: str, *, impl: str, deterministic: bool, grad_filter_eps: float,
                     device: torch.device, dtype: torch.dtype, dim: int, vocab: int) -> str:
    """The schedule a call runs: ``"chunked"`` on the PyTorch path. On the Triton path, after the fused forward
    kernel, a backward of ``"atomic"`` (one tile-parallel pass, fp32 atomics), ``"owner"`` (owner-computes
    passes, deterministic, one more recompute) or ``"slab"`` (a bounded dL/dy slab per vocabulary slice,
    then tensor-core GEMMs through torch, deterministic); or ``"gemm"``, both directions with every
    product a torch GEMM and Triton folds over bounded slabs (deterministic).

    ``"auto"``, where ``halo_ops.autotune`` has not measured this call's key on this GPU (it is off, or
    tracing), takes the shipped table's measured winner for this GPU, precision and (D, V) bucket
    (``python -m bench.autotune --kernels schedule``). Where it has none, the best written prediction
    (bench/NOTES.md items 16, 17 and 26): ``"atomic"`` with gradient filtering (whose all-zero tiles skip their
    GEMMs there; ``"owner"`` when ``deterministic``), else ``"gemm"`` (about 120 ms forward+backward predicted
    at N=16384, D=4096, V=128256 on an H100, against 165-185 ms for the fused forward and the slab backward).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if impl == "torch":
        if schedule != "auto":
            raise ValueError(f"schedule={schedule!r} is a Triton backward schedule; impl='torch' runs the chunked "
                             "PyTorch schedule (leave schedule='auto')")
        return "chunked"
    if schedule == "atomic" and deterministic:
        raise ValueError("schedule='atomic' sums in a run-dependent order; deterministic=True takes 'slab', 'gemm' or 'owner'")
    if schedule != "auto":
        return schedule
    from .kernels.config import device_arch, tuned_schedule

    tuned = tuned_schedule(dtype, dim, vocab, device_arch(device))
    if tuned is not None and not (deterministic and tuned == "atomic"):
        return tuned
    if grad_filter_eps > 0:
        return "owner" if deterministic else "atomic"
    return "gemm"


def with_frozen_head_jacobian(options: TokenOptions, hidden, weight, bias, recompute, sharded=False) -> TokenOptions:
    """``options`` with ``save_jacobian`` where it pays: a backward will follow for ``hidden`` alone (the head
    is frozen, as under LoRA), no gradient filtering (which needs the final softmax), no vocabulary sharding
    (``sharded``: it needs the global softmax too) and ``recompute`` is not True. The forward then builds
    d logp / d hidden in its sweep (two GEMMs in all, the fp32 Jacobian [N, D] kept; ``chunked.chunked_forward``,
    ``kernels.jacobian``) instead of the backward recomputing the logits (three)."""
    frozen = not weight.requires_grad and not (bias is not None and bias.requires_grad)
    wanted = (torch.is_grad_enabled() and hidden.requires_grad and frozen and recompute is not True
              and options.grad_filter_eps == 0 and not sharded)
    return dataclasses.replace(options, save_jacobian=True) if wanted else options


def _autocast(tensor: torch.Tensor | None, device_type: str) -> torch.Tensor | None:
    if tensor is None or not torch.is_autocast_enabled(device_type):
        return tensor
    dtype = torch.get_autocast_dtype(device_type)
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def prepare_linear_inputs(hidden, weight, targets, bias, *, ignore_index, logit_scale, softcap, temperature, impl,
                          return_stats, check_targets, check_finite, deterministic, grad_filter_eps,
                          schedule="auto", vocab_parallel=None):
    """Autocast, validation and backend choice shared by the public ops.

    A head that is a DTensor (tensor parallelism) or comes with ``vocab_parallel`` is one rank's shard.
    Returns (hidden [N, D], weight, bias, targets [N] int64 contiguous, TokenOptions, sharding), the last a
    ``(VocabParallel, full vocabulary size or None)`` pair for a shard, else None; the size is known (or summed
    over the group) where ``check_targets`` or the mean logit needs it. ``return_stats``: as ``linear_logprobs``
    takes it (``partials.requested_statistics``).
    """
    from .vocab_parallel import VocabParallel, from_dtensor_head, global_vocab, is_dtensor

    if is_dtensor(weight):
        if vocab_parallel is not None:
            raise ValueError("vocab_parallel is read from a DTensor head's placement: pass one or the other")
        weight, bias, vocab_parallel = from_dtensor_head(weight, bias)
    elif is_dtensor(bias):
        raise ValueError("the bias is a DTensor but the weight is not: pass both as DTensors or both local")
    if vocab_parallel is not None:
        if not isinstance(vocab_parallel, VocabParallel):
            raise TypeError(f"vocab_parallel must be a halo_ops.VocabParallel, got {type(vocab_parallel).__name__}")
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and \
                weight.shape[0] != vocab_parallel.stop - vocab_parallel.start:
            raise ValueError(f"vocab_parallel holds rows [{vocab_parallel.start}, {vocab_parallel.stop}) but this "
                             f"rank's weight has {weight.shape[0]} rows")
    transform = LogitTransform(logit_scale, softcap, temperature)
    stats = requested_statistics(return_stats)
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    hidden, weight, bias = (_autocast(x, device_type) for x in (hidden, weight, bias))
    sharding = None
    if vocab_parallel is not None:
        needs_vocab = (check_targets or "mean_logit" in stats) and not torch.compiler.is_compiling()
        sharding = (vocab_parallel, global_vocab(vocab_parallel, weight.device) if needs_vocab else None)
    check_linear_inputs(hidden, weight, targets, bias, ignore_index=ignore_index, check_targets=check_targets,
                        check_finite=check_finite, target_range=None if sharding is None else sharding[1])
    if not (isinstance(grad_filter_eps, (int, float)) and 0 <= grad_filter_eps < float("inf")):
        raise ValueError(f"grad_filter_eps must be a finite number >= 0, got {grad_filter_eps!r}")
    impl = resolve_impl(impl, hidden.device, hidden.dtype)
    resolved = resolve_schedule(schedule, impl=impl, deterministic=bool(deterministic), grad_filter_eps=grad_filter_eps,
                                device=hidden.device, dtype=hidden.dtype, dim=weight.shape[1], vocab=weight.shape[0])
    options = TokenOptions(impl=impl, transform=transform, ignore_index=int(ignore_index),
                           stats=stats, schedule=resolved, grad_filter_eps=float(grad_filter_eps))
    flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
    return hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_targets, options, sharding


def measured_schedule(options: TokenOptions, hidden, weight, bias, targets, *, schedule: str,
                      deterministic: bool) -> TokenOptions:
    """``options`` with the schedule and block configs ``halo_ops.autotune`` measured (or measures now) for this
    call, where ``schedule`` is ``"auto"`` on the Triton path and the call will run a schedule: not for the
    frozen head's Jacobian or a fused loss's eager schedule, which run kernels of their own (so the first call
    does not time and compile schedules it will not use). ``hidden`` [N, D] and ``targets`` [N] as prepared."""
    if schedule != "auto" or options.impl != "triton" or options.save_jacobian:
        return options
    from . import autotune

    needs = tuple(torch.is_grad_enabled() and x is not None and x.requires_grad for x in (hidden, weight, bias))
    return autotune.choose(hidden, weight, bias, targets, options, deterministic=bool(deterministic),
                           needs=needs) or options
