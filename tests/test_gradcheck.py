"""torch.autograd.gradcheck in float64 on the PyTorch path, across the options."""

import pytest
import torch

from halo_ops import chunked, linear_logprobs


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize(
    "options",
    [{}, {"softcap": 1.5}, {"logit_scale": 0.7, "temperature": 1.6}, {"softcap": 3.0, "logit_scale": 2.0}],
    ids=["plain", "softcap", "scale_temperature", "softcap_scale"],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck_torch_path(reduction, options, with_bias, monkeypatch):
    # Small tiles, so gradcheck also covers the token and vocabulary chunk boundaries.
    monkeypatch.setattr(chunked, "TOKEN_CHUNK", 4)
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 4 * 7)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(17, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(17, dtype=torch.float64, generator=gen, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 17, (2, 5), generator=gen)
    targets[0, 1] = targets[1, 3] = -100

    def fn(h, w, b):
        return linear_logprobs(h, w, targets, b, impl="torch", reduction=reduction, **options)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("average_log_prob", [False, True])
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_gradcheck_fused_kto_float64(average_log_prob, loss_type, monkeypatch):
    """float64 stays float64 end to end in the fused KTO op (sequence terms and coefficients included),
    so its gradients pass gradcheck's float64 tolerances, and its outputs are float64."""
    from halo_ops import fused_linear_kto_loss

    monkeypatch.setattr(chunked, "TOKEN_CHUNK", 4)
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 4 * 7)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(13, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(0, 13, (3, 4), generator=gen)
    targets[:, 0] = -100
    labels = torch.tensor([True, False, True])
    ref_logps = torch.randn(3, dtype=torch.float64, generator=gen) - 8

    def fn(h, w, b):
        return fused_linear_kto_loss(h, w, targets, labels, ref_logps, bias=b, kl=0.3, beta=0.7, impl="torch",
                                     desirable_weight=1.3, loss_type=loss_type, average_log_prob=average_log_prob).loss

    out = fused_linear_kto_loss(hidden, weight, targets, labels, ref_logps, bias=bias, impl="torch")
    assert {t.dtype for t in (out.loss, out.losses, out.policy_logps, out.rewards)} == {torch.float64}
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("options", [{}, {"softcap": 1.5, "logit_scale": 0.7, "temperature": 1.6}],
                         ids=["plain", "softcap_scale_temperature"])
def test_gradcheck_frozen_head_jacobian(reduction, options, monkeypatch):
    """A frozen head on the PyTorch path: the Jacobian built in the forward passes gradcheck (with chunk
    boundaries inside the sweep, so the running-max rescaling is exercised)."""
    monkeypatch.setattr(chunked, "TOKEN_CHUNK", 4)
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 4 * 7)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(17, 6, dtype=torch.float64, generator=gen) * 2
    bias = torch.randn(17, dtype=torch.float64, generator=gen)
    targets = torch.randint(0, 17, (2, 5), generator=gen)
    targets[0, 1] = targets[1, 3] = -100
    saved = []
    real = chunked.chunked_forward
    monkeypatch.setattr(chunked, "chunked_forward",
                        lambda *a: saved.append(a[-1].save_jacobian) or real(*a))

    def fn(h):
        return linear_logprobs(h, weight, targets, bias, impl="torch", reduction=reduction, **options)

    assert torch.autograd.gradcheck(fn, (hidden,))
    assert saved and all(saved)
