"""Chunked PyTorch path: the token op in token × vocabulary tiles, for machines without Triton (and float64).

Forward, for each chunk of ``TOKEN_CHUNK`` tokens and each vocabulary chunk of at most
``TILE_ELEMENTS`` logits: ``z = transform(h_c · W_cᵀ + b_c)`` in the accumulation dtype, reduced to the
chunk's partials (``halo_ops.partials``: max, Σ exp, target logit, and those of the statistics asked
for). The token op merges them, as it merges the Triton kernel's vocabulary splits.

Backward recomputes each tile and forms ``dL/dz = g · (onehot(y) − exp(z − lse))`` in place, then
``dL/dy = dL/dz · dz/dy`` and ``dH += dL/dy · W``, ``dW += dL/dyᵀ · H``, ``db += Σ dL/dy`` in fp32 (fp64
for fp64 inputs). dW is built ``slice_rows`` vocabulary rows at a time when the weight is half
precision, each slice cast into the output. Extra memory: a few tiles plus O(N) (plus, for half
precision, fp32 dH and one dW slice), never O(N · V). On CPU only rows whose target is scored
(forward) or whose coefficient is non-zero (backward) are visited; on other devices every row is,
to avoid a host sync.
"""

from __future__ import annotations

import torch

from . import partials as P
from .options import TokenOptions, accumulation_dtype
from .partials import merge_partials
from .transform import LogitTransform

# Logits per tile: a tile and its temporaries are a few times 4 · TILE_ELEMENTS bytes (16 MiB tiles, within a
# 32 MiB L3). Tiles of 2^20 (256 × 4096) ran as fast on an idle 2-core machine, but with one competing process
# every tile's GEMM and elementwise pass waited on a busy core at its thread barrier: 4× fewer, larger tiles
# took the loaded forward+backward from 1.24× to 0.99× of plain PyTorch's time (bench/NOTES.md item 21).
TILE_ELEMENTS = 1 << 22
TOKEN_CHUNK = 512


def _vocab_chunk(vocab: int) -> int:
    return max(1, min(vocab, TILE_ELEMENTS // TOKEN_CHUNK))


def _active_rows(mask: torch.Tensor) -> torch.Tensor | None:
    """Indices of the True rows, or None to visit every row.

    Only on CPU, where reading the mask costs no device sync; elsewhere every row is visited (an
    unscored row contributes exact zeros either way).
    """
    if mask.device.type != "cpu" or bool(mask.all()):
        return None
    return mask.nonzero().squeeze(1)


def _project(h_c: torch.Tensor, w_c: torch.Tensor, b_c: torch.Tensor | None, transform: LogitTransform):
    """Transformed logits tile ``[n, v]`` in ``h_c``'s (accumulation) dtype, and ``w_c`` in that dtype."""
    w_c = w_c.to(h_c.dtype)
    z = torch.addmm(b_c.to(h_c.dtype), h_c, w_c.t()) if b_c is not None else h_c @ w_c.t()
    return transform.apply_(z), w_c


def _max_before_target(z, local_targets, in_tile, tile_max):
    """Each row's max over the tile's columns before its target's: the tile's max when the target lies past the
    tile, −inf when before it, else a masked max over the row, read only for those rows on CPU (the others' targets
    lie in other tiles; elsewhere every row is read, to avoid a host sync)."""
    outside = torch.where(local_targets >= z.shape[1], tile_max, float("-inf"))
    rows = in_tile.nonzero().squeeze(1) if z.device.type == "cpu" else torch.arange(z.shape[0], device=z.device)
    columns = torch.arange(z.shape[1], device=z.device)
    inside = z[rows].masked_fill_(columns >= local_targets[rows].unsqueeze(1), float("-inf")).amax(1)
    return outside.index_put_((rows,), torch.where(in_tile[rows], inside, outside[rows]))


def _fold_tile(z, local_targets, piece, stats_mask: int, *, keep_centered: bool = False, exp_out=None):
    """Fold a tile of transformed logits z [n, v] into its rows' partials ``piece`` [3 or 7, n] (``halo_ops.partials``;
    ``local_targets`` relative to the tile's first column): max, Σ exp, target logit and the kinds ``stats_mask``
    names (``partials.kernel_stats_mask``). Leaves z − m in ``z`` and returns e = exp(z − m): into ``exp_out`` when
    given, a new tensor when z − m is still needed (``keep_centered``, or the entropy's centered sum), else ``z``
    itself, overwritten."""
    width = z.shape[1]
    in_tile = (local_targets >= 0) & (local_targets < width)
    picked = z.gather(1, local_targets.clamp(0, width - 1).unsqueeze(1)).squeeze(1)
    piece[P.TARGET_LOGIT] = torch.where(in_tile, picked, 0.0)
    if stats_mask & 4:
        piece[P.LOGIT_SUM] = z.sum(1)
    m = z.amax(1)
    piece[P.MAX] = m
    if stats_mask & 16:
        piece[P.MAX_BEFORE_TARGET] = _max_before_target(z, local_targets, in_tile, m)
    centered = z.sub_(m.unsqueeze(1))
    if exp_out is not None:
        e = torch.exp(centered, out=exp_out)
    else:
        e = torch.exp(centered) if keep_centered or stats_mask & 2 else centered.exp_()
    if stats_mask & 2:
        piece[P.CENTERED_SUM] = torch.einsum("nv,nv->n", e, centered)
    if stats_mask & 8:
        piece[P.SQ_SUM_EXP] = torch.einsum("nv,nv->n", e, e)
    piece[P.SUM_EXP] = e.sum(1)
    return e


def chunked_forward(hidden, weight, bias, targets, options: TokenOptions):
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] int64 → partials [3 or 7, K, N], and with
    ``options.save_jacobian`` the Jacobian J [N, D] of each token's log-prob with respect to its hidden state
    (else None).

    K is the number of vocabulary chunks; rows that are not visited keep empty partials (and a zero J).
    J_t = dz/dy(z_t,y_t) · W[y_t] − Σ_v p_tv · dz/dy(z_tv) · W_v (bias and transform included) is built in
    the same sweep, one more GEMM per tile: Σ_v exp(z_v − m) · dz/dy · W_v accumulates online, rescaled as
    the running max m grows (the flash-attention recurrence with W as keys and values), then ÷ Σ exp(z − m).
    """
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    transform = options.transform
    vocab_chunk = _vocab_chunk(vocab)
    starts = range(0, vocab, vocab_chunk)
    partials = P.empty_partials(len(starts), n_tokens, options.stats, acc, hidden.device)
    rows = _active_rows(targets != options.ignore_index)
    h_all, t_all = (hidden, targets) if rows is None else (hidden[rows], targets[rows])
    jacobian = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if options.save_jacobian else None
    softcap = transform.softcap is not None

    for t0 in range(0, h_all.shape[0], TOKEN_CHUNK):
        h_c = h_all[t0 : t0 + TOKEN_CHUNK].to(acc)
        t_c = t_all[t0 : t0 + TOKEN_CHUNK]
        chunk = P.empty_partials(len(starts), h_c.shape[0], options.stats, acc, hidden.device)
        if jacobian is not None:
            expected_w = torch.zeros((h_c.shape[0], h_c.shape[1]), dtype=acc, device=hidden.device)
            running_max = torch.full((h_c.shape[0],), float("-inf"), dtype=acc, device=hidden.device)
        for k, v0 in enumerate(starts):
            v1 = min(v0 + vocab_chunk, vocab)
            z, w_c = _project(h_c, weight[v0:v1], None if bias is None else bias[v0:v1], transform)
            slope = transform.grad_from_logits_(torch.ones_like(z), z) if jacobian is not None and softcap else None
            e = _fold_tile(z, t_c - v0, chunk[:, k], options.kernel_stats)
            m = chunk[P.MAX, k]
            if jacobian is not None:  # Σ exp(z − M) · dz/dy · W over the chunks so far, M the running max
                new_max = torch.maximum(running_max, m)
                expected_w.mul_(torch.exp(running_max - new_max).unsqueeze(1))
                e.mul_(torch.exp(m - new_max).unsqueeze(1))
                expected_w.addmm_(e.mul_(slope) if slope is not None else e, w_c)
                running_max = new_max
        out = slice(t0, t0 + h_c.shape[0]) if rows is None else rows[t0 : t0 + h_c.shape[0]]
        partials[:, :, out] = chunk
        if jacobian is not None:
            sum_exp = (chunk[P.SUM_EXP] * torch.exp(chunk[P.MAX] - running_max)).sum(0)
            target_logit = chunk[P.TARGET_LOGIT].sum(0)
            target_slope = transform.grad_from_logits_(torch.ones_like(target_logit), target_logit)
            target_w = weight[t_c.clamp(0, vocab - 1)].to(acc)
            if not softcap:  # dz/dy is one constant: applied once here instead of per tile
                expected_w.mul_(transform.logit_scale / transform.temperature)
            jacobian[out] = target_slope.unsqueeze(1) * target_w - expected_w / sum_exp.unsqueeze(1)
    return partials, jacobian


def chunked_backward(hidden, weight, bias, targets, lse, grad_logps, options: TokenOptions,
                     needs: tuple[bool, bool, bool], slice_rows: int):
    """Accumulators of the gradients of ``Σ_t grad_logps[t] · logps[t]`` for (hidden, weight, bias).

    ``grad_logps [N]`` is 0 at ignored positions; rows with a zero coefficient are skipped. With an entropy
    gradient it is the coefficient rows ``[3, N]`` = (g, a, b) of ``token_op.backward_accumulators``:
    dL/dz = g · onehot − p · (a + b · z). Returns fp32
    (fp64 for fp64 inputs) accumulators, None where not needed; dW is already in the weight's dtype
    when it was built in slices (``slice_rows`` < V). With ``options.grad_filter_eps`` > 0, softmax
    probabilities below it count as 0, and on CPU a tile left all zero skips its GEMMs.
    """
    needs_h, needs_w, needs_b = needs
    vocab, dim = weight.shape
    acc = accumulation_dtype(hidden.dtype)
    transform, eps = options.transform, options.grad_filter_eps
    vocab_chunk = _vocab_chunk(vocab)
    slice_rows = slice_rows if needs_w else vocab
    sliced = slice_rows < vocab
    grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if needs_h else None
    grad_w = None
    if needs_w:  # sliced, every slice is assigned below: no zero fill of the output
        shape = {"size": weight.shape, "device": weight.device}
        grad_w = torch.empty(**shape, dtype=weight.dtype) if sliced else torch.zeros(**shape, dtype=acc)
    grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if needs_b else None
    coefficients = grad_logps if grad_logps.dim() == 2 else grad_logps.unsqueeze(0)  # [1 or 3, N]
    rows = _active_rows((coefficients[0] != 0) | (coefficients[-1] != 0))
    if rows is None:
        h_all, t_all, c_all, lse_all = hidden, targets, coefficients, lse
    else:
        h_all, t_all, c_all, lse_all = hidden[rows], targets[rows], coefficients[:, rows], lse[rows]

    for s0 in range(0, vocab, slice_rows):
        s1 = min(s0 + slice_rows, vocab)
        gw_s = None
        if needs_w:
            gw_s = torch.zeros((s1 - s0, dim), dtype=acc, device=weight.device) if sliced else grad_w[s0:s1]
        for t0 in range(0, h_all.shape[0], TOKEN_CHUNK):
            h_c = h_all[t0 : t0 + TOKEN_CHUNK].to(acc)
            t_c = t_all[t0 : t0 + TOKEN_CHUNK]
            c_c = c_all[:, t0 : t0 + TOKEN_CHUNK].to(acc)
            g_c = c_c[0]
            lse_c = lse_all[t0 : t0 + TOKEN_CHUNK].to(acc)
            n = h_c.shape[0]
            gh_c = torch.zeros(n, dim, dtype=acc, device=hidden.device) if needs_h else None
            arange = torch.arange(n, device=hidden.device)
            for v0 in range(s0, s1, vocab_chunk):
                v1 = min(v0 + vocab_chunk, s1)
                z, w_c = _project(h_c, weight[v0:v1], None if bias is None else bias[v0:v1], transform)
                # dL/dz = g · onehot − p · c, c = g (or a + b · z): p in place, unless z is still needed (softcap's
                # derivative, the entropy's gradient)
                keep_z = transform.softcap is not None or c_c.shape[0] == 3
                dz = torch.sub(z, lse_c.unsqueeze(1)) if keep_z else z.sub_(lse_c.unsqueeze(1))
                dz.exp_()  # p
                if eps > 0:
                    dz.masked_fill_(dz < eps, 0.0)
                if c_c.shape[0] == 3:
                    dz.mul_(-(c_c[1].unsqueeze(1) + c_c[2].unsqueeze(1) * z))
                else:
                    dz.mul_(-g_c.unsqueeze(1))
                local = t_c - v0
                in_tile = ((local >= 0) & (local < v1 - v0)).nonzero().squeeze(1)
                dz.index_put_((arange[in_tile], local[in_tile]), g_c[in_tile], accumulate=True)
                dy = transform.grad_from_logits_(dz, z)
                if eps > 0 and dy.device.type == "cpu" and not bool(dy.any()):
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
    return grad_h, grad_w, grad_b


def chunked_eager(hidden, weight, bias, targets, options: TokenOptions, seq: int, per_chunk: int, token_coefficients,
                  needs: tuple[bool, bool, bool]):
    """The token op's forward and, in the same pass, the gradients of a sequence-level loss: three GEMMs, no
    recompute.

    For a loss whose coefficient dloss/dlogp_t for a sequence's tokens depends on that sequence alone (given
    constants such as the batch size), ``token_coefficients(logps [b, T], first_sequence) -> [b, T]`` gives
    them for a chunk of ``per_chunk`` whole sequences from its per-token log-probs (``halo_ops.eager``). The
    chunk's logits are built once, in the forward's tiles, and kept in one buffer ``[rows, V]``: as
    e = exp(z − m_tile) without softcap (then p = e · exp(m_tile − lse), a product where a recompute takes an exp),
    as z − m_tile with it. Once the chunk's coefficients g are known, each tile, still cache-sized, gives
    ``dL/dy = g · (onehot − p) · dz/dy`` (with ``options.grad_filter_eps``, p below it counts as 0),
    ``dH += dL/dy · W_tile`` and ``dW_tile += dL/dyᵀ · H``. Rows with an ignored target are left out on CPU,
    and so are token blocks whose coefficients are all 0.

    Returns (logps, lse, stats) as ``forward_tokens`` does, and the gradients: dH [N, D] in the hidden's dtype
    (each block's rows are complete once its tiles are done), dW [V, D] and db [V] in the accumulation dtype, None
    where ``needs`` says no.
    """
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    transform, stats, eps = options.transform, options.stats, options.grad_filter_eps
    keep_exp = transform.softcap is None  # with softcap dz/dy needs z, so the buffer keeps z − m instead of e
    new = {"dtype": acc, "device": hidden.device}
    logps, lse = torch.zeros(n_tokens, **new), torch.full((n_tokens,), float("inf"), **new)
    token_stats = P.zero_stats(stats, n_tokens, acc, hidden.device) if stats else None
    grad_h = torch.zeros((n_tokens, dim), dtype=hidden.dtype, device=hidden.device) if needs[0] else None
    grad_w = torch.zeros((vocab, dim), **new) if needs[1] else None
    grad_b = torch.zeros(vocab, **new) if needs[2] and bias is not None else None
    w, b = weight.to(acc), None if bias is None else bias.to(acc)
    vocab_chunk = _vocab_chunk(vocab)
    tiles = [(v0, min(v0 + vocab_chunk, vocab)) for v0 in range(0, vocab, vocab_chunk)]
    store = torch.empty(min(per_chunk * seq, n_tokens) * vocab, **new)
    logit_sums = P.linear_logit_sums(weight, bias, options, acc)
    # the entropy's centered sum needs z − m beside e: the GEMM goes to a cache-sized scratch tile, e to the store
    scratch = None
    if keep_exp and options.kernel_stats & 2:
        scratch = torch.empty(min(TOKEN_CHUNK, per_chunk * seq, n_tokens) * vocab_chunk, **new)
    for s0 in range(0, n_tokens // max(seq, 1), per_chunk):
        r0, r1 = s0 * seq, min((s0 + per_chunk) * seq, n_tokens)
        t_all = targets[r0:r1]
        rows = _active_rows(t_all != options.ignore_index)
        local = torch.arange(r1 - r0, device=hidden.device) if rows is None else rows
        h_c, t_c = hidden[r0:r1][local].to(acc), t_all[local]
        n_c = h_c.shape[0]
        blocks = [(t0, min(t0 + TOKEN_CHUNK, n_c)) for t0 in range(0, n_c, TOKEN_CHUNK)]
        views, offset = {}, 0
        for (t0, t1), (v0, v1) in ((blk, tile) for blk in blocks for tile in tiles):
            views[t0, v0] = store[offset : offset + (t1 - t0) * (v1 - v0)].view(t1 - t0, v1 - v0)
            offset += (t1 - t0) * (v1 - v0)
        partials = P.empty_partials(len(tiles), n_c, stats, acc, hidden.device)
        for (t0, t1), (k, (v0, v1)) in ((blk, tile) for blk in blocks for tile in enumerate(tiles)):  # the forward
            kept = views[t0, v0]
            z = kept if scratch is None else scratch[: kept.numel()].view_as(kept)
            if b is not None:
                torch.addmm(b[v0:v1], h_c[t0:t1], w[v0:v1].t(), out=z)  # GEMM 1
            else:
                torch.mm(h_c[t0:t1], w[v0:v1].t(), out=z)
            _fold_tile(transform.apply_(z), t_c[t0:t1] - v0, partials[:, k, t0:t1], options.kernel_stats,
                       keep_centered=not keep_exp, exp_out=None if scratch is None else kept)
        P.add_linear_logit_sums(partials, h_c, logit_sums)
        valid = t_c != options.ignore_index
        logps_c, lse_c, stats_c = merge_partials(partials, valid, vocab, stats)
        chunk_logps = torch.zeros(r1 - r0, **new).index_copy_(0, local, logps_c)
        g = token_coefficients(chunk_logps.view(-1, seq), s0).reshape(-1)[local].to(acc)
        g = torch.where(valid, g, 0.0)
        out = local + r0
        logps[out], lse[out] = logps_c, lse_c
        if stats:
            for field, value in zip(token_stats, stats_c):
                if field is not None:
                    field[out] = value
        for t0, t1 in blocks:  # the gradients, from the kept tiles
            g_b = g[t0:t1]
            if g_b.device.type == "cpu" and not bool(g_b.any()):
                continue  # prompts, padding, saturated sequences: nothing to add
            h_b, gh_b = h_c[t0:t1], torch.zeros((t1 - t0, dim), **new) if grad_h is not None else None
            arange = torch.arange(t1 - t0, device=hidden.device)
            for k, (v0, v1) in enumerate(tiles):
                kept, shift = views[t0, v0], (lse_c[t0:t1] - partials[P.MAX, k, t0:t1]).unsqueeze(1)
                # p = exp(z − lse) = e · exp(m − lse), in place in the kept tile; with softcap from z − m
                p = kept.mul_(torch.exp(-shift)) if keep_exp else torch.exp(kept - shift)
                if eps > 0:
                    p.masked_fill_(p < eps, 0.0)
                dz = p.mul_(-g_b.unsqueeze(1))
                target = t_c[t0:t1] - v0
                hit = ((target >= 0) & (target < v1 - v0)).nonzero().squeeze(1)
                dz.index_put_((arange[hit], target[hit]), g_b[hit], accumulate=True)
                z = None if keep_exp else kept.add_(partials[P.MAX, k, t0:t1].unsqueeze(1))
                dy = transform.grad_from_logits_(dz, z)
                if gh_b is not None:
                    gh_b.addmm_(dy, w[v0:v1])  # GEMM 2
                if grad_w is not None:
                    grad_w[v0:v1].addmm_(dy.t(), h_b)  # GEMM 3
                if grad_b is not None:
                    grad_b[v0:v1] += dy.sum(0)
            if gh_b is not None:
                grad_h[out[t0:t1]] = gh_b.to(grad_h.dtype)
    return (logps, lse, token_stats), (grad_h, grad_w, grad_b)
