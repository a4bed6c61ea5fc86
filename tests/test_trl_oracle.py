"""TRL's own fused LM head (trl.kernels.ChunkedLogProbFunction) as a peer oracle on CPU."""

import pytest
import torch

from halo_ops import linear_logprobs

from .conftest import DEVICE, IMPLS

trl_kernels = pytest.importorskip("trl.kernels")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "options",
    [{}, {"softcap": 5.0}, {"logit_scale": 0.5, "temperature": 0.7}, {"softcap": 2.0, "logit_scale": 1.5,
                                                                       "temperature": 1.3}],
    ids=["plain", "softcap", "scale_temperature", "all"],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_trl_chunked_logprob(impl, options, with_bias):
    gen = torch.Generator().manual_seed(7)
    n_tokens, dim, vocab = 90, 48, 515
    hidden = torch.randn(n_tokens, dim, generator=gen).to(DEVICE)
    weight = (torch.randn(vocab, dim, generator=gen) * 0.2).to(DEVICE)
    bias = (torch.randn(vocab, generator=gen) * 0.3).to(DEVICE) if with_bias else None
    targets = torch.randint(0, vocab, (n_tokens,), generator=gen).to(DEVICE)
    upstream = torch.randn(n_tokens, generator=gen).to(DEVICE)
    entropy_upstream = torch.randn(n_tokens, generator=gen).to(DEVICE)

    targets[::7] = torch.topk(torch.nn.functional.linear(hidden, weight, bias), 1).indices[::7, 0]  # argmax targets
    fields = ("logps", "entropy", "log_sum_sq_probs", "mean_logit", "is_top1")

    def grads_of(fn):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
        out = fn(*leaves)  # the entropy carries gradient too, as GRPO's entropy bonus needs
        grads = torch.autograd.grad((out[0] * upstream + out[1] * entropy_upstream).sum(), leaves)
        return tuple(x.detach() for x in out), grads

    def ours(h, w, b=None):  # in TRL's order
        out = linear_logprobs(h, w, targets, b, impl=impl, return_stats=True, **options)
        return out.logps, out.entropy, out.log_sum_sq_probs, out.mean_logit, out.is_top1

    def trl(h, w, b=None):
        return trl_kernels.ChunkedLogProbFunction.apply(
            h, w, b, targets, options.get("temperature", 1.0), 128, options.get("softcap"),
            options.get("logit_scale", 1.0), ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))

    (ours_out, ours_grads), (trl_out, trl_grads) = grads_of(ours), grads_of(trl)
    for name, a, b in zip(fields, ours_out, trl_out):
        if name == "is_top1":
            assert torch.equal(a, b) and 0 < int(a.sum()) < len(a), name
        else:
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    for a, b in zip(ours_grads, trl_grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
