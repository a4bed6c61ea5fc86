"""Bad input gets an error that names the argument and the problem."""

import pytest
import torch

from halo_ops import linear_logprobs

from .conftest import DEVICE, IMPLS


def inputs(n=6, dim=8, vocab=20):
    return torch.randn(n, dim, device=DEVICE), torch.randn(vocab, dim, device=DEVICE), torch.randint(
        0, vocab, (n,), device=DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
def test_mismatched_hidden_dim(impl):
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match="share D"):
        linear_logprobs(hidden[:, :5], weight, targets, impl=impl)


@pytest.mark.parametrize("bad", [-1, 20, 1000])
def test_target_out_of_range(bad):
    hidden, weight, targets = inputs()
    targets[2] = bad
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 20\).*e\.g\. " + str(bad)):
        linear_logprobs(hidden, weight, targets)


def test_target_check_can_be_turned_off_and_ignore_index_is_allowed():
    hidden, weight, targets = inputs()
    targets[1] = -100
    linear_logprobs(hidden, weight, targets)
    linear_logprobs(hidden, weight, targets, check_targets=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_targets(dtype):
    hidden, weight, targets = inputs()
    with pytest.raises(TypeError, match="targets must hold integer token ids"):
        linear_logprobs(hidden, weight, targets.to(dtype))


def test_targets_shape():
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match="already shifted"):
        linear_logprobs(hidden, weight, targets[:-1])


def test_bias_shape():
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match=r"bias must have shape \[V=20\]"):
        linear_logprobs(hidden, weight, targets, torch.zeros(19, device=DEVICE))


def test_weight_must_be_2d():
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match="weight must be 2-D"):
        linear_logprobs(hidden, weight[None], targets)


def test_mixed_dtypes():
    hidden, weight, targets = inputs()
    with pytest.raises(TypeError, match="must share a dtype"):
        linear_logprobs(hidden.half(), weight, targets)


def test_integer_hidden():
    hidden, weight, targets = inputs()
    with pytest.raises(TypeError, match="hidden must be float"):
        linear_logprobs(hidden.long(), weight.long(), targets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_mixed_devices():
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match="one device"):
        linear_logprobs(hidden.cpu(), weight.cuda(), targets.cpu())


def test_mixed_devices_meta():
    """Mixed devices are caught before any computation (meta tensors stand in for a second device on CPU)."""
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match=r"one device, got hidden=.*weight=meta"):
        linear_logprobs(hidden, weight.to("meta"), targets, check_targets=False)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the unchecked call computes with NaN on purpose
@pytest.mark.parametrize("name", ["hidden", "weight", "bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_when_checked(name, value):
    hidden, weight, targets = inputs()
    tensors = {"hidden": hidden, "weight": weight, "bias": torch.zeros(20, device=DEVICE)}
    tensors[name][0] = value
    kind = "NaN" if value != value else "inf"
    with pytest.raises(ValueError, match=f"{name} contains {kind}"):
        linear_logprobs(tensors["hidden"], tensors["weight"], targets, tensors["bias"], check_finite=True)
    linear_logprobs(tensors["hidden"], tensors["weight"], targets, tensors["bias"])  # off by default


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reduction": "max"}, "reduction must be one of"),
        ({"impl": "cuda"}, "impl must be one of"),
        ({"temperature": 0.0}, "temperature must be positive"),
        ({"softcap": -1.0}, "softcap must be None or a positive"),
        ({"logit_scale": float("nan")}, "logit_scale must be a finite"),
    ],
)
def test_bad_options(kwargs, match):
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match=match):
        linear_logprobs(hidden, weight, targets, **kwargs)


def test_triton_rejects_float64():
    hidden, weight, targets = inputs()
    with pytest.raises(TypeError, match="use impl='torch' for float64"):
        linear_logprobs(hidden.double(), weight.double(), targets, impl="triton")


def test_auto_takes_torch_path_for_float64():
    hidden, weight, targets = inputs()
    out = linear_logprobs(hidden.double(), weight.double(), targets, impl="auto")
    assert out.dtype == torch.float64
