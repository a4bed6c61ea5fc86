"""The logit transform in Triton: the same map as ``halo_ops.transform.LogitTransform``, its PyTorch home.

    z = softcap · tanh(logit_scale · y / softcap) / temperature      (softcap optional)
    dz/dy = logit_scale · (1 − tanh²) / temperature,   tanh = z · temperature / softcap

``transform_args`` turns a ``LogitTransform`` into the kernels' arguments, in one place: no softcap
is ``HAS_SOFTCAP=False`` (its value, then unused, is 1).
"""

import triton
import triton.language as tl


def transform_args(transform) -> dict:
    """Kernel arguments of a ``LogitTransform`` (any object with logit_scale, softcap, temperature)."""
    return {
        "logit_scale": float(transform.logit_scale),
        "softcap": float(transform.softcap) if transform.softcap is not None else 1.0,
        "temperature": float(transform.temperature),
        "inv_temperature": 1.0 / float(transform.temperature),
        "HAS_SOFTCAP": transform.softcap is not None,
    }


@triton.jit
def tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def logit_transform(b_y, logit_scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """z from the raw projection y, elementwise on a tile."""
    b_z = b_y * logit_scale
    if HAS_SOFTCAP:
        b_z = softcap * tanh(b_z / softcap)
    return b_z * inv_temperature


@triton.jit
def logit_transform_grad(b_z, logit_scale, softcap, temperature, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """dz/dy from the transformed z, elementwise on a tile."""
    scale = logit_scale * inv_temperature
    if HAS_SOFTCAP:
        b_tanh = b_z * (temperature / softcap)
        return scale * (1.0 - b_tanh * b_tanh)
    else:
        return tl.full(b_z.shape, 1.0, tl.float32) * scale
