"""Input checks shared by every public entry point; errors name the argument and the problem."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_linear_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    ignore_index: int,
    check_targets: bool,
    check_finite: bool,
    target_range: int | None = None,
) -> None:
    """Validate ``hidden [..., D]``, ``weight [V, D]``, ``targets [...]`` and ``bias [V]``.

    ``target_range``: the ids' bound when ``weight`` is one rank's shard of a larger head (default V).

    ``check_targets`` reads the targets on the host (one device sync); ``check_finite`` reads
    all of ``hidden`` and ``weight`` (one more pass over them and a sync). Both are skipped while
    ``torch.compile`` traces (a host read would break the graph); shapes, dtypes and devices are
    always checked.
    """
    for name, tensor in (("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias)):
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension [..., D], got a scalar")
    vocab, dim = weight.shape
    if hidden.shape[-1] != dim:
        raise ValueError(
            f"hidden's last dimension is {hidden.shape[-1]} but weight is [V={vocab}, D={dim}]: they must share D"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])} "
            f"(already shifted: hidden[i] predicts targets[i]), got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer token ids, got dtype {targets.dtype}")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must have shape [V={vocab}], got {tuple(bias.shape)}")

    devices = {t.device for t in (hidden, weight, targets, bias) if t is not None}
    if len(devices) > 1:
        named = ", ".join(f"{n}={t.device}" for n, t in (("hidden", hidden), ("weight", weight),
                                                          ("targets", targets), ("bias", bias)) if t is not None)
        raise ValueError(f"all inputs must be on one device, got {named}")
    for name, tensor in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {tensor.dtype}")
    dtypes = {t.dtype for t in (hidden, weight, bias) if t is not None}
    if len(dtypes) > 1:
        raise TypeError(
            f"hidden ({hidden.dtype}), weight ({weight.dtype})"
            + (f" and bias ({bias.dtype})" if bias is not None else "")
            + " must share a dtype; cast them or run under torch.autocast"
        )

    if torch.compiler.is_compiling():
        return
    if check_targets and targets.numel() > 0:
        bound = target_range if target_range is not None else vocab
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= bound))
        if bool(bad.any()):
            first = targets[bad].flatten()[0].item()
            raise ValueError(
                f"targets must lie in [0, {bound}) or equal ignore_index={ignore_index}; "
                f"found {int(bad.sum())} outside, e.g. {first}"
            )
    if check_finite:
        for name, tensor in (("hidden", hidden), ("weight", weight), ("bias", bias)):
            if tensor is not None and tensor.numel() > 0 and not bool(torch.isfinite(tensor).all()):
                kinds = [k for k, present in (("NaN", torch.isnan(tensor).any()), ("inf", torch.isinf(tensor).any()))
                         if bool(present)]
                raise ValueError(f"{name} contains {' and '.join(kinds)} values")


def check_sequence_tensor(name: str, tensor: torch.Tensor, batch: int, device: torch.device) -> None:
    """A per-sequence input of a loss: a floating-point ``[B]`` tensor on the log-probs' device."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if tuple(tensor.shape) != (batch,):
        raise ValueError(f"{name} must have shape [B={batch}], got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the policy log-probs are on {device}")
