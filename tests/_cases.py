"""Shared builders and the comparison rule for the log-prob tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from halo_ops import linear_logprobs, linear_logprobs_reference

from .conftest import DEVICE

# Error floor per dtype, relative to the magnitude of the exact value: what one rounding of the
# inputs' dtype costs on sums of a few hundred terms (fp32: 2^-24 · ~100; bf16: 2^-8; fp16: 2^-11).
RTOL_FLOOR = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-10}


def assert_close_to_exact(fast, plain, exact, dtype, what=""):
    """|fast − exact| ≤ 2 · |plain − exact| + floor, in max norm, with exact in float64.

    ``plain`` is the same computation in plain PyTorch and the same dtype: the fast path may be
    as wrong as the straightforward code, twice over, but not more.
    """
    exact = exact.detach().double()
    err_fast = (fast.detach().double() - exact).abs().max().item() if exact.numel() else 0.0
    err_plain = (plain.detach().double() - exact).abs().max().item() if exact.numel() else 0.0
    scale = max(1.0, exact.abs().max().item() if exact.numel() else 0.0)
    bound = 2 * err_plain + RTOL_FLOOR[dtype] * scale
    assert err_fast <= bound, f"{what}: error {err_fast:.3e} > bound {bound:.3e} (plain {err_plain:.3e})"


@dataclass
class Case:
    """One log-prob problem: shapes, options and the share of ignored targets."""

    batch: int = 2
    seq: int = 33
    dim: int = 37
    vocab: int = 301
    dtype: torch.dtype = torch.float32
    bias: bool = False
    softcap: float | None = None
    logit_scale: float = 1.0
    temperature: float = 1.0
    ignore_frac: float = 0.2
    empty_rows: int = 0  # rows whose every target is ignored
    reduction: str = "none"
    seed: int = 0
    options: dict = field(default_factory=dict)

    def inputs(self):
        gen = torch.Generator().manual_seed(self.seed)
        hidden = torch.randn(self.batch, self.seq, self.dim, generator=gen)
        weight = torch.randn(self.vocab, self.dim, generator=gen) / self.dim**0.5 * 2
        bias = torch.randn(self.vocab, generator=gen) * 0.5 if self.bias else None
        targets = torch.randint(0, self.vocab, (self.batch, self.seq), generator=gen)
        ignored = torch.rand(self.batch, self.seq, generator=gen) < self.ignore_frac
        ignored[: self.empty_rows] = True
        targets[ignored] = -100
        grad_shape = (self.batch, self.seq) if self.reduction == "none" else (self.batch,)
        upstream = torch.randn(grad_shape, generator=gen)  # non-uniform, per token or per row
        cast = lambda x: None if x is None else x.to(DEVICE, self.dtype)  # noqa: E731
        return cast(hidden), cast(weight), cast(bias), targets.to(DEVICE), upstream.to(DEVICE)

    @property
    def transform(self):
        return {"logit_scale": self.logit_scale, "softcap": self.softcap, "temperature": self.temperature}


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def _run(fn, hidden, weight, bias, targets, upstream, **kwargs):
    out = fn(hidden, weight, targets, bias, **kwargs)
    logps = out[0] if isinstance(out, tuple) else out
    params = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad((logps * upstream.to(logps.dtype)).sum(), params) if logps.numel() else [
        torch.zeros_like(p) for p in params]
    return out, grads


# How far the target's logit must be from the best other logit for is_top1 to be decided in the inputs' dtype:
# the logits' rounding (bf16: 2^-8 relative on |z| up to about 10)
TOP1_MARGIN = {torch.float32: 1e-4, torch.bfloat16: 0.2, torch.float16: 0.03, torch.float64: 1e-10}


def _top1_margin(exact_in, targets, case: Case):
    """z_target − max_{v ≠ target} z_v in float64 (0 at ignored positions)."""
    from halo_ops.transform import LogitTransform

    hidden, weight, bias = exact_in
    z = LogitTransform(**case.transform).apply(torch.nn.functional.linear(hidden, weight, bias))
    valid = targets != -100
    target = targets.clamp(min=0).unsqueeze(-1)
    picked = z.gather(-1, target).squeeze(-1)
    others = z.scatter(-1, target, float("-inf")).amax(-1)
    return torch.where(valid, picked - others, 0.0)


def check_case(case: Case, impl: str, stats: bool = True):
    """Values, stats and every gradient of ``impl`` against fp64 ground truth, judged by plain PyTorch."""
    hidden, weight, bias, targets, upstream = case.inputs()
    common = {**case.transform, "reduction": case.reduction}
    fast, fast_grads = _run(linear_logprobs, *_leaves(hidden, weight, bias), targets, upstream,
                            impl=impl, return_stats=stats, **common, **case.options)
    plain, plain_grads = _run(linear_logprobs_reference, *_leaves(hidden, weight, bias), targets, upstream, **common)
    exact_in = [None if t is None else t.double() for t in (hidden, weight, bias)]
    exact, exact_grads = _run(linear_logprobs_reference, *_leaves(*exact_in), targets, upstream, **common)

    fast_logps = fast.logps if stats else fast
    assert fast_logps.dtype == torch.float32
    assert fast_logps.shape == exact.logps.shape
    assert_close_to_exact(fast_logps, plain.logps, exact.logps, case.dtype, "logps")
    if stats:
        assert fast.entropy.shape == targets.shape and fast.entropy.requires_grad  # its gradient is tested apart
        assert_close_to_exact(fast.entropy, plain.entropy, exact.entropy, case.dtype, "entropy")
        assert_close_to_exact(fast.mean_logit, plain.mean_logit, exact.mean_logit, case.dtype, "mean_logit")
        assert_close_to_exact(fast.log_sum_sq_probs, plain.log_sum_sq_probs, exact.log_sum_sq_probs, case.dtype,
                              "log_sum_sq_probs")
        assert fast.is_top1.dtype == torch.bool
        decisive = _top1_margin(exact_in, targets, case).abs() > TOP1_MARGIN[case.dtype]
        assert torch.equal(fast.is_top1[decisive], exact.is_top1[decisive]), "is_top1"
    for name, g, p, e, x in zip(("hidden", "weight", "bias"), fast_grads, plain_grads, exact_grads,
                                [t for t in (hidden, weight, bias) if t is not None]):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_close_to_exact(g, p, e, case.dtype, f"d{name}")
    return fast


def token_options(*, impl="triton", ignore_index=-100, logit_scale=1.0, softcap=None, temperature=1.0,
                  return_stats=False, schedule=None, deterministic=False, grad_filter_eps=0.0):
    """The TokenOptions the public functions would build from these keywords (for calling launchers directly);
    the schedule defaults to ``atomic`` (``owner`` with ``deterministic``)."""
    from halo_ops.options import TokenOptions
    from halo_ops.partials import requested_statistics
    from halo_ops.transform import LogitTransform

    return TokenOptions(impl=impl, transform=LogitTransform(logit_scale, softcap, temperature),
                        ignore_index=ignore_index, stats=requested_statistics(return_stats),
                        schedule=schedule or ("owner" if deterministic else "atomic"),
                        grad_filter_eps=grad_filter_eps)


def triton_forward(hidden, weight, bias, targets, options, **launch):
    """The Triton forward launcher's partials, merged as the token op merges them: (logps, lse, TokenStats | None)."""
    from halo_ops.kernels import linear_logprobs_forward
    from halo_ops.partials import merge_partials

    partials = linear_logprobs_forward(hidden, weight, bias, targets, options, **launch)
    return merge_partials(partials, targets != options.ignore_index, weight.shape[0])
