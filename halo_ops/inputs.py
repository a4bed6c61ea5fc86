"""From a public call's arguments to the token op's inputs: autocast, validation, backend choice, options."""

from __future__ import annotations

import importlib.util

import torch

from .options import TokenOptions
from .transform import LogitTransform
from .validation import check_linear_inputs

IMPLS = ("auto", "triton", "torch")
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


def _autocast(tensor: torch.Tensor | None, device_type: str) -> torch.Tensor | None:
    if tensor is None or not torch.is_autocast_enabled(device_type):
        return tensor
    dtype = torch.get_autocast_dtype(device_type)
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def prepare_linear_inputs(hidden, weight, targets, bias, *, ignore_index, logit_scale, softcap, temperature, impl,
                          return_stats, check_targets, check_finite, deterministic, grad_filter_eps):
    """Autocast, validation and backend choice shared by the public ops.

    Returns (hidden [N, D], weight, bias, targets [N] int64 contiguous, TokenOptions).
    """
    transform = LogitTransform(logit_scale, softcap, temperature)
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    hidden, weight, bias = (_autocast(x, device_type) for x in (hidden, weight, bias))
    check_linear_inputs(hidden, weight, targets, bias, ignore_index=ignore_index,
                        check_targets=check_targets, check_finite=check_finite)
    if not (isinstance(grad_filter_eps, (int, float)) and 0 <= grad_filter_eps < float("inf")):
        raise ValueError(f"grad_filter_eps must be a finite number >= 0, got {grad_filter_eps!r}")
    options = TokenOptions(impl=resolve_impl(impl, hidden.device, hidden.dtype), transform=transform,
                           ignore_index=int(ignore_index), return_stats=bool(return_stats),
                           deterministic=bool(deterministic), grad_filter_eps=float(grad_filter_eps))
    flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
    return hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_targets, options
