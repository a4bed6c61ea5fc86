"""Every ```python block of README.md runs against the installed package.

A block may use names it takes as given (``model``, ``hidden``, ``targets``...). Each such block matches one
scaffold below, which defines those names on tiny models built from configs, in-memory datasets and random
tensors, and nothing else: the block's own lines run as written. A block that matches no scaffold runs in an
empty namespace, so a new block with an undefined name fails here until it gets one.
"""

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ._tiny_models import char_tokenizer, kto_dataset, tiny_model

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def _token_batch(vocab: int, batch: int = 4, length: int = 12, seed: int = 0):
    """input_ids [B, T] and labels [B, T] with -100 on a 3-token prompt."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab, (batch, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :3] = -100
    return input_ids, labels


def _token_logprobs_scaffold():
    model = tiny_model("llama")
    input_ids, labels = _token_batch(model.config.vocab_size)
    return {"model": model, "input_ids": input_ids, "labels": labels}


def _kto_scaffold():
    policy, ref_model = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    input_ids, labels = _token_batch(policy.config.vocab_size)
    kl_ids = input_ids.roll(1, dims=0)  # mismatched pairs: each completion under another prompt
    with torch.no_grad():
        ref_hidden = ref_model.model(input_ids).last_hidden_state[:, :-1]
        kl_hidden = policy.model(kl_ids).last_hidden_state[:, :-1]
        ref_kl_hidden = ref_model.model(kl_ids).last_hidden_state[:, :-1]
    return {"policy": policy, "ref_model": ref_model, "hidden": policy.model(input_ids).last_hidden_state[:, :-1],
            "ref_hidden": ref_hidden, "kl_hidden": kl_hidden, "ref_kl_hidden": ref_kl_hidden,
            "targets": labels[:, 1:], "kl_targets": labels[:, 1:], "labels": torch.tensor([True, False, True, False])}


def _dpo_scaffold():
    B, T, D, V = 2, 8, 16, 50
    torch.manual_seed(0)
    _, labels = _token_batch(V, batch=2 * B, length=T + 1)
    return {"B": B, "hidden": torch.randn(2 * B, T, D, requires_grad=True), "weight": torch.randn(V, D),
            "targets": labels[:, 1:], "ref_logps": -30 * torch.rand(2 * B)}


def _trainer_scaffold():
    return {"model": tiny_model("llama", seed=0), "ref_model": tiny_model("llama", seed=1),
            "dataset": kto_dataset(8), "tokenizer": char_tokenizer()}


SCAFFOLDS = {  # a phrase only that block has -> the names it takes as given
    "model.model(input_ids)": _token_logprobs_scaffold,
    "FusedLinearKTOLoss(": _kto_scaffold,
    "dpo_losses(": _dpo_scaffold,
    "HaloKTOTrainer(model=": _trainer_scaffold,
}
VOCAB_PARALLEL = "VocabParallel(start, stop"


def _scaffold_for(block: str):
    matches = [scaffold for phrase, scaffold in SCAFFOLDS.items() if phrase in block]
    assert len(matches) <= 1, "a README block matches two scaffolds"
    return matches[0]() if matches else {}


def test_readme_has_the_blocks_the_scaffolds_serve():
    for phrase in [*SCAFFOLDS, VOCAB_PARALLEL]:
        assert sum(phrase in block for block in BLOCKS) == 1, phrase


@pytest.mark.parametrize("block", [b for b in BLOCKS if VOCAB_PARALLEL not in b],
                         ids=lambda b: b.strip().splitlines()[-1][:40])
def test_readme_block_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a trainer's output_dir lands here
    namespace = _scaffold_for(block)
    exec(compile(block, "<README.md block>", "exec"), namespace)
    for value in namespace.values():  # what the block computed is finite
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.isfinite(value).all()


def _vocab_parallel_worker(rank: int, world: int, init_file: str, block: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # every rank: the same full inputs and head
        B, T, D, V = 4, 3, 16, 40
        hidden, weight, bias = torch.randn(B, T, D), torch.randn(V, D), torch.randn(V)
        targets = torch.randint(0, V, (B, T))
        start, stop = rank * V // world, (rank + 1) * V // world
        namespace = {"start": start, "stop": stop, "tp_group": dist.group.WORLD, "hidden": hidden,
                     "weight_shard": weight[start:stop], "bias_shard": bias[start:stop], "targets": targets,
                     "labels": torch.tensor([True, False, True, False]), "ref_logps": -5 * torch.rand(B)}
        exec(compile(block, "<README.md block>", "exec"), namespace)
        from halo_ops import linear_logprobs
        torch.testing.assert_close(namespace["logps"], linear_logprobs(hidden, weight, targets, bias))
        assert torch.isfinite(namespace["out"].loss)
    finally:
        dist.destroy_process_group()


def test_readme_vocab_parallel_block_runs_on_two_ranks(tmp_path):
    (block,) = [b for b in BLOCKS if VOCAB_PARALLEL in b]
    mp.spawn(_vocab_parallel_worker, args=(2, str(tmp_path / "init"), block), nprocs=2, join=True)
