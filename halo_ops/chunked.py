"""Chunked PyTorch path: the fused log-prob op in token × vocab tiles, for machines without Triton.

Forward, for each token chunk and each vocabulary chunk of at most ``TILE_ELEMENTS`` logits:
``z = transform(h_c · W_cᵀ + b_c)`` in the accumulation dtype, then an online logsumexp kept
relative to the running max ``m``:

    s = Σ_v exp(z_v − m),   u = Σ_v exp(z_v − m) · (z_v − m)     (u only for the entropy)
    lse = m + log s,        entropy = log s − u / s

Backward recomputes each tile and forms ``dL/dz = g · (onehot(y) − exp(z − lse))`` in place, then
``dH += dL/dy · W``, ``dW += dL/dyᵀ · H``, ``db += Σ dL/dy`` with fp32 (fp64 for fp64 inputs)
accumulators; a half-precision dW is built one vocabulary slice at a time. Extra memory is a few
tiles plus O(N) (plus, for half precision, fp32 dH and one dW slice), never O(N · V). On CPU only rows whose
target is not ignored (forward) and whose upstream gradient is non-zero (backward) are visited;
on other devices all rows are, to avoid a host sync.
"""

from __future__ import annotations

import torch

from .transform import LogitTransform

# Logits per tile: a tile and its temporaries are a few times 4 · TILE_ELEMENTS bytes.
TILE_ELEMENTS = 1 << 20
TOKEN_CHUNK = 256
# fp32 dW accumulator per vocabulary slice for a bf16/fp16 weight (the kernels use the same budget)
ACCUMULATOR_BYTES = 1 << 28


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile_shape(vocab: int) -> tuple[int, int]:
    return TOKEN_CHUNK, max(1, min(vocab, TILE_ELEMENTS // TOKEN_CHUNK))


def _active_rows(mask: torch.Tensor) -> torch.Tensor | None:
    """Indices of the True rows, or None to visit every row.

    Only on CPU, where reading the mask costs no device sync; elsewhere every row is visited (an
    unscored row contributes exact zeros either way).
    """
    if mask.device.type != "cpu" or bool(mask.all()):
        return None
    return mask.nonzero().squeeze(1)


def _project(h_c: torch.Tensor, w_c: torch.Tensor, b_c: torch.Tensor | None, transform: LogitTransform):
    """Transformed logits tile ``[n, v]`` in ``h_c``'s (accumulation) dtype."""
    w_c = w_c.to(h_c.dtype)
    z = torch.addmm(b_c.to(h_c.dtype), h_c, w_c.t()) if b_c is not None else h_c @ w_c.t()
    return transform.apply_(z), w_c


def chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    transform: LogitTransform,
    ignore_index: int,
    with_stats: bool,
):
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] int64.

    Returns ``(logps, lse, entropy, mean_logit)``, each [N] in the accumulation dtype; logps,
    entropy and mean_logit are 0 and lse is +inf at ignored positions; the stats are None
    unless ``with_stats``.
    """
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    valid = targets != ignore_index
    logps = torch.zeros(n_tokens, dtype=acc, device=hidden.device)
    lse = torch.full((n_tokens,), float("inf"), dtype=acc, device=hidden.device)
    entropy = torch.zeros_like(logps) if with_stats else None
    mean_logit = torch.zeros_like(logps) if with_stats else None
    rows = _active_rows(valid)
    h_all, t_all = (hidden, targets) if rows is None else (hidden[rows], targets[rows])
    token_chunk, vocab_chunk = _tile_shape(vocab)

    for t0 in range(0, h_all.shape[0], token_chunk):
        h_c = h_all[t0 : t0 + token_chunk].to(acc)
        t_c = t_all[t0 : t0 + token_chunk]
        n = h_c.shape[0]
        m = torch.full((n,), float("-inf"), dtype=acc, device=hidden.device)
        s = torch.zeros(n, dtype=acc, device=hidden.device)
        u = torch.zeros_like(s) if with_stats else None
        z_sum = torch.zeros_like(s) if with_stats else None
        target_logit = torch.zeros_like(s)
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, vocab)
            z, _ = _project(h_c, weight[v0:v1], None if bias is None else bias[v0:v1], transform)
            local = t_c - v0
            in_tile = (local >= 0) & (local < v1 - v0)
            picked = z.gather(1, local.clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
            target_logit += torch.where(in_tile, picked, 0.0)
            if with_stats:
                z_sum += z.sum(1)
            new_m = torch.maximum(m, z.amax(1))
            alpha = torch.exp(m - new_m)
            z.sub_(new_m.unsqueeze(1))  # z − m'
            if with_stats:
                e = torch.exp(z)
                # u' = α (u + s (m − m')) + Σ e (z − m'); s = 0 while m = −inf, so that term is 0 then
                shift = torch.where(s > 0, s * (m - new_m), 0.0)
                u.add_(shift).mul_(alpha).add_(torch.einsum("nv,nv->n", e, z))
            else:
                e = z.exp_()
            s.mul_(alpha).add_(e.sum(1))
            m = new_m
        lse_c = m + torch.log(s)
        out = slice(t0, t0 + n) if rows is None else rows[t0 : t0 + n]
        logps[out] = target_logit - lse_c
        lse[out] = lse_c
        if with_stats:
            entropy[out] = torch.log(s) - u / s
            mean_logit[out] = z_sum / vocab
    if rows is None:  # every row was visited: ignored ones get 0 (and an lse of +inf, a softmax of 0)
        logps, lse = torch.where(valid, logps, 0.0), torch.where(valid, lse, float("inf"))
        if with_stats:
            entropy, mean_logit = torch.where(valid, entropy, 0.0), torch.where(valid, mean_logit, 0.0)
    return logps, lse, entropy, mean_logit


def _weight_slice_rows(vocab: int, dim: int, vocab_chunk: int, weight_dtype: torch.dtype) -> int:
    """Vocabulary rows per dW slice: all of them when dW accumulates in the weight's own dtype (fp32,
    fp64), else as many as ``ACCUMULATOR_BYTES`` of fp32 hold, in whole vocabulary chunks."""
    if accumulation_dtype(weight_dtype) == weight_dtype:
        return vocab
    return min(vocab, max(1, ACCUMULATOR_BYTES // (4 * dim * vocab_chunk)) * vocab_chunk)


def chunked_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logps: torch.Tensor,
    transform: LogitTransform,
    needs: tuple[bool, bool, bool],
    grad_filter_eps: float = 0.0,
):
    """Gradients of ``Σ_t grad_logps[t] · logps[t]`` for hidden, weight and bias (None where not needed).

    ``grad_filter_eps`` > 0 takes softmax probabilities below it as 0 in the gradient (as the kernels
    do); on CPU a tile left all zero skips its GEMMs.

    ``grad_logps [N]`` must be 0 at ignored positions; rows with a zero coefficient are skipped.
    Gradients are accumulated in fp32 (fp64 for fp64 inputs) and returned in the inputs' dtypes; a
    bf16/fp16 dW is accumulated one vocabulary slice at a time and cast into the output, so no fp32
    copy of the whole [V, D] gradient exists.
    """
    needs_h, needs_w, needs_b = needs
    vocab, dim = weight.shape
    acc = accumulation_dtype(hidden.dtype)
    token_chunk, vocab_chunk = _tile_shape(vocab)
    slice_rows = _weight_slice_rows(vocab, dim, vocab_chunk, weight.dtype) if needs_w else vocab
    sliced = slice_rows < vocab
    grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if needs_h else None
    grad_w = None
    if needs_w:  # sliced, every slice is assigned below: no zero fill of the output
        shape = {"size": weight.shape, "device": weight.device}
        grad_w = torch.empty(**shape, dtype=weight.dtype) if sliced else torch.zeros(**shape, dtype=acc)
    grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if needs_b and bias is not None else None
    rows = _active_rows(grad_logps != 0)
    if rows is None:
        h_all, t_all, g_all, lse_all = hidden, targets, grad_logps, lse
    else:
        h_all, t_all, g_all, lse_all = hidden[rows], targets[rows], grad_logps[rows], lse[rows]

    for s0 in range(0, vocab, slice_rows):
        s1 = min(s0 + slice_rows, vocab)
        gw_s = (torch.zeros((s1 - s0, dim), dtype=acc, device=weight.device) if sliced else grad_w[s0:s1]) \
            if needs_w else None
        for t0 in range(0, h_all.shape[0], token_chunk):
            h_c = h_all[t0 : t0 + token_chunk].to(acc)
            t_c = t_all[t0 : t0 + token_chunk]
            g_c = g_all[t0 : t0 + token_chunk].to(acc)
            lse_c = lse_all[t0 : t0 + token_chunk].to(acc)
            n = h_c.shape[0]
            gh_c = torch.zeros(n, dim, dtype=acc, device=hidden.device) if needs_h else None
            arange = torch.arange(n, device=hidden.device)
            for v0 in range(s0, s1, vocab_chunk):
                v1 = min(v0 + vocab_chunk, s1)
                z, w_c = _project(h_c, weight[v0:v1], None if bias is None else bias[v0:v1], transform)
                # dL/dz = g · (onehot − p): p in place, unless softcap's derivative still needs z
                dz = torch.sub(z, lse_c.unsqueeze(1)) if transform.softcap is not None else z.sub_(lse_c.unsqueeze(1))
                dz.exp_()  # p
                if grad_filter_eps > 0:
                    dz.masked_fill_(dz < grad_filter_eps, 0.0)
                dz.mul_(-g_c.unsqueeze(1))
                local = t_c - v0
                in_tile = ((local >= 0) & (local < v1 - v0)).nonzero().squeeze(1)
                dz.index_put_((arange[in_tile], local[in_tile]), g_c[in_tile], accumulate=True)
                dy = transform.grad_from_logits_(dz, z)
                if grad_filter_eps > 0 and dy.device.type == "cpu" and not bool(dy.any()):
                    continue  # no target here and every p below eps: nothing to add
                if gh_c is not None:
                    gh_c.addmm_(dy, w_c)
                if gw_s is not None:
                    gw_s[v0 - s0 : v1 - s0].addmm_(dy.t(), h_c)
                if grad_b is not None:
                    grad_b[v0:v1] += dy.sum(0)
            if gh_c is not None:
                if rows is None:
                    grad_h[t0 : t0 + n] += gh_c
                else:
                    grad_h.index_add_(0, rows[t0 : t0 + n], gh_c)
        if sliced:
            grad_w[s0:s1] = gw_s

    def cast(grad, like):
        return None if grad is None else grad.to(like.dtype)

    return cast(grad_h, hidden), cast(grad_w, weight), cast(grad_b, bias)
