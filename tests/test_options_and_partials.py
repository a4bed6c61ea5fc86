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
       temperature=st.floats(1e-3, 1e3), ignore_index=st.integers(-(2**40), 2**40), stats=st.booleans(),
       deterministic=st.booleans(), eps=st.floats(0, 1))
def test_token_options_survive_the_custom_op_string(impl, scale, softcap, temperature, ignore_index, stats,
                                                    deterministic, eps):
    options = TokenOptions(impl, LogitTransform(scale, softcap, temperature), ignore_index, stats, deterministic, eps)
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
    partials = P.empty_partials(len(pieces), n, stats, torch.float64, "cpu")
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
