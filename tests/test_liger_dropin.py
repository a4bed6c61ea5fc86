"""halo_ops.integrations.liger.LigerFusedLinearKTOLoss against Liger's own module (compiled=False, CPU)."""

import pytest
import torch

from halo_ops.integrations.liger import LigerFusedLinearKTOLoss

from .conftest import DEVICE, IMPLS

liger_kto = pytest.importorskip("liger_kernel.chunked_loss")


def _inputs(batch=6, seq=14, dim=24, vocab=89, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * 0.2
    bias_t = torch.randn(vocab, generator=gen) * 0.1 if bias else None
    target = torch.randint(0, vocab, (batch, seq), generator=gen)
    target[:, :4] = -100
    target[torch.rand(batch, seq, generator=gen) < 0.2] = -100
    target[:, -1] = 3  # every row keeps a scored token (Liger's mean is NaN otherwise)
    labels = torch.tensor([True, False] * (batch // 2))
    ref_input = hidden + 0.3 * torch.randn(batch, seq, dim, generator=gen)
    ref_weight = weight + 0.05 * torch.randn(vocab, dim, generator=gen)
    ref_bias = None if bias_t is None else bias_t + 0.05
    to = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    return [to(x) for x in (hidden, weight, bias_t, target, labels, ref_input, ref_weight, ref_bias)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("use_ref_model", [True, False])
@pytest.mark.parametrize("average_log_prob", [False, True])
@pytest.mark.parametrize("kl", [None, 0.35, -0.2], ids=["kl_none", "kl_pos", "kl_neg"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_liger(impl, use_ref_model, average_log_prob, kl, with_bias):
    hidden, weight, bias, target, labels, ref_input, ref_weight, ref_bias = _inputs(bias=with_bias)
    kl_t = None if kl is None else torch.tensor(kl, device=DEVICE)
    results = []
    for module in (
        liger_kto.LigerFusedLinearKTOLoss(beta=0.3, compiled=False, use_ref_model=use_ref_model,
                                          average_log_prob=average_log_prob),
        LigerFusedLinearKTOLoss(beta=0.3, compiled=False, use_ref_model=use_ref_model,
                                average_log_prob=average_log_prob, impl=impl),
    ):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
        loss, metrics = module(leaves[0], leaves[1], target, leaves[2], labels, ref_input, ref_weight,
                               None if ref_bias is None else ref_bias, kl_t)
        loss.backward()
        results.append((loss, metrics, [t.grad for t in leaves if t is not None]))
    (liger_loss, liger_metrics, liger_grads), (loss, metrics, grads) = results
    torch.testing.assert_close(loss, liger_loss, atol=1e-6, rtol=1e-5)
    assert len(metrics) == len(liger_metrics) == 6
    for ours, theirs in zip(metrics, liger_metrics):
        torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-3, rtol=1e-5)
    for ours, theirs in zip(grads, liger_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-4)


def test_weights_extend_liger():
    """desirable_weight / undesirable_weight (which Liger lacks) scale the per-class losses."""
    hidden, weight, bias, target, labels, *_ = _inputs()
    base, _ = LigerFusedLinearKTOLoss(beta=0.3)(hidden, weight, target, bias, labels)
    doubled, _ = LigerFusedLinearKTOLoss(beta=0.3, desirable_weight=2.0, undesirable_weight=2.0)(
        hidden, weight, target, bias, labels)
    torch.testing.assert_close(doubled, 2 * base)


def test_same_constructor_and_forward_signature_as_liger():
    import inspect

    ours, theirs = LigerFusedLinearKTOLoss, liger_kto.LigerFusedLinearKTOLoss
    their_init = list(inspect.signature(theirs.__init__).parameters.values())
    our_init = list(inspect.signature(ours.__init__).parameters.values())
    assert [(p.name, p.default) for p in our_init[: len(their_init)]] == [(p.name, p.default) for p in their_init]
    assert all(p.kind == p.KEYWORD_ONLY for p in our_init[len(their_init):])
    assert list(inspect.signature(ours.forward).parameters) == list(inspect.signature(theirs.forward).parameters)
