"""torch.compile of a training step through the ops: no graph break (fullgraph=True), same numbers as eager."""

import pytest
import torch

from halo_ops import fused_linear_kto_loss, linear_logprobs

from .conftest import DEVICE, IMPLS


def _inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 10, 16, generator=gen).to(DEVICE)
    weight = (torch.randn(53, 16, generator=gen) * 0.3).to(DEVICE)
    targets = torch.randint(0, 53, (3, 10), generator=gen).to(DEVICE)
    targets[:, :3] = -100
    return hidden, weight, targets


def _eager_and_compiled(step, *inputs):
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
        loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), [t.grad for t in leaves if t.is_floating_point()]))
    return results


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_step_compiles_without_graph_breaks(impl):
    torch._dynamo.reset()

    def step(hidden, weight, targets):
        logps = linear_logprobs(hidden.tanh(), weight, targets, reduction="mean", softcap=5.0, impl=impl)
        return -(logps * torch.arange(1.0, 4.0, device=logps.device)).sum()

    (eager, eager_grads), (compiled, compiled_grads) = _eager_and_compiled(step, *_inputs())
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_kto_step_compiles_without_graph_breaks(impl):
    torch._dynamo.reset()
    labels = torch.tensor([True, False, True], device=DEVICE)
    ref_logps = torch.tensor([-30.0, -28.0, -31.0], device=DEVICE)

    def step(hidden, weight, targets):
        out = fused_linear_kto_loss(hidden, weight, targets, labels, ref_logps, kl=0.2, beta=0.5, impl=impl)
        return out.loss + 0.0 * out.metrics["rewards/chosen"]

    (eager, eager_grads), (compiled, compiled_grads) = _eager_and_compiled(step, *_inputs())
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)
