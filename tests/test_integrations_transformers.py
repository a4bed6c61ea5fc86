"""add_fused_lm_head on tiny transformers models: against the model's own logits and TRL's fused head."""

import copy

import pytest
import torch

from ._tiny_models import char_tokenizer, tiny_model
from .conftest import IMPLS

transformers = pytest.importorskip("transformers")
from halo_ops.integrations.transformers import add_fused_lm_head  # noqa: E402

KINDS = ["llama", "gemma2", "tied", "cohere", "mixtral"]
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _batch():
    tok = char_tokenizer()
    enc = tok(["Q: 2+2? A: 4", "Q: sky colour? A: blue"], padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    labels[:, :5] = -100
    return enc.input_ids, enc.attention_mask, labels


def _full_logits_reference(model, ids, mask, labels, temperature=1.0):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double() / temperature
    targets = labels[:, 1:]
    valid = targets != -100
    logp = logits.log_softmax(-1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    log_sum_sq = torch.logsumexp(2 * logp, -1)
    is_top1 = valid & (logits.argmax(-1) == targets)
    return picked * valid, entropy * valid, log_sum_sq * valid, logits.mean(-1) * valid, is_top1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_model_logits_and_trl_fused_head(kind, impl):
    """Every field TRL's head computes, against the model's own logits and TRL's add_fused_lm_head, on both paths;
    the loss backpropagates through log_probs and the entropy (GRPO's entropy bonus), head and backbone."""
    from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head

    ids, mask, labels = _batch()
    ours, theirs = tiny_model(kind), None
    theirs = copy.deepcopy(ours)
    reference = _full_logits_reference(copy.deepcopy(ours), ids, mask, labels)
    add_fused_lm_head(ours, outputs=OUTPUTS, impl=impl)
    trl_add_fused_lm_head(theirs, outputs=OUTPUTS)
    results = []
    for model in (ours, theirs):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        (out.loss - 0.3 * (out.entropy * out.label_mask).sum() / out.label_mask.sum()).backward()
        head = model.get_output_embeddings().weight
        backbone = model.base_model.layers[0].self_attn.q_proj.weight
        results.append((out, head.grad.clone(), backbone.grad.clone()))
    (a, head_a, bb_a), (b, head_b, bb_b) = results
    for field, ref in zip(OUTPUTS, reference):
        if field == "is_top1":
            assert torch.equal(a.is_top1, ref) and torch.equal(a.is_top1, b.is_top1)
            continue
        torch.testing.assert_close(getattr(a, field).double(), ref, atol=2e-5, rtol=1e-5, msg=field)
        torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=2e-5, rtol=1e-5, msg=field)
    assert torch.equal(a.label_mask, b.label_mask)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)
    assert (a.aux_loss is None) == (b.aux_loss is None) == (kind != "mixtral")
    if kind == "mixtral":
        torch.testing.assert_close(a.aux_loss, b.aux_loss)
    torch.testing.assert_close(head_a, head_b, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(bb_a, bb_b, atol=1e-7, rtol=1e-4)


def test_trl_call_forms_temperature_positional_and_fp32_head():
    """TRL's signature: add_fused_lm_head(model, temperature, cast_lm_head_to_fp32, outputs); under bf16 autocast the
    fp32 head gives the fp32 model's numbers, as TRL's does."""
    from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head

    ids, mask, labels = _batch()
    ours = tiny_model("llama")
    theirs = copy.deepcopy(ours)
    add_fused_lm_head(ours, 0.7, True, ("log_probs", "entropy"))
    trl_add_fused_lm_head(theirs, 0.7, True, ("log_probs", "entropy"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = (m(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True) for m in (ours, theirs))
    assert a.log_probs.dtype == torch.float32
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.entropy, b.entropy, atol=1e-5, rtol=1e-5)


def test_temperature():
    ids, mask, labels = _batch()
    model = tiny_model("gemma2")
    reference = _full_logits_reference(copy.deepcopy(model), ids, mask, labels, temperature=0.7)
    add_fused_lm_head(model, temperature=0.7, outputs=OUTPUTS)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(out.log_probs.double(), reference[0], atol=2e-5, rtol=1e-5)


def test_without_flag_the_original_forward_and_generate_run():
    ids, mask, labels = _batch()
    model = tiny_model("llama")
    before = model(input_ids=ids, attention_mask=mask, labels=labels)
    add_fused_lm_head(model)
    after = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(after.logits, before.logits)
    torch.testing.assert_close(after.loss, before.loss)
    generated = model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 3)


def test_shift_labels_and_num_items_in_batch():
    ids, mask, labels = _batch()
    model = tiny_model("llama")
    add_fused_lm_head(model)
    shifted = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    pre = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], shift_labels=labels[:, 1:], fused_lm_head=True,
                num_items_in_batch=7)
    torch.testing.assert_close(pre.log_probs, shifted.log_probs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pre.loss, -shifted.log_probs.sum() / 7)


def test_lora_added_after_the_head():
    peft = pytest.importorskip("peft")
    ids, mask, labels = _batch()
    model = tiny_model("llama")
    add_fused_lm_head(model)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                                      init_lora_weights=False))
    out = lora(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    out.loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        merged = copy.deepcopy(lora).merge_and_unload()
        reference = _full_logits_reference(merged, ids, mask, labels)
    torch.testing.assert_close(out.log_probs.detach().double(), reference[0], atol=2e-5, rtol=1e-5)


def test_unsupported_output_is_an_error():
    with pytest.raises(ValueError, match="top_k"):
        add_fused_lm_head(tiny_model("llama"), outputs=("log_probs", "top_k"))


def _fsdp2_worker(rank, init_file, out_dir):
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = tiny_model("llama", seed=0)
        add_fused_lm_head(model)
        mesh = init_device_mesh("cpu", (2,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        ids, labels = _fsdp2_batch(rank)
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        weight = model.lm_head.weight
        fused_grad = weight.grad.full_tensor()
        model.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()  # the model's own head, under the same FSDP2
        torch.save({"loss": out.loss.detach(), "sharded": type(weight).__name__, "grad": fused_grad,
                    "model_grad": weight.grad.full_tensor()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _fsdp2_batch(rank):
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(4, 90, (2, 12), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, labels


def test_fsdp2_sharded_head(tmp_path):
    """FSDP2 (fully_shard, gloo, 2 CPU processes): the DTensor head is gathered for the call; each rank's loss
    equals an unsharded computation, and the head's gradient equals the model's own head's under the same FSDP2
    (which averages over ranks from torch 2.9 on and sums on gloo before: both are checked against it)."""
    import torch.multiprocessing as mp

    pytest.importorskip("torch.distributed.fsdp", reason="this torch has no FSDP2")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    mp.spawn(_fsdp2_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    assert all(r["sharded"] == "DTensor" for r in results)
    model = tiny_model("llama", seed=0)
    add_fused_lm_head(model)
    losses = []
    for rank in range(2):
        ids, labels = _fsdp2_batch(rank)
        losses.append(model(input_ids=ids, labels=labels, fused_lm_head=True).loss)
    (sum(losses) / 2).backward()
    averaged = model.lm_head.weight.grad
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["loss"], losses[rank].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result["grad"], result["model_grad"], atol=1e-6, rtol=1e-4)
        reduction = (result["model_grad"] * averaged).sum() / (averaged * averaged).sum()  # 1 (mean) or 2 (sum)
        torch.testing.assert_close(result["grad"], reduction.round() * averaged, atol=1e-6, rtol=1e-4)


def _zero3_worker(rank, port, out_dir, mode):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")
    model = tiny_model("llama", seed=0)
    add_fused_lm_head(model)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    partitioned = engine.module.lm_head.weight.numel() == 0
    out = engine(**_zero3_inputs(rank, mode), fused_lm_head=True)
    engine.backward(out.loss)
    torch.save({"loss": out.loss.detach(), "partitioned": partitioned,
                "grad": safe_get_full_grad(engine.module.lm_head.weight)}, os.path.join(out_dir, f"{rank}.pt"))
    # Both ranks leave together: a rank tearing gloo down while the other still talks aborted once in CI
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _zero3_inputs(rank, mode):
    ids, labels = _fsdp2_batch(rank)
    inputs = {"input_ids": ids, "labels": labels}
    if mode == "kto":
        inputs["kto"] = {"labels": torch.tensor([True, False]), "ref_logps": torch.tensor([-40.0, -38.0]),
                         "kl": 0.1, "beta": 0.5}
    return inputs


@pytest.mark.parametrize("mode", ["log_probs", "kto"])
def test_deepspeed_zero3_partitioned_head(mode, tmp_path):
    """ZeRO-3 (gloo, 2 CPU processes): the partitioned head is gathered for the forward and the backward's
    recompute; each rank's loss and the averaged head gradient equal an unsharded computation."""
    pytest.importorskip("deepspeed")
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_zero3_worker, args=(port, str(tmp_path), mode), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    assert all(r["partitioned"] for r in results)
    model = tiny_model("llama", seed=0)
    add_fused_lm_head(model)
    losses = [model(**_zero3_inputs(rank, mode), fused_lm_head=True).loss for rank in range(2)]
    (sum(losses) / 2).backward()  # ZeRO averages gradients over data-parallel ranks
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["loss"], losses[rank].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result["grad"], model.lm_head.weight.grad, atol=1e-6, rtol=1e-4)
