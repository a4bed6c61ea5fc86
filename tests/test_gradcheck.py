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
