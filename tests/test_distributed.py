"""Data-parallel KTO on gloo, 2 processes on CPU: per-rank results equal a single-process computation.

TRL's trainer takes z0 as the mean over ranks of each rank's mean KL log-ratio, clamped at 0, and
each rank's loss over its own batch; DDP then averages the gradients. The single-process side
computes exactly that from all ranks' data with the float64 reference.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from halo_ops import fused_linear_kto_loss, kto_kl, linear_logprobs, linear_logprobs_reference

from ._kto_reference import trl_kto
from .conftest import IMPLS

WORLD = 2
BETA = 0.3


def rank_data(rank: int):
    """Rank-local batch: policy and KL hidden states, head weights, targets, labels (sizes differ by rank)."""
    gen = torch.Generator().manual_seed(100 + rank)
    batch, seq, dim, vocab = 3 + rank, 10, 16, 47
    data = {
        "hidden": torch.randn(batch, seq, dim, generator=gen),
        "kl_hidden": torch.randn(batch, seq, dim, generator=gen),
        "targets": torch.randint(0, vocab, (batch, seq), generator=gen),
        "labels": torch.arange(batch) % 2 == rank % 2,
    }
    data["targets"][:, :3] = -100
    data["kl_targets"] = data["targets"].roll(1, 0)
    weights = torch.Generator().manual_seed(7)  # the same heads on every rank
    data["weight"] = torch.randn(vocab, dim, generator=weights) * 0.3
    data["ref_weight"] = data["weight"] + 0.1 * torch.randn(vocab, dim, generator=weights)
    return data


def _worker(rank: int, init_file: str, impl: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        d = rank_data(rank)
        with torch.no_grad():
            ref_logps = linear_logprobs(d["hidden"], d["ref_weight"], d["targets"], reduction="sum", impl=impl)
            policy_kl = linear_logprobs(d["kl_hidden"], d["weight"], d["kl_targets"], reduction="sum", impl=impl)
            ref_kl = linear_logprobs(d["kl_hidden"], d["ref_weight"], d["kl_targets"], reduction="sum", impl=impl)
        z0 = kto_kl(policy_kl, ref_kl)  # default group: all-reduced
        weight = d["weight"].clone().requires_grad_()
        out = fused_linear_kto_loss(d["hidden"], weight, d["targets"], d["labels"], ref_logps, kl=z0, beta=BETA,
                                    impl=impl)
        out.loss.backward()
        torch.save({"loss": out.loss.detach(), "z0": z0, "grad": weight.grad}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("impl", IMPLS)
def test_two_rank_gloo_matches_single_process(impl, tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), impl, str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]

    def seq_logps(hidden, weight, targets):
        return linear_logprobs_reference(hidden.double(), weight.double(), targets, reduction="sum").logps

    data = [rank_data(rank) for rank in range(WORLD)]
    per_rank_means = [(seq_logps(d["kl_hidden"], d["weight"], d["kl_targets"])
                       - seq_logps(d["kl_hidden"], d["ref_weight"], d["kl_targets"])).mean() for d in data]
    z0 = torch.stack(per_rank_means).mean().clamp(min=0)
    assert z0 > 0, "pick data where the reference point is active"
    for d, result in zip(data, results):
        torch.testing.assert_close(result["z0"].double(), z0, atol=1e-5, rtol=1e-5)
        weight = d["weight"].double().requires_grad_()
        policy = linear_logprobs_reference(d["hidden"].double(), weight, d["targets"], reduction="sum").logps
        loss, _ = trl_kto(policy, seq_logps(d["hidden"], d["ref_weight"], d["targets"]), d["labels"], z0, beta=BETA)
        loss.backward()
        torch.testing.assert_close(result["loss"].double(), loss.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(result["grad"].double(), weight.grad, atol=1e-6, rtol=1e-4)
