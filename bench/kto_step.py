"""The LM-head part of one KTO step, per provider: policy fwd+bwd, policy-KL, reference and reference-KL
forward-only passes, and the loss, as TRL's KTOTrainer runs them (β = 0.1, z0 from the KL pairs).

Each provider is ``step(inputs) -> loss`` and calls ``loss.backward()`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from halo_ops import fused_linear_kto_loss, kto_kl, kto_loss, linear_logprobs

from .providers import (
    HALO_OPTIONS,
    Provider,
    _always,
    _halo_triton_available,
    _needs_module,
    cce_logprobs,
    compiled_logprobs,
    plain_logprobs,
    trl_logprobs,
)

BETA = 0.1


@dataclass
class KTOShape:
    batch: int
    seq: int
    hidden: int
    vocab: int
    dtype: torch.dtype
    peaked: bool = False  # logits like a trained model's (low entropy) instead of random

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def inputs(self, device, seed: int = 0) -> dict:
        gen = torch.Generator().manual_seed(seed)
        scale = (8.0 if self.peaked else 1.0) / self.hidden**0.5

        def randn(*shape, s=1.0):
            return (torch.randn(*shape, generator=gen) * s).to(device, self.dtype)

        targets = torch.randint(0, self.vocab, (self.batch, self.seq), generator=gen)
        targets[:, : self.seq // 4] = -100  # prompts are not scored
        weight = randn(self.vocab, self.hidden, s=scale)
        return {
            "hidden": randn(self.batch, self.seq, self.hidden).requires_grad_(),
            "weight": weight.clone().requires_grad_(),
            "ref_hidden": randn(self.batch, self.seq, self.hidden),
            "ref_weight": weight + randn(self.vocab, self.hidden, s=0.1 * scale),
            "kl_hidden": randn(self.batch, self.seq, self.hidden),
            "ref_kl_hidden": randn(self.batch, self.seq, self.hidden),
            "targets": targets.to(device),
            "kl_targets": targets.roll(1, 0).to(device),
            "labels": (torch.arange(self.batch) % 2 == 0).to(device),
        }


def _sequence_logps(per_token_fn, hidden, weight, targets):
    valid = targets != -100
    per_token = per_token_fn(hidden.flatten(0, 1), weight, targets.clamp(min=0).flatten()).view(targets.shape)
    return (per_token * valid).sum(-1)


def _unfused_step(per_token_fn):
    """Any per-token log-prob function, composed the way TRL's trainer composes its passes."""

    def step(x):
        with torch.no_grad():
            ref = _sequence_logps(per_token_fn, x["ref_hidden"], x["ref_weight"], x["targets"])
            policy_kl = _sequence_logps(per_token_fn, x["kl_hidden"], x["weight"], x["kl_targets"])
            ref_kl = _sequence_logps(per_token_fn, x["ref_kl_hidden"], x["ref_weight"], x["kl_targets"])
        policy = _sequence_logps(per_token_fn, x["hidden"], x["weight"], x["targets"])
        loss = kto_loss(policy, ref, x["labels"], kl=kto_kl(policy_kl, ref_kl), beta=BETA).loss
        loss.backward()
        return loss

    return step


def halo_step(x):
    with torch.no_grad():
        ref = linear_logprobs(x["ref_hidden"], x["ref_weight"], x["targets"], reduction="sum", check_targets=False)
        policy_kl = linear_logprobs(x["kl_hidden"], x["weight"], x["kl_targets"], reduction="sum",
                                    check_targets=False)
        ref_kl = linear_logprobs(x["ref_kl_hidden"], x["ref_weight"], x["kl_targets"], reduction="sum",
                                 check_targets=False)
    out = fused_linear_kto_loss(x["hidden"], x["weight"], x["targets"], x["labels"], ref, kl=kto_kl(policy_kl, ref_kl),
                                beta=BETA, check_targets=False, **HALO_OPTIONS)
    out.loss.backward()
    return out.loss


def halo_torch_step(x):
    with torch.no_grad():
        ref = linear_logprobs(x["ref_hidden"], x["ref_weight"], x["targets"], reduction="sum", impl="torch")
        policy_kl = linear_logprobs(x["kl_hidden"], x["weight"], x["kl_targets"], reduction="sum", impl="torch")
        ref_kl = linear_logprobs(x["ref_kl_hidden"], x["ref_weight"], x["kl_targets"], reduction="sum", impl="torch")
    out = fused_linear_kto_loss(x["hidden"], x["weight"], x["targets"], x["labels"], ref, kl=kto_kl(policy_kl, ref_kl),
                                beta=BETA, impl="torch", **HALO_OPTIONS)
    out.loss.backward()
    return out.loss


def liger_step(x):
    """Liger's LigerFusedLinearKTOLoss (reference pass inside it); the KL pairs through full logits, no_grad,
    as TRL's Liger path computed them. torch.compile only where Liger's default runs (CUDA)."""
    from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss

    with torch.no_grad():
        policy_kl = _sequence_logps(plain_logprobs, x["kl_hidden"], x["weight"], x["kl_targets"])
        ref_kl = _sequence_logps(plain_logprobs, x["ref_kl_hidden"], x["ref_weight"], x["kl_targets"])
    module = LigerFusedLinearKTOLoss(beta=BETA, use_ref_model=True, compiled=x["hidden"].is_cuda)
    loss, _ = module(x["hidden"], x["weight"], x["targets"], None, x["labels"], x["ref_hidden"], x["ref_weight"], None,
                     kto_kl(policy_kl, ref_kl))
    loss.backward()
    return loss


KTO_PROVIDERS = {
    p.name: p
    for p in (
        Provider("halo-ops", halo_step, _halo_triton_available),
        Provider("halo-ops[torch]", halo_torch_step, _always),
        Provider("plain", _unfused_step(plain_logprobs), _always),
        Provider("torch.compile", _unfused_step(compiled_logprobs), _always),
        Provider("trl", _unfused_step(trl_logprobs), _needs_module("trl")),
        Provider("liger", liger_step, _needs_module("liger_kernel")),
        Provider("cce", _unfused_step(cce_logprobs), _needs_module("cut_cross_entropy", cuda_only=True)),
    )
}


def mean_entropy(shape: KTOShape, device) -> float:
    """Mean per-token entropy of the policy's next-token distribution on the benchmark inputs (nats)."""
    x = shape.inputs(device)
    with torch.no_grad():
        out = linear_logprobs(x["hidden"].detach(), x["weight"].detach(), x["targets"], return_stats=True)
    valid = x["targets"] != -100
    return (out.entropy[valid].float().mean()).item()


def _policy_loss(fused: bool, **options):
    """The policy's KTO loss alone (forward and backward; reference and z0 given): the fused op, or the public
    pieces composed, ``linear_logprobs(reduction="sum")`` then ``kto_loss``."""

    def step(x):
        if "_ref" not in x:  # the reference model's log-probs: near the policy's, so no sigmoid saturates
            with torch.no_grad():
                x["_ref"] = linear_logprobs(x["ref_hidden"], x["ref_weight"], x["targets"], reduction="sum",
                                            check_targets=False, impl=options.get("impl", "auto"))
        ref = x["_ref"]
        if fused:
            loss = fused_linear_kto_loss(x["hidden"], x["weight"], x["targets"], x["labels"], ref, kl=0.1, beta=BETA,
                                         check_targets=False, **options).loss
        else:
            policy = linear_logprobs(x["hidden"], x["weight"], x["targets"], reduction="sum", check_targets=False,
                                     **options)
            loss = kto_loss(policy, ref, x["labels"], kl=0.1, beta=BETA).loss
        loss.backward()
        return loss

    return step


# Case "kto-loss": the fused op against composing the public pieces, on each path and schedule
LOSS_PROVIDERS = {
    p.name: p
    for p in (
        Provider("halo-ops[torch]", _policy_loss(True, impl="torch"), _always),
        Provider("halo-ops[torch/recompute]", _policy_loss(True, impl="torch", recompute=True), _always),
        Provider("halo-ops[torch/composed]", _policy_loss(False, impl="torch"), _always),
        Provider("halo-ops", _policy_loss(True), _halo_triton_available),
        Provider("halo-ops[recompute]", _policy_loss(True, recompute=True), _halo_triton_available),
        Provider("halo-ops[composed]", _policy_loss(False), _halo_triton_available),
    )
}
