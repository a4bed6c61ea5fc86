"""fused_linear_preference_loss: the eager schedule (pairs side by side, gradients formed in the forward) against the
recompute schedule (linear_logprobs composed with the loss under autograd) and float64, on both paths."""

import pytest
import torch

from halo_ops import fused_linear_preference_loss

from .conftest import DEVICE, IMPLS

PAIRS, SEQ, DIM, VOCAB = 5, 9, 8, 53
CASES = {
    "dpo_sigmoid": {"method": "dpo", "beta": 0.3, "reference": True},
    "dpo_ipo": {"method": "dpo", "beta": 0.5, "loss_type": "ipo", "reference": True},
    "dpo_robust_softcap": {"method": "dpo", "loss_type": "robust", "label_smoothing": 0.1, "reference": True,
                           "softcap": 3.0, "temperature": 0.9},
    "simpo": {"method": "simpo", "beta": 2.0, "gamma": 0.4, "average_log_prob": True},
    "cpo_nll": {"method": "cpo", "beta": 0.2, "nll_weight": 0.7},
    "orpo_nll": {"method": "orpo", "beta": 0.3, "nll_weight": 1.0, "average_log_prob": True},
}


def _inputs(dtype):
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(2 * PAIRS, SEQ, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(VOCAB, DIM, generator=gen, dtype=torch.float64) * 0.4
    bias = torch.randn(VOCAB, generator=gen, dtype=torch.float64) * 0.2
    targets = torch.randint(0, VOCAB, (2 * PAIRS, SEQ), generator=gen)
    targets[:, :3] = -100
    targets[torch.rand(2 * PAIRS, SEQ, generator=gen) < 0.2] = -100
    targets[:, -1] = 7
    refs = torch.randn(2 * PAIRS, generator=gen, dtype=torch.float64) - 12.0
    cast = lambda x: x.to(DEVICE, dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), targets.to(DEVICE), refs.to(DEVICE)


def _run(case, dtype, impl, recompute, monkeypatch=None):
    options = dict(CASES[case])
    reference = options.pop("reference", False)
    hidden, weight, bias, targets, refs = _inputs(dtype)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    if reference:
        options.update(ref_chosen_logps=refs[:PAIRS], ref_rejected_logps=refs[PAIRS:])
    out = fused_linear_preference_loss(leaves[0], leaves[1], targets, bias=leaves[2], impl=impl, recompute=recompute,
                                       **options)
    out.loss.backward()
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl, dtype", [("torch", torch.float64), ("torch", torch.float32),
                                         ("triton", torch.float32)], ids=str)
def test_eager_equals_recompute(case, impl, dtype, monkeypatch):
    """Chunks of two pairs (three chunks for five pairs), and on the PyTorch path token blocks of 4 and vocabulary
    tiles of 16: the same loss, per-pair values and gradients as the recompute schedule."""
    from halo_ops import chunked, eager, fused_preference

    monkeypatch.setattr(chunked, "TOKEN_CHUNK", 4)
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 4 * 16)
    for name in ("EAGER_BYTES", "EAGER_BYTES_CUDA"):  # room for 4 sequences (2 pairs), not 5
        monkeypatch.setattr(eager, name, 5 * SEQ * eager.eager_row_bytes(impl, VOCAB, dtype) - 1)
    calls = []
    real = fused_preference.eager_forward
    monkeypatch.setattr(fused_preference, "eager_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    slow, slow_grads = _run(case, dtype, impl, recompute=True)
    fast, fast_grads = _run(case, dtype, impl, recompute=None)
    assert len(calls) == 1, "the eager schedule ran once"
    tight = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-6, "rtol": 2e-5}
    for field in ("loss", "losses", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "nll_loss"):
        torch.testing.assert_close(getattr(fast, field), getattr(slow, field), **tight, msg=field)
    for a, b in zip(fast.aux, slow.aux):
        torch.testing.assert_close(a, b, **tight)
    for got, want in zip(fast_grads, slow_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tight)


@pytest.mark.parametrize("impl", IMPLS)
def test_recompute_matches_float64_definition(impl):
    """The DPO loss and its gradients against full float64 logits and TRL's formula."""
    out, grads = _run("dpo_sigmoid", torch.float32, impl, recompute=None)
    hidden, weight, bias, targets, refs = _inputs(torch.float64)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    logsm = torch.log_softmax(leaves[0] @ leaves[1].t() + leaves[2], -1)
    mask = targets != -100
    logps = (logsm.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask).sum(-1)
    ratio = logps - refs
    loss = -torch.nn.functional.logsigmoid(0.3 * (ratio[:PAIRS] - ratio[PAIRS:])).mean()
    loss.backward()
    torch.testing.assert_close(out.loss.double(), loss.detach(), atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, leaves):
        torch.testing.assert_close(got.double(), want.grad, atol=1e-5, rtol=1e-4)


def test_forward_only_and_errors():
    hidden, weight, bias, targets, refs = _inputs(torch.float32)
    with torch.no_grad():
        out = fused_linear_preference_loss(hidden, weight, targets, method="simpo")
    assert out.losses.shape == (PAIRS,) and not out.loss.requires_grad
    with pytest.raises(ValueError, match="method must be one of"):
        fused_linear_preference_loss(hidden, weight, targets, method="kto")
    with pytest.raises(ValueError, match="reference-free"):
        fused_linear_preference_loss(hidden, weight, targets, method="cpo", ref_chosen_logps=refs[:PAIRS])
    with pytest.raises(ValueError, match=r"\[2B, T, D\]"):
        fused_linear_preference_loss(hidden[:3], weight, targets[:3])
    with pytest.raises(ValueError, match="loss_type must be one of"):
        fused_linear_preference_loss(hidden, weight, targets, loss_type="aot")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("recompute", [True, None], ids=["recompute", "eager"])
@pytest.mark.parametrize("empty", ["rejected", "chosen"])
def test_orpo_pair_with_an_empty_completion_is_finite(impl, recompute, empty):
    """ORPO with a completion that has no scored token (log-prob 0, so p = 1 and infinite odds): that pair's
    odds-ratio term is 0 with no gradient, its NLL term stays, every other pair is untouched; loss and gradients
    finite on both schedules (the plain formula gives +inf, Liger NaN)."""
    hidden, weight, bias, targets, _ = _inputs(torch.float32)
    targets[PAIRS + 1 if empty == "rejected" else 1] = -100  # pair 1: no scored token on one side
    options = {"method": "orpo", "beta": 0.3, "nll_weight": 1.0, "average_log_prob": True}
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = fused_linear_preference_loss(leaves[0], leaves[1], targets, bias=leaves[2], impl=impl, recompute=recompute,
                                       **options)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(t.grad).all() for t in leaves)
    assert out.losses[1] == 0 and all(a[1] == 0 for a in out.aux)  # no preference term, log σ and log-odds 0
    # the same loss as the batch without pair 1's odds-ratio term: the other pairs' terms and the NLL term
    keep = [i for i in range(PAIRS) if i != 1]
    rows = keep + [PAIRS + i for i in keep]
    rest = fused_linear_preference_loss(hidden[rows], weight, targets[rows], bias=bias, impl=impl, recompute=True,
                                        **{**options, "nll_weight": 0.0})
    torch.testing.assert_close(out.losses[keep], rest.losses)
    torch.testing.assert_close(out.loss, rest.losses.sum() / PAIRS + out.nll_loss)
