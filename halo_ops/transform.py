"""The elementwise map from raw projections to logits, shared by every path.

For a raw projection ``y = h · Wᵀ + b`` the logits are

    z = softcap · tanh(logit_scale · y / softcap) / temperature      (softcap set)
    z = logit_scale · y / temperature                                 (softcap None)

in that order, as in TRL's fused LM head (``trl.kernels.ChunkedLogProbFunction``)
and Gemma 2's ``final_logit_softcapping``. Its derivative is

    dz/dy = logit_scale · (1 − tanh²(logit_scale · y / softcap)) / temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitTransform:
    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def __post_init__(self):
        for name in ("logit_scale", "temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature!r}")
        if self.softcap is not None and (not isinstance(self.softcap, (int, float)) or not self.softcap > 0):
            raise ValueError(f"softcap must be None or a positive number, got {self.softcap!r}")

    @property
    def is_identity(self) -> bool:
        return self.logit_scale == 1.0 and self.softcap is None and self.temperature == 1.0

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        """z from y (out of place)."""
        z = y * self.logit_scale if self.logit_scale != 1.0 else y
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z / self.temperature if self.temperature != 1.0 else z

    def apply_(self, y: torch.Tensor) -> torch.Tensor:
        """z from y, in place in ``y``; returns ``y``."""
        if self.logit_scale != 1.0:
            y.mul_(self.logit_scale)
        if self.softcap is not None:
            y.div_(self.softcap).tanh_().mul_(self.softcap)
        if self.temperature != 1.0:
            y.div_(self.temperature)
        return y

    def grad_from_logits_(self, grad_z: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """dL/dy from dL/dz, in place in ``grad_z``, reading the already transformed ``z``.

        With softcap, tanh = z · temperature / softcap, so the raw projection need not be kept.
        """
        scale = self.logit_scale / self.temperature
        if self.softcap is not None:
            tanh = z * (self.temperature / self.softcap)
            grad_z.mul_(1.0 - tanh.square_())
        if scale != 1.0:
            grad_z.mul_(scale)
        return grad_z
