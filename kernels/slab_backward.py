"""Slab backward: a Triton kernel writes dL/dy for a vocabulary slice into a bounded slab, tensor-core GEMMs do the rest.

For each slice of ``cols`` vocabulary columns (and, when all tokens do not fit the byte budget, each
chunk of ``rows`` tokens), ``dlogits_slab_kernel`` recomputes the logits tile by tile from h, W and
the saved lse and stores

    dL/dy = g · (onehot(target) − exp(z − lse)) · dz/dy          [rows, cols], in the inputs' dtype

Then torch's GEMMs (cuBLAS on a GPU):

    dW[slice] = dL/dyᵀ · H     one GEMM over all tokens, written straight into dW's dtype (no fp32 dW)
    dH       += dL/dy · W[slice]   into an fp32 accumulator
    db[slice] = Σ_tokens dL/dy   in fp32

Three GEMMs' work, like the atomic schedule, but no atomics and no fp32 dW traffic: deterministic by
construction. Extra memory: the slab (``SLAB_BYTES``), fp32 dH [N, D], and an fp32 dW slice only when
the tokens are chunked. The kernel's grid is grouped (GROUP_N token blocks sweep the slice together,
as in Triton's matmul tutorial) so that their rows of H stay in L2 while W's tiles stream.
"""

import functools
import warnings

import torch
import triton
import triton.language as tl

from .config import config_for, dot_options, launch_options
from .tiles import dlogits_tile, grouped_program, has_gradient
from .transform import transform_args

SLAB_BYTES = 1 << 27  # 128 MiB of dL/dy: 4096 bf16 columns at 16384 tokens
SLAB_COLUMN_MULTIPLE = 256  # every BLOCK_V divides it
# Each vocabulary slice reads and rewrites the fp32 dH of its tokens once: below this width, chunk the tokens
# instead of narrowing the slab (at N=262144 a 128 MiB slab would otherwise be 256 columns wide: 501 slices
# at V=128256, each moving the 4 GiB dH twice, about 4 TB; at 2048 columns, 63 slices, about 540 GB).
SLAB_MIN_COLUMNS = 2048
GROUP_N = 8


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None})
@triton.jit
def dlogits_slab_kernel(
    h_ptr, w_ptr, bias_ptr, targets_ptr, lse_ptr, grad_ptr, slab_ptr,
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_slab, stride_grad,
    logit_scale, softcap, temperature, inv_temperature, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_FILTER: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    UPCAST_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid_n, pid_v = grouped_program(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_v = o_v < V
    p_slab = slab_ptr + o_n[:, None].to(tl.int64) * stride_slab + o_v[None, :]
    m_slab = m_n[:, None] & m_v[None, :]
    b_g = tl.load(grad_ptr + o_n, mask=m_n, other=0.0)
    if has_gradient(b_g, grad_ptr, stride_grad, o_n, m_n, HAS_ENTROPY_GRAD):
        b_dz = dlogits_tile(
            h_ptr, w_ptr, bias_ptr, targets_ptr, lse_ptr, b_g, grad_ptr, stride_grad, o_n, m_n, o_v, m_v, D,
            stride_hn, stride_hd, stride_wv, stride_wd, logit_scale, softcap, temperature, inv_temperature,
            filter_eps, HAS_BIAS, HAS_SOFTCAP, HAS_FILTER, HAS_ENTROPY_GRAD, UPCAST_BF16, INPUT_PRECISION, BLOCK_N,
            BLOCK_V, BLOCK_D,
        )
        tl.store(p_slab, b_dz.to(slab_ptr.dtype.element_ty), mask=m_slab)
    else:  # a block of rows without gradient (prompts, padding): its recompute is skipped
        tl.store(p_slab, tl.zeros((BLOCK_N, BLOCK_V), slab_ptr.dtype.element_ty), mask=m_slab)


@functools.lru_cache(maxsize=None)
def fp32_output_gemm(device: torch.device) -> bool:
    """Whether torch writes the fp32 product of half-precision operands in one GEMM on ``device``
    (``out_dtype=torch.float32``; torch 2.8+ on CUDA). Checked once per device on a tiny product, so that an
    error of a real GEMM (out of memory, a bad shape) is raised, never taken for a missing feature. Where it is
    missing, it warns once: the GEMM schedules then round each product to the inputs' dtype before the fp32 add.
    """
    a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
    try:
        torch.addmm(torch.zeros(16, 16, device=device), a, a, out_dtype=torch.float32)
        return True
    except (TypeError, RuntimeError, NotImplementedError) as error:
        warnings.warn(f"torch {torch.__version__} has no fp32-output GEMM on {device} ({type(error).__name__}): "
                      "halo-ops' slab and GEMM schedules take a half-precision product and an fp32 add",
                      RuntimeWarning, stacklevel=2)
        return False


def add_product_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a · b`` with fp32 accumulation for half-precision ``a``, ``b`` and an fp32 ``acc``.

    On CUDA, one GEMM with an fp32 output (:func:`fp32_output_gemm`); where torch lacks it, a half-precision
    product and an fp32 add. Elsewhere (CPU, the interpreter) the operands are upcast: exact, and slow only
    where nothing is fast.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.device.type != "cuda":
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
    elif fp32_output_gemm(a.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(a @ b)


def slab_shape(n_tokens: int, vocab: int, itemsize: int, slab_bytes: int | None = None) -> tuple[int, int]:
    """(rows, cols) of the slab: the widest multiple of 256 columns that holds every token within the
    budget, at least ``SLAB_MIN_COLUMNS`` (or the whole vocabulary): then the tokens are chunked to fit."""
    budget = slab_bytes or SLAB_BYTES
    cols = budget // (max(n_tokens, 1) * itemsize) // SLAB_COLUMN_MULTIPLE * SLAB_COLUMN_MULTIPLE
    cols = min(max(cols, SLAB_MIN_COLUMNS), triton.cdiv(vocab, SLAB_COLUMN_MULTIPLE) * SLAB_COLUMN_MULTIPLE)
    rows = min(n_tokens, max(1, budget // (cols * itemsize)))
    return rows, cols


def window(slab: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] view of the front of ``slab``'s storage: GEMMs with ``out=`` and the kernels
    then see dense rows whatever the slice's width (a [:rows, :cols] slice of a wider slab would be strided)."""
    return slab.view(-1)[: rows * cols].view(rows, cols)


def backward_by_slabs(hidden, weight, bias, needs, rows: int, cols: int, write_dy):
    """The slab schedules' common loop: per vocabulary slice of ``cols`` columns and chunk of ``rows`` tokens,
    ``write_dy(n0, n1, v0, v1, dy)`` fills ``dy`` [n1 − n0, v1 − v0] (a view of one slab in the inputs' dtype)
    with dL/dy, then three GEMMs: dW[slice] = dYᵀ·H (straight into dW's dtype; through an fp32 slice when the
    tokens come in chunks), dH[chunk] += dY·W[slice] (fp32), db[slice] += Σ dY (fp32).

    Returns (fp32 dH, dW in the weight's dtype, fp32 db), None where ``needs`` says no.
    """
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    needs_h, needs_w, needs_b = needs[0], needs[1], needs[2] and bias is not None
    f32 = {"dtype": torch.float32, "device": hidden.device}
    grad_h = torch.zeros((n_tokens, dim), **f32) if needs_h else None
    grad_b = torch.zeros((vocab,), **f32) if needs_b else None
    grad_w = None
    if needs_w:  # every slice is written below, unless there are no tokens
        grad_w = (torch.empty if n_tokens else torch.zeros)((vocab, dim), dtype=weight.dtype, device=weight.device)
    if n_tokens == 0 or not (needs_h or needs_w or needs_b):
        return grad_h, grad_w, grad_b
    slab = torch.empty((rows, cols), dtype=hidden.dtype, device=hidden.device)
    for v0 in range(0, vocab, cols):
        v1 = min(v0 + cols, vocab)
        w_slice = weight[v0:v1]
        grad_w_slice = torch.zeros((v1 - v0, dim), **f32) if needs_w and rows < n_tokens else None
        for n0 in range(0, n_tokens, rows):
            n1 = min(n0 + rows, n_tokens)
            dy = window(slab, n1 - n0, v1 - v0)
            write_dy(n0, n1, v0, v1, dy)
            if needs_h:
                add_product_fp32(grad_h[n0:n1], dy, w_slice)
            if needs_w:
                if grad_w_slice is None:
                    torch.mm(dy.t(), hidden, out=grad_w[v0:v1])
                else:
                    add_product_fp32(grad_w_slice, dy.t(), hidden[n0:n1])
            if needs_b:
                grad_b[v0:v1] += dy.sum(0, dtype=torch.float32)
        if grad_w_slice is not None:
            grad_w[v0:v1].copy_(grad_w_slice)
    return grad_h, grad_w, grad_b


def slab_backward(hidden, weight, bias, targets, lse, grad_logps, options, needs, *, slab_bytes=None, config=None):
    """Gradients of Σ_t grad_logps[t] · logps[t] for (hidden, weight, bias) by the slab schedule: the Triton kernel
    recomputes each tile of a slice and writes dL/dy, then ``backward_by_slabs``'s GEMMs.

    Returns an fp32 dH accumulator, dW already in the weight's dtype, an fp32 db; None where ``needs``
    says no. ``options``: a ``halo_ops.options.TokenOptions`` (transform, grad_filter_eps are read).
    ``slab_bytes``: the slab's byte budget (default ``SLAB_BYTES``).
    """
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    rows, cols = slab_shape(n_tokens, vocab, hidden.dtype.itemsize, slab_bytes)
    cfg = config or config_for("slab", options, hidden, weight)
    eps = float(options.grad_filter_eps)

    def write_dy(n0, n1, v0, v1, dy):
        grid = (triton.cdiv(n1 - n0, cfg.block_n) * triton.cdiv(v1 - v0, cfg.block_v),)
        dlogits_slab_kernel[grid](
            hidden[n0:n1], weight[v0:v1], None if bias is None else bias[v0:v1], targets[n0:n1] - v0, lse[n0:n1],
            grad_logps[..., n0:n1], dy,
            n1 - n0, v1 - v0, dim, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            dy.stride(0), grad_logps.stride(0) if grad_logps.dim() == 2 else 0,
            filter_eps=eps, HAS_FILTER=eps > 0, HAS_ENTROPY_GRAD=grad_logps.dim() == 2, GROUP_N=GROUP_N, **transform_args(options.transform),
            **dot_options(hidden.dtype), **launch_options(cfg),
        )

    return backward_by_slabs(hidden, weight, bias, needs, rows, cols, write_dy)
