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


# The paired losses: DPO (every loss type Liger has), ORPO, CPO, SimPO, modules and functional forms
from halo_ops.integrations import liger as halo_liger  # noqa: E402

liger_functional = pytest.importorskip("liger_kernel.chunked_loss.functional")
DPO_TYPES = ["sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
             "discopop"]


def _paired_inputs(pairs=3, seq=10, dim=16, vocab=61, bias=True, seed=1):
    hidden, weight, bias_t, target, _, ref_input, ref_weight, ref_bias = _inputs(2 * pairs, seq, dim, vocab, bias, seed)
    return hidden, weight, bias_t, target, ref_input, ref_weight, ref_bias


def _compare(theirs, ours_fn, *, with_bias=True, grad_atol=1e-6):
    """Run Liger's callable and ours on the same leaves: loss, every returned value, every gradient."""
    hidden, weight, bias, target, ref_input, ref_weight, ref_bias = _paired_inputs(bias=with_bias)
    results = []
    for fn in (theirs, ours_fn):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
        loss, values = fn(leaves, target, (ref_input, ref_weight, ref_bias))
        loss.backward()
        results.append((loss, values, [t.grad for t in leaves if t is not None]))
    (their_loss, their_values, their_grads), (loss, values, grads) = results
    torch.testing.assert_close(loss, their_loss, atol=1e-6, rtol=1e-5)
    assert len(values) == len(their_values)
    for mine, other in zip(values, their_values):
        torch.testing.assert_close(torch.as_tensor(mine).float(), torch.as_tensor(other).float(), atol=1e-5, rtol=1e-5)
    for mine, other in zip(grads, their_grads):
        torch.testing.assert_close(mine, other, atol=grad_atol, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_loss_types_match_liger(impl, loss_type):
    smoothing = {"exo_pair": 1e-3, "robust": 0.1}.get(loss_type, 0.0)
    options = {"beta": 0.2, "loss_type": loss_type, "label_smoothing": smoothing}

    def run(module):
        return lambda leaves, target, ref: module(leaves[1], leaves[0], target, leaves[2], *ref)

    _compare(run(liger_kto.LigerFusedLinearDPOLoss(compiled=False, **options)),
             run(halo_liger.LigerFusedLinearDPOLoss(impl=impl, **options)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("use_ref_model, average_log_prob, compute_nll_loss, with_bias",
                         [(False, True, True, True), (True, True, False, False), (False, False, True, False)])
def test_dpo_options_match_liger(impl, use_ref_model, average_log_prob, compute_nll_loss, with_bias):
    options = {"beta": 0.3, "alpha": 0.7, "use_ref_model": use_ref_model, "average_log_prob": average_log_prob,
               "compute_nll_loss": compute_nll_loss}

    def run(module):
        return lambda leaves, target, ref: module(leaves[1], leaves[0], target, leaves[2], *ref)

    _compare(run(liger_kto.LigerFusedLinearDPOLoss(compiled=False, **options)),
             run(halo_liger.LigerFusedLinearDPOLoss(impl=impl, **options)), with_bias=with_bias)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("method, options", [
    ("ORPO", {"beta": 0.4}), ("ORPO", {"beta": 0.2, "compute_nll_loss": False}),
    ("CPO", {"beta": 0.3, "alpha": 0.5, "label_smoothing": 0.1}), ("CPO", {"average_log_prob": True}),
    ("SimPO", {"beta": 2.0, "gamma": 0.3, "label_smoothing": 0.1}), ("SimPO", {"compute_nll_loss": True, "alpha": 0.2}),
])
def test_orpo_cpo_simpo_match_liger(impl, method, options):
    def run(module):
        return lambda leaves, target, ref: module(leaves[1], leaves[0], target, leaves[2])

    _compare(run(getattr(liger_kto, f"LigerFusedLinear{method}Loss")(compiled=False, **options)),
             run(getattr(halo_liger, f"LigerFusedLinear{method}Loss")(impl=impl, **options)))


def test_orpo_nll_target_matches_liger():
    def run(module):
        def call(leaves, target, ref):
            nll_target = target.clone()
            nll_target[:, :6] = -100  # a different NLL span than the preference target's
            return module(leaves[1], leaves[0], target, leaves[2], nll_target)
        return call

    _compare(run(liger_kto.LigerFusedLinearORPOLoss(compiled=False)), run(halo_liger.LigerFusedLinearORPOLoss()))


@pytest.mark.parametrize("name, extra", [
    ("dpo", lambda ref: (*ref, -100, 0.2, True, False, True, True, 1, "robust", 0.1)),
    ("orpo", lambda ref: (-100, 0.3, True, None, False)),
    ("cpo", lambda ref: (-100, 0.3, 0.5, 0.05, True, False, True)),
    ("simpo", lambda ref: (-100, 1.5, 0.5, 0.0, True, False, 0.4)),
])
def test_functional_forms_match_liger(name, extra):
    """Liger's positional orders: liger_fused_linear_<name>(_input, weight, target, bias, ...)."""
    def run(fn):
        return lambda leaves, target, ref: fn(leaves[0], leaves[1], target, leaves[2], *extra(ref))

    _compare(run(getattr(liger_functional, f"liger_fused_linear_{name}")),
             run(getattr(halo_liger, f"liger_fused_linear_{name}")))


def test_functional_kto_matches_liger():
    hidden, weight, bias, target, labels, ref_input, ref_weight, ref_bias = _inputs()
    args = (target, labels, bias, ref_input, ref_weight, ref_bias, torch.tensor(0.2), -100, 0.3, False, True, True)
    theirs = liger_functional.liger_fused_linear_kto(hidden, weight, *args)
    mine = halo_liger.liger_fused_linear_kto(hidden, weight, *args)
    torch.testing.assert_close(mine[0], theirs[0], atol=1e-6, rtol=1e-5)
    for a, b in zip(mine[1], theirs[1]):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-3, rtol=1e-5)


def test_ipo_is_trl_length_normalized():
    """IPO (which Liger does not offer): TRL's per-pair (Δ/len − 1/(2β))², with log-ratios per completion token."""
    hidden, weight, bias, target, ref_input, ref_weight, ref_bias = _paired_inputs()
    loss, (chosen, rejected, *_rest) = halo_liger.LigerFusedLinearDPOLoss(loss_type="ipo", beta=0.25)(
        weight, hidden, target, bias, ref_input, ref_weight, ref_bias)
    full = lambda h, w, b: torch.log_softmax(h.double() @ w.double().t() + b.double(), -1)  # noqa: E731
    mask = target != -100
    pick = lambda lp: (lp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * mask).sum(-1)  # noqa: E731
    policy, ref = pick(full(hidden, weight, bias)), pick(full(ref_input, ref_weight, ref_bias))
    counts = mask.sum(-1).double()
    ratio = (policy - ref) / counts
    half = target.shape[0] // 2
    expected = ((ratio[:half] - ratio[half:] - 1 / (2 * 0.25)) ** 2).mean()
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chosen.double(), policy[:half], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("method", ["DPO", "ORPO", "CPO", "SimPO"])
def test_paired_modules_and_functions_keep_liger_signatures(method):
    import inspect

    mine, theirs = getattr(halo_liger, f"LigerFusedLinear{method}Loss"), getattr(liger_kto, f"LigerFusedLinear{method}Loss")
    their_init = list(inspect.signature(theirs.__init__).parameters.values())
    our_init = list(inspect.signature(mine.__init__).parameters.values())
    assert [(p.name, p.default) for p in our_init[: len(their_init)]] == [(p.name, p.default) for p in their_init]
    assert all(p.kind == p.KEYWORD_ONLY for p in our_init[len(their_init):])
    assert list(inspect.signature(mine.forward).parameters) == list(inspect.signature(theirs.forward).parameters)
    name = f"liger_fused_linear_{method.lower()}"
    their_apply = inspect.signature(getattr(liger_functional, f"LigerFusedLinear{method}Function").forward)
    their_params = [(p.name, p.default) for p in their_apply.parameters.values() if p.name not in ("cls", "ctx")]
    assert [(p.name, p.default) for p in inspect.signature(getattr(halo_liger, name)).parameters.values()] == their_params


@pytest.mark.parametrize("options", [{"loss_type": "invalid_loss_type"}, {"loss_type": "exo_pair"},
                                     {"loss_type": "exo_pair", "label_smoothing": -1e-3},
                                     {"loss_type": "robust", "label_smoothing": 0.5},
                                     {"loss_type": "robust", "label_smoothing": -0.1}],
                         ids=["unknown", "exo_pair_zero", "exo_pair_negative", "robust_half", "robust_negative"])
def test_dpo_errors_keep_liger_words(options):
    """Every check Liger's DPO loss makes raises here too, and its message opens with Liger's words for it (code
    and tests written against Liger match them with pytest.raises(match=...))."""
    from halo_ops.integrations.liger import LigerFusedLinearDPOLoss

    with pytest.raises(ValueError) as theirs:
        liger_kto.LigerFusedLinearDPOLoss(**options)
    liger_words = str(theirs.value).split(". ")[0]  # what Liger says before its own details
    with pytest.raises(ValueError) as ours:
        LigerFusedLinearDPOLoss(**options)
    assert str(ours.value).startswith(liger_words), (str(ours.value), liger_words)
