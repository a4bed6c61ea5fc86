"""Vocabulary-parallel heads on gloo (2 and 3 CPU processes): every rank's values and gradients equal the
unsharded computation, with uneven shards, ignored targets, softcap, bias, float64 and float32, on both paths."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from halo_ops import VocabParallel, fused_linear_kto_loss, linear_logprobs

from .conftest import IMPLS

BATCH, SEQ, DIM, VOCAB = 3, 11, 16, 53
# Uneven shards: [0, 20) and [20, 53) for 2 ranks; 10, 21 and 22 rows for 3
BOUNDS = {2: (0, 20, VOCAB), 3: (0, 10, 31, VOCAB)}
CASES = {  # name: (dtype, options)
    "float64 bias+softcap+scale": (torch.float64, {"bias": True, "softcap": 3.0, "logit_scale": 1.3, "temperature": 0.8}),
    "float32 plain": (torch.float32, {}),
    "float32 bias+softcap": (torch.float32, {"bias": True, "softcap": 2.5}),
}


def _data(dtype, bias: bool):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(BATCH, SEQ, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(VOCAB, DIM, generator=gen, dtype=torch.float64) * 0.5
    bias_t = torch.randn(VOCAB, generator=gen, dtype=torch.float64) * 0.3 if bias else None
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    targets[:, :3] = -100
    targets[torch.rand(BATCH, SEQ, generator=gen) < 0.2] = -100
    upstream = torch.randn(BATCH, SEQ, generator=gen, dtype=torch.float64)
    argmax = (hidden @ weight.t() + (0 if bias_t is None else bias_t)).argmax(-1)
    targets[:, 5::3] = argmax[:, 5::3]  # some targets are the argmax: is_top1 has True entries, on several ranks
    kto = {"labels": torch.tensor([True, False, True]), "ref_logps": torch.randn(BATCH, generator=gen,
                                                                                 dtype=torch.float64) - 25.0}
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias_t), targets, cast(upstream), kto


def _run(hidden, weight, bias, targets, upstream, kto, impl, options, vocab_parallel=None):
    """log-probs with statistics, the fused KTO loss and every gradient of both."""
    transform = {k: v for k, v in options.items() if k != "bias"}
    leaves = [None if t is None else t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = linear_logprobs(leaves[0], leaves[1], targets, leaves[2], impl=impl, return_stats=True,
                          vocab_parallel=vocab_parallel, **transform)
    (out.logps * upstream + out.entropy * upstream.flip(-1)).sum().backward()  # the entropy carries gradient too
    grads = [None if t is None else t.grad for t in leaves]
    kto_leaves = [None if t is None else t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = fused_linear_kto_loss(kto_leaves[0], kto_leaves[1], targets, kto["labels"], kto["ref_logps"].to(hidden.dtype),
                                 bias=kto_leaves[2], kl=0.2, beta=0.5, impl=impl, vocab_parallel=vocab_parallel,
                                 **transform)
    loss.loss.backward()
    return {"logps": out.logps.detach(), "entropy": out.entropy.detach(), "mean_logit": out.mean_logit,
            "log_sum_sq_probs": out.log_sum_sq_probs, "is_top1": out.is_top1, "grads": grads,
            "kto_loss": loss.loss.detach(), "kto_metrics": loss.metrics,
            "kto_grads": [None if t is None else t.grad for t in kto_leaves]}


def _worker(rank, world, init_file, impl, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        start, stop = BOUNDS[world][rank], BOUNDS[world][rank + 1]
        results = {}
        for name, (dtype, options) in CASES.items():
            if impl == "triton" and dtype == torch.float64:
                continue
            hidden, weight, bias, targets, upstream, kto = _data(dtype, options.get("bias", False))
            shard = VocabParallel(start, stop)
            results[name] = _run(hidden, weight[start:stop], None if bias is None else bias[start:stop], targets,
                                 upstream, kto, impl, options, vocab_parallel=shard)
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("impl", IMPLS)
def test_every_rank_equals_the_unsharded_head(world, impl, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), impl, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(world)]
    for name, (dtype, options) in CASES.items():
        if impl == "triton" and dtype == torch.float64:
            continue
        hidden, weight, bias, targets, upstream, kto = _data(dtype, options.get("bias", False))
        whole = _run(hidden, weight, bias, targets, upstream, kto, impl, options)
        tight = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 2e-5}
        for rank, got in enumerate(r[name] for r in ranks):
            rows = slice(BOUNDS[world][rank], BOUNDS[world][rank + 1])
            for key in ("logps", "entropy", "mean_logit", "log_sum_sq_probs", "kto_loss"):
                torch.testing.assert_close(got[key], whole[key], **tight, msg=f"{name} rank {rank} {key}")
            assert torch.equal(got["is_top1"], whole["is_top1"]) and got["is_top1"].any()
            for key in ("logps/chosen", "rewards/margins", "entropy", "logits/rejected"):
                torch.testing.assert_close(got["kto_metrics"][key], whole["kto_metrics"][key], equal_nan=True, **tight)
            for grads in ("grads", "kto_grads"):
                mine, full = got[grads], whole[grads]
                torch.testing.assert_close(mine[0], full[0], **tight, msg=f"{name} rank {rank} {grads} hidden")
                torch.testing.assert_close(mine[1], full[1][rows], **tight, msg=f"{name} rank {rank} {grads} weight")
                assert (mine[2] is None) == (full[2] is None)
                if full[2] is not None:
                    torch.testing.assert_close(mine[2], full[2][rows], **tight, msg=f"{name} rank {rank} {grads} bias")


def test_vocab_parallel_errors():
    hidden, weight, targets = torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="start <= stop"):
        VocabParallel(3, 1)
    with pytest.raises(ValueError, match="rows \\[0, 3\\) but this rank's weight has 5 rows"):
        linear_logprobs(hidden, weight, targets, vocab_parallel=VocabParallel(0, 3, vocab=8))
    with pytest.raises(TypeError, match="must be a halo_ops.VocabParallel"):
        linear_logprobs(hidden, weight, targets, vocab_parallel=(0, 5))


def _llama_batch():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(4, 60, (2, 12), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100
    kto = {"labels": torch.tensor([True, False]), "ref_logps": torch.tensor([-40.0, -38.0]), "kl": 0.1, "beta": 0.5}
    return ids, labels, kto


def _train_llama(model, steps=3):
    """A few SGD steps of the fused head's KTO loss then of its log-prob loss; the losses seen."""
    ids, labels, kto = _llama_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, foreach=False)  # DTensor and plain parameters mix
    losses = []
    for step in range(steps):
        kwargs = {"kto": kto} if step % 2 == 0 else {}
        loss = model(input_ids=ids, labels=labels, fused_lm_head=True, **kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def _dtensor_worker(rank, init_file, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from bench.tiny import tiny_model
    from halo_ops.integrations.transformers import add_fused_lm_head

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        hidden, weight, _, targets, upstream, _ = _data(torch.float32, False)
        sharded = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
        leaf = hidden.clone().requires_grad_()
        logps = linear_logprobs(leaf, sharded, targets, impl="torch")
        (logps * upstream).sum().backward()
        model = tiny_model("llama", seed=0, vocab_size=61)  # 31 + 30 rows: uneven torch.chunk shards
        add_fused_lm_head(model)
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})
        head_type = type(model.lm_head.weight).__name__
        from halo_ops import vocab_parallel

        sharded_calls = []  # the model's head runs vocabulary-parallel: never gathered
        real_apply = vocab_parallel._VocabParallelTokens.apply
        vocab_parallel._VocabParallelTokens.apply = lambda *a: sharded_calls.append(1) or real_apply(*a)
        losses = _train_llama(model)
        torch.save({"logps": logps.detach(), "grad_h": leaf.grad, "grad_w": sharded.grad.full_tensor(),
                    "head_type": head_type, "sharded_calls": len(sharded_calls), "losses": losses, "head": model.lm_head.weight.full_tensor().detach(),
                    "q_proj": model.model.layers[0].self_attn.q_proj.weight.detach()},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_dtensor_head_and_a_tensor_parallel_llama(tmp_path):
    """A head that is a DTensor sharded over the vocabulary (Shard(0), as ColwiseParallel leaves it) is taken as
    vocabulary-parallel with no argument; a tiny Llama whose lm_head is parallelized with ColwiseParallel trains
    through the fused head (KTO and log-prob steps) exactly as the unsharded model does."""
    pytest.importorskip("transformers")
    from bench.tiny import tiny_model
    from halo_ops.integrations.transformers import add_fused_lm_head

    mp.spawn(_dtensor_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    hidden, weight, _, targets, upstream, _ = _data(torch.float32, False)
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    logps = linear_logprobs(*leaves, targets, impl="torch")
    (logps * upstream).sum().backward()
    model = tiny_model("llama", seed=0, vocab_size=61)
    add_fused_lm_head(model)
    losses = _train_llama(model)
    for got in ranks:
        assert got["head_type"] == "DTensor" and got["sharded_calls"] == len(losses)
        torch.testing.assert_close(got["logps"], logps.detach(), atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(got["grad_h"], leaves[0].grad, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(got["grad_w"], leaves[1].grad, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(torch.stack(got["losses"]), torch.stack(losses), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["head"], model.lm_head.weight.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["q_proj"], model.model.layers[0].self_attn.q_proj.weight.detach(),
                                   atol=1e-5, rtol=1e-5)
