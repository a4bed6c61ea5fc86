"""linear_logprobs on both paths against float64 ground truth: values, stats, every gradient."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from halo_ops import linear_logprobs, linear_logprobs_reference

from ._cases import Case, assert_close_to_exact, check_case, token_options, triton_forward
from .conftest import DEVICE, DTYPES, IMPLS

OPTIONS = {
    "plain": {},
    "deterministic": {"bias": True, "softcap": 3.0, "options": {"deterministic": True}},
    "bias": {"bias": True},
    "softcap": {"softcap": 2.5},
    "scale_temperature": {"logit_scale": 0.6, "temperature": 1.7},
    "everything": {"bias": True, "softcap": 4.0, "logit_scale": 1.9, "temperature": 0.8},
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", OPTIONS)
def test_options_and_dtypes(impl, dtype, option):
    check_case(Case(dtype=dtype, **OPTIONS[option]), impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions_with_empty_rows(impl, reduction):
    """A row with no valid token gives 0 for sum and mean, and no gradient flows from it."""
    out = check_case(Case(batch=3, empty_rows=1, reduction=reduction, ignore_frac=0.3), impl, stats=False)
    assert torch.all(out[0] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_positions_are_zero(impl):
    case = Case(ignore_frac=0.5)
    hidden, weight, _, targets, _ = case.inputs()
    out = linear_logprobs(hidden, weight, targets, impl=impl, return_stats=True)
    ignored = targets == -100
    for tensor in out:
        assert torch.all(tensor[ignored] == 0)
        assert torch.all(torch.isfinite(tensor))


@pytest.mark.parametrize("impl", IMPLS)
def test_custom_ignore_index_inside_vocab(impl):
    """ignore_index may be a real token id (a pad id); those positions are ignored, not scored."""
    case = Case(ignore_frac=0.0, options={"ignore_index": 5})
    hidden, weight, _, targets, _ = case.inputs()
    targets[:, ::3] = 5
    out = linear_logprobs(hidden, weight, targets, ignore_index=5, impl=impl)
    ref = linear_logprobs_reference(hidden.double(), weight.double(), targets, ignore_index=5).logps
    assert torch.all(out[targets == 5] == 0)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0)])
def test_no_tokens(impl, shape):
    hidden = torch.randn(*shape, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    targets = torch.zeros(shape, dtype=torch.long, device=DEVICE)
    out = linear_logprobs(hidden, weight, targets, impl=impl, reduction="sum" if len(shape) == 2 else "none")
    assert out.shape == (shape[0],) if len(shape) == 2 else out.shape == shape
    out.sum().backward()
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_targets_ignored_is_differentiable_zero(impl):
    case = Case(ignore_frac=1.0)
    hidden, weight, _, targets, _ = case.inputs()
    hidden.requires_grad_(), weight.requires_grad_()
    out = linear_logprobs(hidden, weight, targets, impl=impl, reduction="mean")
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    """Transposed weight, strided hidden and targets: same numbers as contiguous copies."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 2, 29, generator=gen).to(DEVICE).transpose(0, 1)  # [2, 40, 29], strided
    weight = (torch.randn(29, 150, generator=gen) * 0.3).to(DEVICE).t()  # [150, 29], column-major
    targets = torch.randint(0, 150, (40, 2), generator=gen).to(DEVICE).t()
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not targets.is_contiguous()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.contiguous().requires_grad_(), weight.contiguous().requires_grad_()
    a = linear_logprobs(h1, w1, targets, impl=impl)
    b = linear_logprobs(h2, w2, targets.contiguous(), impl=impl)
    torch.testing.assert_close(a, b)
    upstream = torch.randn_like(a)
    (a * upstream).sum().backward()
    (b * upstream).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_tied_embedding_gradients_accumulate(impl):
    """A weight shared with the input embedding gets both contributions, as with full logits."""
    gen = torch.Generator().manual_seed(4)
    vocab, dim = 97, 24
    tokens = torch.randint(0, vocab, (2, 21), generator=gen).to(DEVICE)
    results = []
    for fn in ("fast", "reference"):
        weight = (torch.randn(vocab, dim, generator=torch.Generator().manual_seed(5)) * 0.2).to(DEVICE)
        weight.requires_grad_()
        hidden = torch.nn.functional.embedding(tokens[:, :-1], weight).tanh()
        if fn == "fast":
            out = linear_logprobs(hidden, weight, tokens[:, 1:], impl=impl, reduction="sum")
        else:
            out = linear_logprobs_reference(hidden, weight, tokens[:, 1:], reduction="sum").logps
        out.sum().backward()
        results.append((out.detach(), weight.grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_runs_projection_in_autocast_dtype(impl, dtype):
    """fp32 master weights under autocast: the projection runs in the autocast dtype, grads come back fp32."""
    case = Case(dtype=torch.float32)
    hidden, weight, _, targets, upstream = case.inputs()
    hidden.requires_grad_(), weight.requires_grad_()
    with torch.autocast(DEVICE, dtype=dtype):
        out = linear_logprobs(hidden, weight, targets, impl=impl)
    (out * upstream).sum().backward()
    assert out.dtype == torch.float32 and hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    h, w = hidden.detach().to(dtype).double(), weight.detach().to(dtype).double()
    exact = linear_logprobs_reference(h, w, targets).logps
    plain = linear_logprobs_reference(hidden.detach().to(dtype), weight.detach().to(dtype), targets).logps
    assert_close_to_exact(out, plain, exact, dtype, "autocast logps")


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_only_saves_nothing(impl):
    case = Case()
    hidden, weight, _, targets, _ = case.inputs()
    hidden.requires_grad_(), weight.requires_grad_()
    with torch.no_grad():
        out = linear_logprobs(hidden, weight, targets, impl=impl)
    assert out.grad_fn is None
    out = linear_logprobs(hidden.detach(), weight.detach(), targets, impl=impl)
    assert out.grad_fn is None


# --- property-based: shapes, ignore patterns, options, dtypes, reductions ---------------------------

case_strategy = st.builds(
    Case,
    batch=st.integers(1, 3),
    seq=st.integers(0, 45),
    dim=st.sampled_from([1, 7, 16, 33, 65]),
    vocab=st.sampled_from([2, 3, 50, 129, 257, 401]),
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    softcap=st.none() | st.floats(0.5, 30.0),
    logit_scale=st.floats(0.25, 2.0),
    temperature=st.floats(0.5, 2.0),
    ignore_frac=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    empty_rows=st.integers(0, 1),
    reduction=st.sampled_from(["none", "sum", "mean"]),
    seed=st.integers(0, 2**16),
)


@pytest.mark.parametrize("impl", IMPLS)
@given(case=case_strategy)
def test_property_matches_float64_reference(impl, case):
    check_case(case, impl)


# --- Triton-specific tiling: many tiles, vocabulary splits, masked edges ---------------------------


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize(("splits", "group"), [(1, 8), (2, 2), (5, 1), (5, 2), (3, 8)])
@pytest.mark.parametrize("return_stats", [False, True])
def test_triton_small_blocks_and_vocab_splits(splits, group, return_stats, deterministic):
    """Blocks far smaller than the problem, V not a multiple of any tile, vocab split across programs, and the
    grid's groups of token blocks whole, partial (5 blocks in groups of 2) or larger than the grid."""
    from halo_ops.kernels import BlockConfig, linear_logprobs_backward

    config = BlockConfig(block_n=16, block_v=32, block_d=16)
    case = Case(batch=1, seq=71, dim=45, vocab=203, bias=True, softcap=3.0, ignore_frac=0.3)
    hidden, weight, bias, targets, upstream = case.inputs()
    hidden, targets, upstream = hidden[0], targets[0], upstream[0]
    options = token_options(softcap=3.0, return_stats=return_stats, deterministic=deterministic)
    logps, lse, stats = triton_forward(hidden, weight, bias, targets, options, config=config, splits=splits,
                                       group=group)
    exact = linear_logprobs_reference(hidden.double(), weight.double(), targets, bias.double(), softcap=3.0)
    torch.testing.assert_close(logps.double(), exact.logps, atol=2e-5, rtol=0)
    if return_stats:
        for field in ("entropy", "mean_logit", "log_sum_sq_probs"):
            torch.testing.assert_close(getattr(stats, field).double(), getattr(exact, field), atol=2e-5, rtol=0)
        assert torch.equal(stats.is_top1, exact.is_top1)
    grad = torch.where(targets != -100, upstream, 0.0).float()
    grads = linear_logprobs_backward(hidden, weight, bias, targets, lse, grad, options, (True, True, True),
                                     config=config)
    leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    out = linear_logprobs_reference(leaves[0], leaves[1], targets, leaves[2], softcap=3.0).logps
    exact_grads = torch.autograd.grad((out * upstream.double()).sum(), leaves)
    for g, e in zip(grads, exact_grads):
        torch.testing.assert_close(g.double(), e, atol=2e-5, rtol=1e-4)


def test_backward_skips_blocks_with_zero_coefficient():
    """Gradients of rows with a zero upstream coefficient are exactly zero (their blocks never run)."""
    case = Case(batch=2, seq=40, ignore_frac=0.0)
    hidden, weight, _, targets, upstream = case.inputs()
    hidden.requires_grad_()
    upstream[0] = 0.0
    out = linear_logprobs(hidden, weight, targets, impl="triton")
    (out * upstream).sum().backward()
    assert torch.all(hidden.grad[0] == 0) and torch.any(hidden.grad[1] != 0)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True), (True, True, True)])
def test_deterministic_backward_partial_needs(needs):
    """The deterministic kernels compute exactly the requested gradients and match the atomic pass."""
    from halo_ops.kernels import BlockConfig, linear_logprobs_backward

    config = BlockConfig(block_n=16, block_v=32, block_d=16)
    case = Case(batch=1, seq=50, dim=20, vocab=77, bias=True)
    hidden, weight, bias, targets, upstream = case.inputs()
    hidden, targets, upstream = hidden[0], targets[0], upstream[0]
    _, lse, _ = triton_forward(hidden, weight, bias, targets, token_options(), config=config)
    grad = torch.where(targets != -100, upstream, 0.0).float()
    atomic = linear_logprobs_backward(hidden, weight, bias, targets, lse, grad, token_options(), needs, config=config)
    owned = linear_logprobs_backward(hidden, weight, bias, targets, lse, grad, token_options(deterministic=True), needs,
                                     config=config)
    for need, a, b in zip(needs, atomic, owned):
        assert (a is None) == (b is None) == (not need)
        if need:
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("impl", "dtype", "needs", "deterministic"),
    [
        ("triton", torch.bfloat16, (True, True, True), False),
        ("triton", torch.bfloat16, (True, True, True), True),
        ("triton", torch.float16, (True, True, True), False),
        ("triton", torch.bfloat16, (False, True, False), False),
        ("triton", torch.bfloat16, (False, True, False), True),
        ("triton", torch.bfloat16, (True, False, False), True),
        ("torch", torch.bfloat16, (True, True, True), False),
        ("torch", torch.float16, (False, True, False), False),
    ],
)
def test_half_precision_dw_is_built_slice_by_slice(impl, dtype, needs, deterministic, monkeypatch):
    """With a half-precision weight, dW is accumulated in fp32 one vocabulary slice at a time and cast
    into the output: the same gradients as one slice, and no fp32 buffer of more than a slice of W."""
    from halo_ops import chunked, token_op

    case = Case(batch=1, seq=40, dim=32, vocab=700, bias=True, softcap=3.0, ignore_frac=0.2, dtype=dtype)
    hidden, weight, bias, targets, upstream = case.inputs()
    hidden, targets, upstream = hidden[0], targets[0], upstream[0]
    options = token_options(impl=impl, softcap=3.0, deterministic=deterministic)
    _, lse, _, _ = token_op.forward_tokens(options, hidden, weight, bias, targets)

    def backward():
        return token_op.backward_tokens(options, hidden, weight, bias, targets, lse, upstream.float(), needs)

    whole = backward()
    slice_bytes = 256 * 32 * 4  # 256 rows of fp32: slices of 256, 256 and 188 rows
    monkeypatch.setattr(token_op, "ACCUMULATOR_BYTES", slice_bytes)
    assert token_op.weight_slice_rows(700, 32, dtype) == 256
    if impl == "torch":
        monkeypatch.setattr(chunked, "TILE_ELEMENTS", chunked.TOKEN_CHUNK * 128)  # vocabulary chunks of 128
    fp32_allocations = []
    real_zeros = torch.zeros

    def zeros(*shape, **kwargs):
        out = real_zeros(*shape, **kwargs)
        if out.dtype == torch.float32:
            fp32_allocations.append(out.numel() * 4)
        return out

    monkeypatch.setattr(torch, "zeros", zeros)
    sliced = backward()
    monkeypatch.setattr(torch, "zeros", real_zeros)
    # The same sums in the same order: bitwise equal, but for the order of the atomics on a GPU. The
    # PyTorch path's vocabulary chunks change with TILE_ELEMENTS, and with them its rounding.
    same_order = {"atol": 0, "rtol": 0} if DEVICE == "cpu" and impl == "triton" else {}
    for need, one, many in zip(needs, whole, sliced):
        assert (one is None) == (many is None) == (not need)
        if need:
            assert many.dtype == one.dtype and torch.isfinite(many).all()
            torch.testing.assert_close(many, one, **same_order)
    dh_bytes = hidden.shape[0] * 32 * 4 if needs[0] else 0
    db_bytes = 700 * 4 if needs[2] else 0
    assert max(fp32_allocations, default=0) <= max(slice_bytes, dh_bytes, db_bytes)


@pytest.mark.parametrize("compact", [True, False], ids=["rows_compacted", "all_rows_visited"])
def test_torch_path_with_and_without_row_compaction(compact, monkeypatch):
    """The chunked path visits every row off-CPU (no host sync); both ways give the same numbers."""
    from halo_ops import chunked

    if not compact:
        monkeypatch.setattr(chunked, "_active_rows", lambda mask: None)
    check_case(Case(ignore_frac=0.4, empty_rows=1, bias=True, softcap=3.0, options={"ignore_index": -100}), "torch")


def _filtered_reference_grads(hidden, weight, bias, targets, upstream, eps, transform):
    """fp64 gradients with softmax probabilities below eps taken as 0: the definition of grad_filter_eps."""
    from halo_ops.transform import LogitTransform

    h, w, b = (t.detach().double() for t in (hidden, weight, bias))
    t = LogitTransform(**transform)
    y = (h @ w.t() + b).requires_grad_()
    z = t.apply(y)
    p = torch.softmax(z, -1).detach()
    valid = targets != -100
    onehot = torch.nn.functional.one_hot(targets.clamp(min=0), z.shape[-1]).double()
    g = torch.where(valid, upstream.double(), 0.0).unsqueeze(-1)
    dz = g * (onehot - torch.where(p >= eps, p, 0.0))
    (dy,) = torch.autograd.grad(z, y, dz)  # dz · dz/dy
    return dy @ w, dy.t() @ h, dy.sum(0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("eps", [1e-4, 1e-2])
def test_grad_filter_eps_is_the_same_function_on_every_path(impl, eps):
    """Both paths compute the filtered gradient exactly (fp32 accuracy), and the forward is untouched."""
    gen = torch.Generator().manual_seed(2)
    n, dim, vocab = 70, 24, 301
    hidden = torch.randn(n, dim, generator=gen).to(DEVICE)
    weight = (torch.randn(vocab, dim, generator=gen) * 0.6).to(DEVICE)  # peaked: most p far below eps
    bias = (torch.randn(vocab, generator=gen) * 0.3).to(DEVICE)
    targets = torch.randint(0, vocab, (n,), generator=gen).to(DEVICE)
    targets[::7] = -100
    upstream = torch.randn(n, generator=gen).to(DEVICE)
    transform = {"logit_scale": 1.0, "softcap": 4.0, "temperature": 1.0}
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = linear_logprobs(leaves[0], leaves[1], targets, leaves[2], impl=impl, grad_filter_eps=eps, **transform)
    (out * upstream).sum().backward()
    exact = linear_logprobs(hidden, weight, targets, bias, impl=impl, **transform)
    torch.testing.assert_close(out.detach(), exact)
    expected = _filtered_reference_grads(hidden, weight, bias, targets, upstream, eps, transform)
    for got, want in zip((t.grad for t in leaves), expected):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    # The case must exercise the filter: the filtered dW differs visibly from the exact one
    w64 = weight.double().requires_grad_()
    unfiltered = linear_logprobs_reference(hidden.double(), w64, targets, bias.double(), **transform).logps
    (exact_dw,) = torch.autograd.grad((unfiltered * upstream.double()).sum(), [w64])
    assert (expected[1] - exact_dw).abs().max() > 1e-4


def test_grad_filter_eps_must_be_non_negative():
    with pytest.raises(ValueError, match="grad_filter_eps"):
        linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), grad_filter_eps=-1.0)


# --- backward schedules: one function, three ways ---------------------------------------------------

SCHEDULES = ["atomic", "owner", "slab", "gemm"]
SCHEDULE_OPTIONS = {
    "plain": {},
    "everything": {"bias": True, "softcap": 4.0, "logit_scale": 1.9, "temperature": 0.8, "ignore_frac": 0.3,
                   "empty_rows": 1},
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", SCHEDULE_OPTIONS)
def test_every_schedule_matches_fp64(schedule, dtype, option):
    check_case(Case(dtype=dtype, **SCHEDULE_OPTIONS[option], options={"schedule": schedule}), "triton")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_with_a_frozen_head_and_filtering(schedule):
    """dH alone (a frozen LM head, the LoRA case) and gradient filtering, against their fp64 definitions."""
    gen = torch.Generator().manual_seed(4)
    n, dim, vocab = 45, 19, 233
    hidden = torch.randn(n, dim, generator=gen).to(DEVICE)
    weight = (torch.randn(vocab, dim, generator=gen) * 0.6).to(DEVICE)
    bias = (torch.randn(vocab, generator=gen) * 0.3).to(DEVICE)
    targets = torch.randint(0, vocab, (n,), generator=gen).to(DEVICE)
    targets[::5] = -100
    upstream = torch.randn(n, generator=gen).to(DEVICE)
    transform = {"logit_scale": 1.0, "softcap": 4.0, "temperature": 1.0}
    for eps in (0.0, 1e-3):
        leaf = hidden.clone().requires_grad_()
        out = linear_logprobs(leaf, weight, targets, bias, impl="triton", schedule=schedule, grad_filter_eps=eps,
                              recompute=True, **transform)
        (out * upstream).sum().backward()
        expected_dh = _filtered_reference_grads(hidden, weight, bias, targets, upstream, eps, transform)[0]
        torch.testing.assert_close(leaf.grad.double(), expected_dh, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("schedule", ["slab", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_slabs_in_slices_and_token_chunks(schedule, dtype, monkeypatch):
    """A slab budget far below the problem: vocabulary slices of 256 columns and chunks of 20 tokens, with the
    dW slice then accumulated in fp32; the same gradients as one slab, every slab element written."""
    from halo_ops.kernels import gemm_schedule, linear_logprobs_backward, slab_backward

    case = Case(batch=1, seq=66, dim=24, vocab=700, bias=True, softcap=3.0, ignore_frac=0.2, dtype=dtype)
    hidden, weight, bias, targets, upstream = case.inputs()
    hidden, targets, upstream = hidden[0], targets[0], upstream[0]
    options = token_options(softcap=3.0, schedule=schedule, return_stats=True)
    forward = triton_forward(hidden, weight, bias, targets, options)
    lse = forward[1]
    grad = torch.where(targets != -100, upstream, 0.0).float()
    grad[:40] = 0.0  # two whole token chunks without gradient: their blocks store zeros without a recompute
    whole = linear_logprobs_backward(hidden, weight, bias, targets, lse, grad, options, (True, True, True))
    itemsize = 4 if schedule == "gemm" else dtype.itemsize  # the GEMM schedule's logits slab is fp32
    budget = 256 * 20 * itemsize
    monkeypatch.setattr(slab_backward, "SLAB_MIN_COLUMNS", 256)  # several slices at this small vocabulary
    assert slab_backward.slab_shape(66, 700, itemsize, budget) == (20, 256)
    monkeypatch.setattr(slab_backward, "SLAB_BYTES", budget)
    monkeypatch.setattr(gemm_schedule, "vocab_splits", lambda *args, **kwargs: 3)  # fold pieces of 2 widths
    sliced = linear_logprobs_backward(hidden, weight, bias, targets, lse, grad, options, (True, True, True))
    for one, many in zip(forward, triton_forward(hidden, weight, bias, targets, options)):  # 3 slices, 4 chunks
        torch.testing.assert_close(tuple(many), tuple(one))
    tolerance = {"atol": 1e-2, "rtol": 1e-2} if dtype == torch.bfloat16 else {"atol": 2e-3, "rtol": 2e-3}
    for one, many in zip(whole, sliced):
        assert many.dtype == one.dtype and torch.isfinite(many).all()
        torch.testing.assert_close(many.float(), one.float(), **(tolerance if dtype != torch.float32 else {}))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fold_and_jacobian_launches_fill_an_h100_twice(dtype, monkeypatch):
    """At the target shape (N=16384, D=4096, V=128256) on 132 SMs, every slab launch of the GEMM schedule's
    forward and of the frozen head's sweep has at least two programs per SM (a row block per 64 tokens of a
    2048-token slab gave 32 programs: a quarter of the GPU)."""
    from types import SimpleNamespace

    from halo_ops.kernels import gemm_schedule, jacobian, slab_backward
    from halo_ops.kernels.config import select_config

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    cuda, n, vocab, dim = torch.device("cuda"), 16384, 128256, 4096
    cfg = select_config("fold", dtype, dim, vocab, "sm_90")
    half = dtype != torch.float32
    for rows, cols in (slab_backward.slab_shape(n, vocab, 4),  # the GEMM schedule's fp32 logits slab
                       slab_backward.slab_shape(jacobian.CHUNK_ROWS, vocab, 4 + (dtype.itemsize if half else 0))):
        slices = [(v0, min(v0 + cols, vocab)) for v0 in range(0, vocab, cols)]
        split_columns, offsets = gemm_schedule.fold_layout(rows, slices, cfg, cuda)
        for k, (v0, v1) in enumerate(slices):
            programs = -(-rows // cfg.block_n) * (offsets[k + 1] - offsets[k])
            assert programs >= 2 * 132, (rows, cols, v1 - v0, split_columns[k])
        exp_programs = -(-rows // cfg.block_n) * -(-cols // cfg.block_v)  # the Jacobian's E tiles
        assert exp_programs >= 2 * 132


def test_schedule_errors():
    hidden, weight, targets = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="schedule must be one of"):
        linear_logprobs(hidden, weight, targets, schedule="fast")
    with pytest.raises(ValueError, match="impl='torch' runs the chunked"):
        linear_logprobs(hidden, weight, targets, impl="torch", schedule="slab")
    with pytest.raises(ValueError, match="deterministic=True takes"):
        linear_logprobs(hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), impl="triton", schedule="atomic",
                        deterministic=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", ["plain", "everything"])
def test_frozen_head_jacobian_matches_recompute_and_fp64(impl, dtype, option, monkeypatch):
    """The frozen head's Jacobian path (two GEMMs) against the recompute path and fp64 ground truth, with small
    chunks (PyTorch) or slabs (Triton: 2 vocabulary slices × 4 token chunks) so that the sweep rescales across
    many pieces of the vocabulary and, on CPU, compacts ignored rows."""
    from halo_ops import chunked
    from halo_ops.kernels import gemm_schedule, jacobian, slab_backward

    monkeypatch.setattr(gemm_schedule, "vocab_splits", lambda *args, **kwargs: 3)  # several fold pieces per slice
    monkeypatch.setattr(chunked, "TOKEN_CHUNK", 16)
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 16 * 32)
    monkeypatch.setattr(slab_backward, "SLAB_BYTES", 256 * 20 * (4 + (dtype.itemsize if dtype != torch.float32 else 0)))
    monkeypatch.setattr(slab_backward, "SLAB_MIN_COLUMNS", 256)
    calls = []
    real = jacobian.jacobian_forward
    monkeypatch.setattr(jacobian, "jacobian_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    case = Case(dtype=dtype, **SCHEDULE_OPTIONS[option])
    hidden, weight, bias, targets, upstream = case.inputs()
    hidden, weight, bias, targets, upstream = (None if t is None else t.to(DEVICE)
                                               for t in (hidden, weight, bias, targets, upstream))
    grads = {}
    for recompute in (True, None):
        leaf = hidden.clone().requires_grad_()
        out = linear_logprobs(leaf, weight, targets, bias, impl=impl, recompute=recompute, return_stats=True,
                              **case.transform)
        (out.logps * upstream).sum().backward()
        grads[recompute] = (out, leaf.grad)
    assert len(calls) == (impl == "triton"), "the Triton path built the Jacobian once"
    (slow, slow_grad), (fast, fast_grad) = grads[True], grads[None]
    torch.testing.assert_close(fast.logps, slow.logps)
    torch.testing.assert_close(fast.entropy, slow.entropy)
    exact_leaf = hidden.double().requires_grad_()
    exact = linear_logprobs_reference(exact_leaf, weight.double(), targets, None if bias is None else bias.double(),
                                      **case.transform).logps
    (exact_grad,) = torch.autograd.grad((exact * upstream.double()).sum(), [exact_leaf])
    plain_leaf = hidden.clone().requires_grad_()
    plain = linear_logprobs_reference(plain_leaf, weight, targets, bias, **case.transform).logps
    (plain_grad,) = torch.autograd.grad((plain * upstream).sum(), [plain_leaf])
    assert fast_grad.dtype == hidden.dtype
    assert_close_to_exact(fast_grad, plain_grad, exact_grad, dtype, "dhidden (Jacobian)")


@pytest.mark.parametrize("impl, schedule", [("torch", "auto"), *(("triton", s) for s in SCHEDULES)])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen_head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_entropy_is_differentiable(impl, schedule, frozen, dtype):
    """The entropy from return_stats=True carries its gradient ∂H/∂z = −p (log p + H) through the same recompute
    (and, for a frozen head, beside the Jacobian): Σ u·logp + w·H against fp64 autograd on every schedule."""
    case = Case(dtype=dtype, bias=True, softcap=3.0, temperature=0.8)
    hidden, weight, bias, targets, upstream = case.inputs()
    entropy_upstream = torch.linspace(-1.0, 2.0, upstream.numel()).view(upstream.shape).to(DEVICE)

    def gradients(fn, tensors):
        leaves = [t.clone().requires_grad_(not (frozen and i > 0)) for i, t in enumerate(tensors)]
        out = fn(*leaves)
        loss = (out.logps * upstream.to(out.logps.dtype) + out.entropy * entropy_upstream.to(out.logps.dtype)).sum()
        return torch.autograd.grad(loss, [t for t in leaves if t.requires_grad])

    options = {} if impl == "torch" else {"schedule": schedule}
    fast = gradients(lambda h, w, b: linear_logprobs(h, w, targets, b, impl=impl, return_stats=True,
                                                     **case.transform, **options), (hidden, weight, bias))
    reference = lambda h, w, b: linear_logprobs_reference(h, w, targets, b, **case.transform)  # noqa: E731
    plain = gradients(reference, (hidden, weight, bias))
    exact = gradients(reference, (hidden.double(), weight.double(), bias.double()))
    for name, g, p, e in zip(("hidden", "weight", "bias"), fast, plain, exact):
        assert_close_to_exact(g, p, e, dtype, f"d{name}")


@pytest.mark.parametrize("n_tokens", [4096, 16384, 262144])
def test_slab_keeps_its_width_and_chunks_tokens_instead(n_tokens):
    """The slab never narrows below SLAB_MIN_COLUMNS (each slice moves the fp32 dH once): many tokens are
    chunked to fit the byte budget instead."""
    from halo_ops.kernels import slab_backward

    rows, cols = slab_backward.slab_shape(n_tokens, 128256, 2)
    assert cols >= slab_backward.SLAB_MIN_COLUMNS and cols % slab_backward.SLAB_COLUMN_MULTIPLE == 0
    assert rows * cols * 2 <= slab_backward.SLAB_BYTES and (rows == n_tokens or rows * cols * 2 > slab_backward.SLAB_BYTES // 2)
    assert slab_backward.slab_shape(64, 700, 2) == (64, 768)  # a small vocabulary: one slice of all of it
