"""The two pieces every path shares: options through torch.library, and the merge of vocabulary partials."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from halo_ops import options as opts
from halo_ops import partials as P
from halo_ops.fused_kto import KTOOptions
from halo_ops.options import TokenOptions
from halo_ops.transform import LogitTransform

from .conftest import DEVICE, IMPLS

finite = st.floats(-1e6, 1e6, allow_nan=False).filter(lambda x: x != 0)


@given(impl=st.sampled_from(["torch", "triton"]), scale=finite, softcap=st.none() | st.floats(1e-3, 1e3),
       temperature=st.floats(1e-3, 1e3), ignore_index=st.integers(-(2**40), 2**40),
       stats=st.lists(st.sampled_from(P.STATISTICS), unique=True).map(P.requested_statistics),
       schedule=st.sampled_from(["atomic", "owner", "slab", "gemm", "chunked"]), eps=st.floats(0, 1))
def test_token_options_survive_the_custom_op_string(impl, scale, softcap, temperature, ignore_index, stats,
                                                    schedule, eps):
    options = TokenOptions(impl, LogitTransform(scale, softcap, temperature), ignore_index, stats, schedule, eps)
    assert opts.decode(opts.encode(options)) == options


def test_kto_options_survive_the_custom_op_string():
    options = KTOOptions(seq=7, beta=0.1, desirable_weight=1.0 / 3, undesirable_weight=1.33, average_log_prob=True,
                         saturation_threshold=1e-9)
    assert opts.decode(opts.encode(options)) == options


@given(cuts=st.lists(st.integers(1, 40), min_size=0, max_size=5), stats=st.booleans(), seed=st.integers(0, 2**16))
def test_merging_pieces_of_the_vocabulary_is_exact(cuts, stats, seed):
    """Partials over any split of the vocabulary merge into the full row's log-prob, logsumexp and statistics."""
    gen = torch.Generator().manual_seed(seed)
    n, vocab = 6, 41
    z = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 5
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[1] = -100
    valid = targets != -100
    bounds = sorted({0, vocab, *cuts})
    pieces = list(zip(bounds[:-1], bounds[1:]))
    partials = P.empty_partials(len(pieces), n, P.STATISTICS if stats else (), torch.float64, "cpu")
    for k, (v0, v1) in enumerate(pieces):
        piece = z[:, v0:v1]
        m = piece.amax(1)
        e = torch.exp(piece - m[:, None])
        partials[P.MAX, k], partials[P.SUM_EXP, k] = m, e.sum(1)
        local = targets - v0
        inside = (local >= 0) & (local < v1 - v0)
        partials[P.TARGET_LOGIT, k] = torch.where(inside, piece.gather(1, local.clamp(0, v1 - v0 - 1)[:, None])[:, 0], 0.0)
        if stats:
            partials[P.CENTERED_SUM, k] = (e * (piece - m[:, None])).sum(1)
            partials[P.LOGIT_SUM, k] = piece.sum(1)
            partials[P.SQ_SUM_EXP, k] = (e * e).sum(1)
            columns = torch.arange(v0, v1)
            before = torch.where(columns[None, :] < targets[:, None], piece, float("-inf"))
            partials[P.MAX_BEFORE_TARGET, k] = before.amax(1)
    logps, lse, token_stats = P.merge_partials(partials, valid, vocab)
    logsm = torch.log_softmax(z, -1)
    expected = torch.where(valid, logsm.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(logps, expected)
    torch.testing.assert_close(lse[valid], torch.logsumexp(z, -1)[valid])
    assert torch.isinf(lse[~valid]).all()
    if stats:
        torch.testing.assert_close(token_stats.entropy, torch.where(valid, -(logsm.exp() * logsm).sum(-1), 0.0))
        torch.testing.assert_close(token_stats.mean_logit, torch.where(valid, z.mean(-1), 0.0))
        torch.testing.assert_close(token_stats.log_sum_sq_probs,
                                   torch.where(valid, torch.logsumexp(2 * logsm, -1), 0.0))
        assert torch.equal(token_stats.is_top1, valid & (z.argmax(-1) == targets))
    else:
        assert token_stats is None


@pytest.mark.parametrize("impl", IMPLS)
def test_is_top1_takes_the_first_argmax_on_ties(impl, monkeypatch):
    """TRL's is_top1: the target is the first maximal logit (torch.argmax), on both paths, across vocabulary pieces."""
    from halo_ops import chunked, linear_logprobs

    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 512 * 64)  # tiles of 64 columns: the two maxima in different ones

    vocab, dim = 300, 4
    weight = torch.zeros(vocab, dim)
    weight[:, 0] = torch.linspace(-1, 1, vocab)
    weight[7, 0] = weight[250, 0] = 3.0  # two equal best logits, far apart
    hidden = torch.tensor([[1.0, 0, 0, 0]] * 3)
    targets = torch.tensor([7, 250, 5])
    out = linear_logprobs(hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), impl=impl, return_stats=True)
    assert out.is_top1.tolist() == [True, False, False]


# --- statistics on demand -------------------------------------------------------------------------------------------

# The partial kind each statistic needs (halo_ops.partials), and its value where nothing was folded into it
NEEDED_KIND = {"entropy": P.CENTERED_SUM, "mean_logit": P.LOGIT_SUM, "log_sum_sq_probs": P.SQ_SUM_EXP,
               "is_top1": P.MAX_BEFORE_TARGET}
EMPTY_VALUE = {P.CENTERED_SUM: 0.0, P.LOGIT_SUM: 0.0, P.SQ_SUM_EXP: 0.0, P.MAX_BEFORE_TARGET: float("-inf")}


def _spy_on_partials(monkeypatch):
    """Record every partials tensor merged (``combine_pieces`` is where every path's partials meet), a copy each."""
    seen, real = [], P.combine_pieces

    def spy(partials):
        seen.append(partials.detach().clone())
        return real(partials)

    monkeypatch.setattr(P, "combine_pieces", spy)
    return seen


def _assert_only_folded(partials, stats):
    """Every kind no statistic in ``stats`` needs holds its empty value in every piece and row; needed ones don't."""
    if not stats:
        assert partials.shape[0] == 3
        return
    for name, kind in NEEDED_KIND.items():
        untouched = bool((partials[kind] == EMPTY_VALUE[kind]).all())
        assert untouched == (name not in stats), f"{name}'s partial {'not ' if untouched else ''}computed"


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["linear", "softcap"])
@pytest.mark.parametrize("stats", [*((name,) for name in P.STATISTICS), ("entropy", "mean_logit"), ()],
                         ids=lambda s: "+".join(s) or "none")
@pytest.mark.parametrize("impl", IMPLS)
def test_only_the_statistics_asked_for_are_computed(impl, stats, softcap, monkeypatch):
    """``return_stats=names``: those statistics, right (against float64), the others None and never computed: their
    partials stay empty (0, or −inf) through the kernel and the merge. Without softcap the mean logit's partial
    comes from the closed form, so the kernels fold nothing for it (their ``STATS`` mask says so)."""
    from halo_ops import chunked, linear_logprobs
    from halo_ops.reference import linear_logprobs_reference

    masks = []
    real_fold = chunked._fold_tile
    monkeypatch.setattr(chunked, "_fold_tile", lambda *a, **k: masks.append(a[3]) or real_fold(*a, **k))
    if impl == "triton":  # the fused forward kernel and the GEMM schedule's fold: whichever the schedule runs
        from halo_ops.kernels import gemm_schedule, linear_logprobs_fwd

        class Spy:
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                return lambda *a, **k: masks.append(k["STATS"]) or self.kernel[grid](*a, **k)

        for module, name in ((linear_logprobs_fwd, "linear_logprobs_fwd_kernel"),
                             (gemm_schedule, "logits_fold_kernel")):
            monkeypatch.setattr(module, name, Spy(getattr(module, name)))
    seen = _spy_on_partials(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(13, 8, generator=gen), torch.randn(50, 8, generator=gen)
    bias = torch.randn(50, generator=gen)
    targets = torch.randint(0, 50, (13,), generator=gen)
    targets[4] = -100
    out = linear_logprobs(hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), bias.to(DEVICE), impl=impl,
                          softcap=softcap, return_stats=stats)
    assert masks and set(masks) == {P.kernel_stats_mask(stats, softcap is not None)}
    if not stats:
        assert isinstance(out, torch.Tensor)
        _assert_only_folded(seen[0], stats)
        return
    exact = linear_logprobs_reference(hidden.double(), weight.double(), targets, bias.double(), softcap=softcap)
    for name in P.STATISTICS:
        value = getattr(out, name)
        if name not in stats:
            assert value is None, name
        elif name == "is_top1":
            assert torch.equal(value.cpu(), exact.is_top1)
        else:
            torch.testing.assert_close(value.double().cpu(), getattr(exact, name), atol=2e-5, rtol=1e-5)
    _assert_only_folded(seen[0], stats)


def test_kernel_stats_mask():
    assert P.kernel_stats_mask((), True) == 0
    assert P.kernel_stats_mask(("mean_logit",), False) == 1  # 7 kinds stored, the closed form gives Σ z
    assert P.kernel_stats_mask(("mean_logit",), True) == 1 | 4
    assert P.kernel_stats_mask(P.STATISTICS, False) == 1 | 2 | 8 | 16


@pytest.mark.parametrize("value, expected", [(True, P.STATISTICS), (False, ()), (None, ()), ("is_top1", ("is_top1",)),
                                             (["mean_logit", "entropy"], ("entropy", "mean_logit"))])
def test_return_stats_values(value, expected):
    assert P.requested_statistics(value) == expected


def test_an_unknown_statistic_is_named():
    from halo_ops import linear_logprobs

    with pytest.raises(ValueError, match="unknown statistic 'mean_logits'; choose among entropy, mean_logit"):
        linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), return_stats=["mean_logits"])


@pytest.mark.parametrize("recompute", [True, None], ids=["recompute", "eager"])
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_losses_compute_only_the_statistics_they_log(impl, recompute, monkeypatch):
    """The fused KTO op folds the entropy alone (the mean logit from its closed form) and still logs TRL's metrics;
    the fused preference op folds no statistic."""
    from halo_ops import fused_linear_kto_loss, fused_linear_preference_loss

    seen = _spy_on_partials(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 6, 8, generator=gen, device=DEVICE, requires_grad=True)
    weight = torch.randn(40, 8, generator=gen, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 40, (4, 6), generator=gen, device=DEVICE)
    ref = torch.zeros(4, device=DEVICE)
    out = fused_linear_kto_loss(hidden, weight, targets, [1, 0, 1, 0], ref, impl=impl, recompute=recompute)
    out.loss.backward()
    assert seen and {"entropy", "logits/chosen", "logits/rejected"} <= set(out.metrics)
    for partials in seen:
        _assert_only_folded(partials, ("entropy", "mean_logit"))
        assert bool((partials[P.LOGIT_SUM, 1:] == 0).all())  # the closed form, in the first piece only
    seen.clear()
    fused_linear_preference_loss(hidden, weight, targets, method="dpo", ref_chosen_logps=ref[:2],
                                 ref_rejected_logps=ref[2:], impl=impl, recompute=recompute).loss.backward()
    assert seen and all(partials.shape[0] == 3 for partials in seen)
