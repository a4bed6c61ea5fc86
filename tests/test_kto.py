"""kto_loss, kto_kl and fused_linear_kto_loss against an independent float64 statement of TRL's KTO."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from halo_ops import FusedLinearKTOLoss, fused_linear_kto_loss, kto_kl, kto_loss, linear_logprobs_reference
from halo_ops.losses.kto import SUM_KEYS

from ._kto_reference import trl_kto
from .conftest import DEVICE, DTYPES, IMPLS

TRL_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "logits/chosen", "logits/rejected", "kl"}


def assert_metrics_match(ours: dict, reference: dict, atol: float):
    """Every TRL metric TRL would log matches; the ones TRL skips (empty set) are NaN here."""
    for key, value in ours.items():
        if key in reference and key != "losses":
            assert abs(value.item() - reference[key].item()) <= atol * max(1.0, abs(reference[key].item())), key
        elif not key.endswith(("_sum", "_tokens")) and not key.startswith("count/"):
            assert math.isnan(value.item()), f"{key} should be NaN when TRL does not log it"


# --- kto_loss: per-sequence log-probs in, TRL's numbers out ----------------------------------------

kto_case = st.fixed_dictionaries({
    "batch": st.integers(1, 12),
    "desirable_share": st.sampled_from([0.0, 0.5, 1.0, 1 / 64]),
    "beta": st.floats(0.01, 5.0),
    "desirable_weight": st.floats(0.0, 3.0),
    "undesirable_weight": st.floats(0.0, 3.0),
    "kl": st.none() | st.floats(-2.0, 4.0),
    "loss_type": st.sampled_from(["kto", "apo_zero_unpaired"]),
    "scale": st.sampled_from([1.0, 50.0]),  # 50: saturated sigmoids
    "seed": st.integers(0, 2**16),
})


def _sequence_inputs(c, dtype=torch.float64):
    gen = torch.Generator().manual_seed(c["seed"])
    policy = (torch.randn(c["batch"], generator=gen, dtype=torch.float64) * c["scale"] - 20).to(dtype)
    ref = (torch.randn(c["batch"], generator=gen, dtype=torch.float64) * c["scale"] - 20).to(dtype)
    labels = torch.rand(c["batch"], generator=gen) < c["desirable_share"]
    if c["desirable_share"] == 1 / 64:
        labels[:] = False
        labels[0] = True
    return policy, ref, labels


@given(c=kto_case)
def test_kto_loss_matches_trl(c):
    policy, ref, labels = _sequence_inputs(c)
    options = {k: c[k] for k in ("beta", "desirable_weight", "undesirable_weight", "loss_type")}
    kl = None if c["kl"] is None else max(c["kl"], 0.0)  # z0 is clamped by kto_kl
    ours_in = policy.clone().requires_grad_()
    out = kto_loss(ours_in, ref, labels, kl=kl, **options)
    out.loss.backward()
    ref_in = policy.clone().requires_grad_()
    loss, metrics = trl_kto(ref_in, ref, labels, kl, **options)
    loss.backward()
    torch.testing.assert_close(out.loss, loss, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, atol=1e-12, rtol=1e-10)
    # TRL concatenates the chosen losses, then the rejected ones
    torch.testing.assert_close(torch.cat((out.losses[labels], out.losses[~labels])), metrics["losses"],
                               atol=1e-12, rtol=1e-10)
    assert_metrics_match(out.metrics, metrics, atol=1e-6)  # metric sums are float32 by design
    torch.testing.assert_close(out.chosen_rewards, c["beta"] * (policy - ref)[labels])


@pytest.mark.parametrize("labels", [[True, False, True], [1, 0, 1], torch.tensor([1, 0, 1], dtype=torch.int8)])
def test_labels_bool_or_01(labels):
    policy, ref = torch.tensor([-3.0, -4.0, -5.0]), torch.tensor([-3.5, -3.0, -5.0])
    out = kto_loss(policy, ref, labels)
    assert out.labels.tolist() == [True, False, True]


@pytest.mark.parametrize("labels, error", [([0, 2, 1], ValueError), ([0.0, 1.0, 1.0], TypeError), ([1, 0], ValueError)])
def test_bad_labels(labels, error):
    with pytest.raises(error, match="labels"):
        kto_loss(torch.zeros(3), torch.zeros(3), labels)


@pytest.mark.parametrize("kwargs, match", [({"loss_type": "sigmoid"}, "loss_type"), ({"beta": -1.0}, "beta"),
                                           ({"desirable_weight": float("nan")}, "desirable_weight")])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kto_loss(torch.zeros(2), torch.zeros(2), [True, False], **kwargs)


def test_empty_batch_is_a_differentiable_zero():
    policy = torch.zeros(0, requires_grad=True)
    out = kto_loss(policy, torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert policy.grad.shape == (0,)
    assert math.isnan(out.metrics["rewards/chosen"].item()) and out.metrics["count/chosen"].item() == 0


def test_kto_kl_is_detached_clamped_mean():
    policy = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    assert kto_kl(policy, torch.tensor([-1.5, -2.5, -3.5])).item() == pytest.approx(0.5)
    z0 = kto_kl(policy, torch.tensor([0.0, 0.0, 0.0]))
    assert z0.item() == 0.0 and not z0.requires_grad


def test_metric_keys_include_trl_names_and_sums():
    out = kto_loss(torch.tensor([-3.0, -4.0]), torch.tensor([-3.0, -4.5]), [True, False],
                   logit_sums=torch.tensor([2.0, 3.0]), token_counts=torch.tensor([2.0, 4.0]))
    assert TRL_KEYS <= set(out.metrics)
    assert {k for k in SUM_KEYS if k not in ("loss_sum", "entropy_sum")} <= set(out.metrics)
    assert out.metrics["logits/chosen"].item() == pytest.approx(1.0)
    assert out.metrics["logits/rejected"].item() == pytest.approx(0.75)


# --- fused_linear_kto_loss: hidden states in -------------------------------------------------------


def _fused_inputs(batch, seq, dim, vocab, dtype, *, ignore_frac=0.3, desirable_share=0.5, bias=False, seed=0,
                  ref_offset=0.5):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) / dim**0.5 * 2
    bias_t = torch.randn(vocab, generator=gen) * 0.3 if bias else None
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    targets[torch.rand(batch, seq, generator=gen) < ignore_frac] = -100
    targets[:, : seq // 3] = -100  # a prompt
    labels = torch.rand(batch, generator=gen) < desirable_share
    ref_logps = torch.randn(batch, generator=gen) * 3 - ref_offset * seq
    cast = lambda x: None if x is None else x.to(DEVICE, dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias_t), targets.to(DEVICE), labels.to(DEVICE), ref_logps.to(DEVICE)


def _reference_fused(hidden, weight, bias, targets, labels, ref_logps, *, kl, transform, average, **options):
    """Full logits → per-sequence log-probs → TRL's KTO, differentiable, in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = linear_logprobs_reference(leaves[0], leaves[1], targets, leaves[2], reduction="mean" if average else "sum",
                                    **transform)
    stats = linear_logprobs_reference(leaves[0].detach(), leaves[1].detach(), targets,
                                      None if bias is None else leaves[2].detach(), **transform)
    mask = (targets != -100).to(out.logps.dtype)
    loss, metrics = trl_kto(out.logps, ref_logps.to(out.logps.dtype), labels.cpu(), kl, mean_logits=stats.mean_logit,
                            completion_mask=mask, entropy=stats.entropy, **options)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None]) if labels.numel() else None
    return loss, grads, metrics


fused_case = st.fixed_dictionaries({
    "batch": st.integers(1, 5),
    "seq": st.integers(3, 24),
    "dim": st.sampled_from([8, 17, 33]),
    "vocab": st.sampled_from([31, 130, 257]),
    "dtype": st.sampled_from(DTYPES),
    "bias": st.booleans(),
    "softcap": st.none() | st.floats(1.0, 20.0),
    "desirable_share": st.sampled_from([0.0, 0.5, 1.0]),
    "beta": st.floats(0.05, 2.0),
    "desirable_weight": st.floats(0.1, 2.0),
    "undesirable_weight": st.floats(0.1, 2.0),
    "kl": st.sampled_from([None, 0.0, 0.7]),
    "loss_type": st.sampled_from(["kto", "apo_zero_unpaired"]),
    "average_log_prob": st.booleans(),
    "seed": st.integers(0, 2**16),
})


def check_fused(c, impl):
    hidden, weight, bias, targets, labels, ref_logps = _fused_inputs(
        c["batch"], c["seq"], c["dim"], c["vocab"], c["dtype"], desirable_share=c["desirable_share"],
        bias=c["bias"], seed=c["seed"], ref_offset=0.1 if c["average_log_prob"] else 0.5)
    if c["average_log_prob"]:
        ref_logps = ref_logps / c["seq"]
    options = {k: c[k] for k in ("beta", "desirable_weight", "undesirable_weight", "loss_type")}
    transform = {"softcap": c["softcap"]}
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = fused_linear_kto_loss(leaves[0], leaves[1], targets, labels, ref_logps, bias=leaves[2], kl=c["kl"],
                                average_log_prob=c["average_log_prob"], impl=impl, **transform, **options)
    grads = torch.autograd.grad(out.loss, [t for t in leaves if t is not None])

    exact_in = [None if t is None else t.double() for t in (hidden, weight, bias)]
    exact_loss, exact_grads, exact_metrics = _reference_fused(
        *exact_in, targets, labels, ref_logps.double(), kl=c["kl"], transform=transform,
        average=c["average_log_prob"], **options)
    plain_loss, plain_grads, _ = _reference_fused(
        hidden, weight, bias, targets, labels, ref_logps, kl=c["kl"], transform=transform,
        average=c["average_log_prob"], **options)

    from ._cases import assert_close_to_exact

    assert_close_to_exact(out.loss, plain_loss, exact_loss, c["dtype"], "loss")
    for name, g, p, e in zip(("hidden", "weight", "bias"), grads, plain_grads, exact_grads):
        assert_close_to_exact(g, p, e, c["dtype"], f"d{name}")
    if c["dtype"] == torch.float32:
        assert_metrics_match(out.metrics, exact_metrics, atol=1e-4)
    return out


@pytest.mark.parametrize("impl", IMPLS)
@given(c=fused_case)
def test_fused_kto_matches_trl_property(impl, c):
    check_fused(c, impl)


BASE = {"batch": 4, "seq": 16, "dim": 24, "vocab": 97, "dtype": torch.float32, "bias": True, "softcap": None,
        "desirable_share": 0.5, "beta": 0.5, "desirable_weight": 1.3, "undesirable_weight": 0.7, "kl": 0.4,
        "loss_type": "kto", "average_log_prob": False, "seed": 3}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", [
    {}, {"desirable_share": 1.0}, {"desirable_share": 0.0}, {"kl": 0.0}, {"kl": None}, {"loss_type": "apo_zero_unpaired"},
    {"average_log_prob": True}, {"softcap": 5.0}, {"dtype": torch.bfloat16}, {"dtype": torch.float16},
], ids=["base", "all_desirable", "all_undesirable", "kl0", "kl_none", "apo", "average", "softcap", "bf16", "fp16"])
def test_fused_kto_cases(impl, variant):
    out = check_fused({**BASE, **variant}, impl)
    assert TRL_KEYS | {"entropy"} <= set(out.metrics)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_kto_extreme_imbalance_one_in_64(impl):
    hidden, weight, _, targets, labels, ref_logps = _fused_inputs(64, 6, 16, 53, torch.float32, desirable_share=0.0)
    labels[17] = True
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    out = fused_linear_kto_loss(*leaves, targets, labels, ref_logps, kl=0.2, desirable_weight=16.0, impl=impl)
    out.loss.backward()
    exact_loss, exact_grads, metrics = _reference_fused(hidden.double(), weight.double(), None, targets, labels,
                                                        ref_logps.double(), kl=0.2, transform={}, average=False,
                                                        beta=0.1, desirable_weight=16.0)
    torch.testing.assert_close(out.loss.double(), exact_loss, atol=1e-6, rtol=1e-5)
    for g, e in zip((leaves[0].grad, leaves[1].grad), exact_grads):
        torch.testing.assert_close(g.double(), e, atol=1e-6, rtol=1e-4)
    assert out.metrics["count/chosen"].item() == 1 and out.metrics["count/rejected"].item() == 63


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_kto_empty_batch(impl):
    hidden = torch.zeros(0, 5, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(11, 8, device=DEVICE, requires_grad=True)
    targets = torch.zeros(0, 5, dtype=torch.long, device=DEVICE)
    out = fused_linear_kto_loss(hidden, weight, targets, torch.zeros(0, dtype=torch.bool, device=DEVICE),
                                torch.zeros(0, device=DEVICE), impl=impl)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.all(weight.grad == 0)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's sigmoid, saturated on purpose
@pytest.mark.parametrize("impl", IMPLS)
def test_saturation_threshold_error_bound(impl):
    """Skipping saturated sequences changes the gradient by at most threshold / B · Σ_skipped ‖∇ logp_i‖."""
    batch, threshold = 6, 0.02
    hidden, weight, _, targets, labels, ref_logps = _fused_inputs(batch, 10, 16, 41, torch.float32, ignore_frac=0.0)
    ref_logps[:3] = ref_logps[:3] - 400 * torch.where(labels[:3], 1.0, -1.0)  # rewards far past the sigmoid's knee

    def weight_grad(**kwargs):
        w = weight.clone().requires_grad_()
        out = fused_linear_kto_loss(hidden, w, targets, labels, ref_logps, beta=0.5, impl=impl, **kwargs)
        out.loss.backward()
        return w.grad, out

    exact, out = weight_grad()
    approx, _ = weight_grad(saturation_threshold=threshold)
    w = weight.detach().double().requires_grad_()
    seq_logps = linear_logprobs_reference(hidden.double(), w, targets, reduction="sum").logps
    skipped = 0.0
    for i in range(batch):
        grad_i = torch.autograd.grad(seq_logps[i], w, retain_graph=True)[0]
        beta_x = 0.5 * (seq_logps[i].item() - ref_logps[i].item()) * (1 if labels[i] else -1)
        dloss = 0.5 * torch.sigmoid(torch.tensor(beta_x)) * torch.sigmoid(torch.tensor(-beta_x))
        if dloss.item() < threshold:
            skipped += threshold / batch * grad_i.norm().item()
    assert skipped > 0, "the case must saturate some sequences"
    assert (approx.double() - exact.double()).norm().item() <= skipped + 1e-6
    assert not torch.equal(approx, exact) or skipped == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_reference_and_kl_forward_only_then_fused_step(impl):
    """The README's KTO step: reference and KL log-probs forward-only, then one fused policy loss."""
    gen = torch.Generator().manual_seed(11)
    batch, seq, dim, vocab = 4, 12, 16, 61
    policy_head = torch.nn.Linear(dim, vocab, bias=False).to(DEVICE)
    ref_head = torch.nn.Linear(dim, vocab, bias=False).to(DEVICE)
    hidden = torch.randn(batch, seq, dim, generator=gen).to(DEVICE).requires_grad_()
    kl_hidden = torch.randn(batch, seq, dim, generator=gen).to(DEVICE)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen).to(DEVICE)
    kl_targets = targets.roll(1, 0)
    labels = torch.tensor([True, False, True, False], device=DEVICE)
    from halo_ops import linear_logprobs

    with torch.no_grad():
        ref_logps = linear_logprobs(hidden, ref_head.weight, targets, reduction="sum", impl=impl)
        ref_kl = linear_logprobs(kl_hidden, ref_head.weight, kl_targets, reduction="sum", impl=impl)
        policy_kl = linear_logprobs(kl_hidden, policy_head.weight, kl_targets, reduction="sum", impl=impl)
    loss_fn = FusedLinearKTOLoss(beta=0.1, impl=impl)
    out = loss_fn(hidden, policy_head.weight, targets, labels, ref_logps, kl=kto_kl(policy_kl, ref_kl))
    out.loss.backward()
    assert policy_head.weight.grad is not None and hidden.grad is not None
    assert out.kl.item() >= 0


def test_sequence_kernel_matches_torch_autograd():
    """The Triton sequence kernel's coefficients and sums equal PyTorch autograd on kto_loss."""
    from halo_ops.kernels import kto_sequence_terms

    gen = torch.Generator().manual_seed(5)
    batch = 2500  # several kernel blocks
    policy = (torch.randn(batch, generator=gen) * 10 - 30).to(DEVICE)
    ref = (torch.randn(batch, generator=gen) * 10 - 30).to(DEVICE)
    labels = (torch.rand(batch, generator=gen) < 0.3).to(DEVICE)
    stats = tuple(torch.rand(batch, generator=gen).to(DEVICE) * k for k in (5.0, 20.0, 7.0))
    kl = torch.tensor(0.3, device=DEVICE)
    losses, coeff, rewards, sums = kto_sequence_terms(policy, ref, labels, kl, beta=0.2, desirable_weight=1.5,
                                                      undesirable_weight=0.5, token_stats=stats)
    logps = policy.double().requires_grad_()
    out = kto_loss(logps, ref.double(), labels, kl=0.3, beta=0.2, desirable_weight=1.5, undesirable_weight=0.5)
    out.loss.backward()
    torch.testing.assert_close(losses.double(), out.losses.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(coeff.double(), logps.grad, atol=1e-9, rtol=1e-5)
    torch.testing.assert_close(rewards.double(), out.rewards, atol=1e-5, rtol=1e-5)
    from halo_ops.losses.kto import metric_sums

    expected = metric_sums(out.losses, out.policy_logps, out.rewards, labels, *stats)
    torch.testing.assert_close(sums, expected.float(), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("switch", [{"deterministic": True}, {"grad_filter_eps": 1e-12}])
def test_fused_kto_backward_switches(impl, switch):
    """deterministic, and a filter below every probability, leave the KTO gradients as they are."""
    hidden, weight, bias, targets, labels, ref_logps = _fused_inputs(3, 12, 16, 67, torch.float32, bias=True)
    grads = []
    for options in ({}, switch):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        out = fused_linear_kto_loss(leaves[0], leaves[1], targets, labels, ref_logps, bias=leaves[2], kl=0.2,
                                    impl=impl, **options)
        out.loss.backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-5)


@given(c=kto_case)
def test_closed_form_coefficient_is_the_gradient(c):
    """kto_terms' closed-form dloss/dlogp (the PyTorch path's backward coefficient) equals autograd's."""
    from halo_ops.losses.kto import kto_terms

    policy, ref, labels = _sequence_inputs(c)
    kl = torch.tensor(0.0 if c["kl"] is None or c["loss_type"] != "kto" else max(c["kl"], 0.0), dtype=torch.float64)
    logps = policy.clone().requires_grad_()
    losses, coeff, _ = kto_terms(logps, ref, labels, kl, c["beta"], c["desirable_weight"], c["undesirable_weight"])
    loss = losses.sum() / max(losses.shape[0], 1)
    loss.backward()
    torch.testing.assert_close(coeff, logps.grad, atol=1e-15, rtol=1e-10)


EAGER_CASES = {
    "plain": {},
    "everything": {"softcap": 3.0, "logit_scale": 1.3, "temperature": 0.9, "average_log_prob": True},
    "saturated": {"saturation_threshold": 1e-3, "beta": 5.0},
    "apo": {"loss_type": "apo_zero_unpaired", "desirable_weight": 1.4},
}


def _count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen_head"])
@pytest.mark.parametrize("case", EAGER_CASES)
@pytest.mark.parametrize("impl, dtype", [("torch", torch.float64), *((impl, dtype) for impl in IMPLS
                                                                      for dtype in (torch.float32, torch.bfloat16))],
                         ids=str)
def test_eager_schedule_equals_recompute(impl, case, dtype, frozen, monkeypatch):
    """The eager schedule (gradients formed in the forward, three GEMMs) and, for a frozen head, the Jacobian
    built in the forward (two) give the recompute schedule's loss, metrics and gradients; chunks of two whole
    sequences, so several chunks run, and on the PyTorch path token blocks of 4 and vocabulary tiles of 16 within
    each chunk."""
    from halo_ops import chunked, eager, fused_kto

    monkeypatch.setattr(chunked, "TOKEN_CHUNK", 4)
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 4 * 16)

    hidden, weight, bias, targets, labels, ref_logps = _fused_inputs(5, 9, 8, 53, dtype, bias=True)
    for name in ("EAGER_BYTES", "EAGER_BYTES_CUDA"):
        monkeypatch.setattr(eager, name, 2 * 9 * eager.eager_row_bytes(impl, 53, dtype))
    calls = _count_calls(monkeypatch, fused_kto, "eager_forward")
    jacobians = _count_calls(monkeypatch, fused_kto, "jacobian_grad")
    results = []
    for recompute in (True, False):  # recompute, then eager (trainable) or the Jacobian (frozen)
        leaves = [t.clone().requires_grad_(not (frozen and t is not hidden)) for t in (hidden, weight, bias)]
        out = fused_linear_kto_loss(leaves[0], leaves[1], targets, labels, ref_logps, bias=leaves[2], kl=0.4,
                                    impl=impl, recompute=recompute, **EAGER_CASES[case])
        out.loss.backward()
        results.append((out, [t.grad for t in leaves]))
    assert (len(calls), len(jacobians)) == ((0, 1) if frozen else (1, 0)), "each schedule ran once"
    (slow, slow_grads), (fast, fast_grads) = results
    tight = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-6, "rtol": 1e-4}
    torch.testing.assert_close(fast.loss, slow.loss, **tight)
    torch.testing.assert_close(fast.losses, slow.losses, **tight)
    for key in ("entropy", "logits/chosen", "logps/rejected"):
        torch.testing.assert_close(fast.metrics[key], slow.metrics[key], equal_nan=True, **tight)
    for got, want in zip(fast_grads, slow_grads):
        assert (got is None) == (want is None)
        if want is not None:
            assert got.dtype == want.dtype
            loose = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else tight
            torch.testing.assert_close(got.float(), want.float(), **loose)


@pytest.mark.parametrize("impl", IMPLS)
def test_eager_schedule_falls_back_for_a_long_sequence_and_under_no_grad(impl, monkeypatch):
    from halo_ops import eager, fused_kto

    hidden, weight, _, targets, labels, ref_logps = _fused_inputs(2, 9, 8, 53, torch.float32)
    calls = _count_calls(monkeypatch, fused_kto, "eager_forward")
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    with torch.no_grad():
        fused_linear_kto_loss(*leaves, targets, labels, ref_logps, impl=impl)
    for name in ("EAGER_BYTES", "EAGER_BYTES_CUDA"):
        monkeypatch.setattr(eager, name, 9 * eager.eager_row_bytes(impl, 53, torch.float32) - 1)
    out = fused_linear_kto_loss(*leaves, targets, labels, ref_logps, impl=impl)  # one sequence no longer fits
    out.loss.backward()
    assert not calls and leaves[1].grad is not None


def test_triton_eager_chunk_stays_within_its_budget(monkeypatch):
    """The Triton eager schedule's slabs (fp32 logits, bf16 dL/dy) take at most the budget, and every other
    buffer it allocates is O(N · D), O(V · D) or smaller: no [N, V] allocation."""
    from halo_ops import eager

    batch, seq, dim, vocab = 6, 9, 8, 301
    hidden, weight, bias, targets, labels, ref_logps = _fused_inputs(batch, seq, dim, vocab, torch.bfloat16, bias=True)
    budget = 2 * seq * eager.eager_row_bytes("triton", vocab, torch.bfloat16)  # two sequences per chunk
    for name in ("EAGER_BYTES", "EAGER_BYTES_CUDA"):
        monkeypatch.setattr(eager, name, budget)
    sizes = []
    for name in ("empty", "zeros", "full"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, **k: (lambda t: sizes.append(
            t.numel() * t.element_size()) or t)(_real(*a, **k)))
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = fused_linear_kto_loss(leaves[0], leaves[1], targets, labels, ref_logps, bias=leaves[2], impl="triton")
    out.loss.backward()
    slabs = sorted(sizes)[-2:]  # the two slabs; below them the fp32 dW [V, D] and dH [N, D]
    assert sum(slabs) <= budget and set(slabs) == {2 * seq * vocab * 4, 2 * seq * vocab * 2}
    assert sorted(sizes)[-3] <= vocab * dim * 4


@pytest.mark.parametrize("impl", IMPLS)
def test_eager_schedule_filters_gradients_as_the_backward_does(impl):
    """grad_filter_eps is the same function on the eager schedule as on the recompute one."""
    hidden, weight, bias, targets, labels, ref_logps = _fused_inputs(4, 9, 8, 53, torch.float32, bias=True)
    grads = []
    for recompute in (True, None):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        out = fused_linear_kto_loss(leaves[0], leaves[1], targets, labels, ref_logps, bias=leaves[2], kl=0.1,
                                    impl=impl, recompute=recompute, grad_filter_eps=2e-2)
        out.loss.backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    unfiltered = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    fused_linear_kto_loss(unfiltered[0], unfiltered[1], targets, labels, ref_logps, bias=unfiltered[2], kl=0.1,
                          impl=impl).loss.backward()
    assert (unfiltered[1].grad - grads[1][1]).abs().max() > 1e-4, "the filter changed the gradient"


@pytest.mark.parametrize("impl", IMPLS)
def test_token_metrics_can_be_skipped(impl):
    """token_metrics=False: the same loss and gradients, without TRL's per-token metrics."""
    hidden, weight, bias, targets, labels, ref_logps = _fused_inputs(3, 12, 16, 67, torch.float32, bias=True)
    results = []
    for token_metrics in (True, False):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        out = fused_linear_kto_loss(leaves[0], leaves[1], targets, labels, ref_logps, bias=leaves[2], kl=0.2,
                                    impl=impl, token_metrics=token_metrics)
        out.loss.backward()
        results.append((out, [t.grad for t in leaves]))
    (full, full_grads), (lean, lean_grads) = results
    assert "entropy" in full.metrics and not {"entropy", "logits/chosen"} & set(lean.metrics)
    torch.testing.assert_close(lean.loss, full.loss)
    torch.testing.assert_close(lean.metrics["rewards/margins"], full.metrics["rewards/margins"])
    for a, b in zip(lean_grads, full_grads):
        torch.testing.assert_close(a, b)


def test_triton_eager_memory_stays_within_its_bound(monkeypatch):
    """With the memory bound the only limit, the chunk gets what the kept gradients leave of it (two sequences
    here), the slabs and the kept gradients fit ``eager_memory_bound``, and dH is kept in the hidden's dtype."""
    from halo_ops import eager

    batch, seq, dim, vocab, dtype = 6, 9, 8, 301, torch.bfloat16
    n_tokens, needs = batch * seq, (True, True, True)
    hidden, weight, bias, targets, labels, ref_logps = _fused_inputs(batch, seq, dim, vocab, dtype, bias=True)
    kept = eager.eager_kept_bytes(n_tokens, dim, vocab, dtype, needs)
    row = eager.eager_row_bytes("triton", vocab, dtype)
    for name in ("EAGER_BYTES", "EAGER_BYTES_CUDA"):
        monkeypatch.setattr(eager, name, 1 << 30)
    gradients = (vocab + n_tokens) * dim * 4  # what the bound counts besides the workspace
    monkeypatch.setattr(eager, "EAGER_WORKSPACE", kept + 3 * seq * row - 1 - gradients)  # room for 2 sequences, not 3
    bound = eager.eager_memory_bound(n_tokens, dim, vocab, dtype)
    sizes = []
    for name in ("empty", "zeros", "full"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, **k: (lambda t: sizes.append(
            (t.numel() * t.element_size(), t.dtype, tuple(t.shape))) or t)(_real(*a, **k)))
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = fused_linear_kto_loss(leaves[0], leaves[1], targets, labels, ref_logps, bias=leaves[2], impl="triton")
    out.loss.backward()
    slabs = [size for size, _, shape in sizes if shape in ((2 * seq, vocab),)]
    assert sorted(slabs) == [2 * seq * vocab * 2, 2 * seq * vocab * 4]  # fp32 logits and bf16 dL/dy
    assert (n_tokens * dim * 2, dtype, (n_tokens, dim)) in sizes  # dH, kept in bf16
    assert (vocab * dim * 4, torch.float32, (vocab, dim)) in sizes  # dW, accumulated in fp32
    assert sum(slabs) + kept <= bound


def test_eager_memory_at_the_target_shape():
    """N=16384, D=4096, V=128256, bf16, on a GPU: the bound is what TRL's head holds in its backward (fp32 dH and dW
    and a 256 MiB logits buffer, 2.46 GiB); beside the kept fp32 dW and bf16 dH it leaves room for one sequence of
    512 tokens per chunk, none of 1024 (those recompute)."""
    from types import SimpleNamespace

    from halo_ops import eager

    n_tokens, dim, vocab, dtype = 16384, 4096, 128256, torch.bfloat16
    hidden = SimpleNamespace(shape=(n_tokens, dim), dtype=dtype, device=torch.device("cuda"))
    weight = SimpleNamespace(shape=(vocab, dim))
    needs = (True, True, False)
    trl_head = 4 * n_tokens * dim + 4 * vocab * dim + 4096 * 32768 * 2  # trl/kernels/chunked_logprob.py, 1.16
    bound = eager.eager_memory_bound(n_tokens, dim, vocab, dtype)
    assert bound == trl_head and round(bound / 2**30, 2) == 2.46
    assert eager.eager_sequences_per_chunk(512, hidden, weight, "triton", needs) == 1
    assert eager.eager_sequences_per_chunk(1024, hidden, weight, "triton", needs) == 0
    slabs = 512 * eager.eager_row_bytes("triton", vocab, dtype)
    assert eager.eager_kept_bytes(n_tokens, dim, vocab, dtype, needs) + slabs <= bound
