"""HaloDPOTrainer, HaloSFTTrainer, HaloGRPOTrainer, HaloRLOOTrainer and patch_trainer against TRL's own trainers on
tiny offline models (CPU): the same loss, gradients and logged metrics on the same batch, then a few steps."""

import warnings

import pytest
import torch

from ._tiny_models import BAD, GOOD, PROMPTS, char_tokenizer, tiny_model

trl = pytest.importorskip("trl")
from halo_ops.integrations import trl as halo_trl  # noqa: E402

COMMON = {"per_device_train_batch_size": 4, "max_steps": 2, "report_to": [], "use_cpu": True, "save_strategy": "no",
          "bf16": False, "logging_steps": 1, "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0}


def _preference_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS, "chosen": GOOD, "rejected": BAD})


def _completion_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS, "completion": GOOD})


def _quiet(build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build()


def _build(name, cls, tmp_path, kind="llama", **overrides):
    """A TRL-built trainer (``cls`` the TRL class or its halo-ops form) on a fresh tiny model."""
    model = tiny_model(kind, seed=0)
    args = {**COMMON, "output_dir": str(tmp_path / cls.__name__), **overrides}
    if name == "dpo":
        reference = tiny_model(kind, seed=3)
        return _quiet(lambda: cls(model=model, ref_model=reference, args=trl.DPOConfig(**args),
                                  train_dataset=_preference_dataset(), processing_class=char_tokenizer()))
    if name == "sft":
        return _quiet(lambda: cls(model=model, args=trl.SFTConfig(**args), train_dataset=_completion_dataset(),
                                  processing_class=char_tokenizer()))
    config = {"grpo": trl.GRPOConfig, "rloo": trl.RLOOConfig}[name]
    args.update(num_generations=2, max_completion_length=4, per_device_train_batch_size=2)
    return _quiet(lambda: cls(model=model, reward_funcs=_reward, args=config(**args),
                              train_dataset=_prompt_dataset(), processing_class=char_tokenizer()))


def _reward(completions, **_):
    """A toy reward: longer completions with more vowels score higher."""
    return [float(sum(ch in "aeiou" for ch in c) + 0.1 * len(c)) for c in completions]


def _prompt_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS})


def _one_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    batch = trainer._prepare_inputs(batch) if hasattr(trainer, "_prepare_inputs") else batch
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    head = trainer.model.get_output_embeddings().weight
    backbone = trainer.model.base_model.layers[0].self_attn.q_proj.weight
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), metrics, head.grad.clone(), backbone.grad.clone()


def _assert_same(theirs, ours, rtol=2e-5):
    (loss_a, metrics_a, head_a, bb_a), (loss_b, metrics_b, head_b, bb_b) = theirs, ours
    torch.testing.assert_close(loss_b, loss_a, atol=rtol * 1e-2, rtol=rtol)
    assert set(metrics_b) == set(metrics_a)
    for key, value in metrics_a.items():
        assert metrics_b[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    torch.testing.assert_close(head_b, head_a, atol=rtol * head_a.abs().max().item(), rtol=rtol)
    torch.testing.assert_close(bb_b, bb_a, atol=rtol * bb_a.abs().max().item(), rtol=rtol)


def _halo_head(trainer) -> bool:
    """The policy's forward is halo-ops' fused head."""
    forward = trainer.model.forward
    return getattr(getattr(forward, "__func__", forward), "halo_ops_fused_head", False)


DPO_CASES = {
    "sigmoid": {}, "ipo": {"loss_type": ["ipo"]}, "robust": {"loss_type": ["robust"], "label_smoothing": 0.1},
    "apo_zero": {"loss_type": ["apo_zero"]}, "wpo_weighting": {"use_weighting": True},
    "sft_mix": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
}


@pytest.mark.parametrize("case, kind", [(case, "llama") for case in DPO_CASES] + [("sigmoid", "gemma2")])
def test_dpo_matches_trl(case, kind, tmp_path):
    theirs = _one_batch(_build("dpo", trl.DPOTrainer, tmp_path, kind, **DPO_CASES[case]))
    trainer = _build("dpo", halo_trl.HaloDPOTrainer, tmp_path, kind, **DPO_CASES[case])
    assert _halo_head(trainer)
    _assert_same(theirs, _one_batch(trainer))


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_sft_matches_trl(kind, tmp_path):
    theirs = _one_batch(_build("sft", trl.SFTTrainer, tmp_path, kind))
    trainer = _build("sft", halo_trl.HaloSFTTrainer, tmp_path, kind)
    assert _halo_head(trainer) and "mean_token_accuracy" in theirs[1]
    _assert_same(theirs, _one_batch(trainer))


@pytest.mark.parametrize("name, kind", [("dpo", "llama"), ("sft", "llama"), ("grpo", "llama"), ("grpo", "gemma2"),
                                        ("rloo", "llama")])
def test_a_few_steps_log_what_trl_logs(name, kind, tmp_path):
    """Two optimizer steps (GRPO and RLOO: with generation and a toy reward): the same logged losses and metric
    names as TRL's own trainer (generation draws the same samples from the same seed)."""
    # GRPO's entropy bonus: the entropy's gradient; RLOO with beta=0 (a reference model would be loaded by name)
    overrides = {"grpo": {"entropy_coef": 0.05}, "rloo": {"beta": 0.0}}.get(name, {})
    histories = []
    for cls in (getattr(trl, f"{name.upper() if name != 'sft' else 'SFT'}Trainer"),
                getattr(halo_trl, f"Halo{name.upper() if name != 'sft' else 'SFT'}Trainer")):
        torch.manual_seed(0)
        trainer = _build(name, cls, tmp_path, kind, **overrides)
        _quiet(trainer.train)
        histories.append([row for row in trainer.state.log_history if "loss" in row])
    theirs, ours = histories
    assert len(ours) == len(theirs) == 2
    for a, b in zip(theirs, ours):
        assert set(b) == set(a)
        for key in a:
            if isinstance(a[key], float) and key not in ("learning_rate", "epoch") and "time" not in key:
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key


def test_patch_trainer_switches_a_built_trainer(tmp_path):
    """patch_trainer on a trainer TRL built: halo-ops' head with TRL's arguments, the same numbers."""
    theirs = _build("dpo", trl.DPOTrainer, tmp_path, use_weighting=True)
    expected = _one_batch(_build("dpo", trl.DPOTrainer, tmp_path, use_weighting=True))
    patched = halo_trl.patch_trainer(theirs)
    assert patched is theirs and isinstance(patched, halo_trl.HaloDPOTrainer) and _halo_head(patched)
    _assert_same(expected, _one_batch(patched))
    with pytest.raises(TypeError, match="patch_trainer takes"):
        halo_trl.patch_trainer(object())


def test_same_constructors_as_trl():
    import inspect

    for name in ("DPO", "SFT", "GRPO", "RLOO"):
        ours, theirs = getattr(halo_trl, f"Halo{name}Trainer"), getattr(trl, f"{name}Trainer")
        assert issubclass(ours, theirs) and ours.__name__ == f"Halo{name}Trainer"
        assert inspect.signature(ours.__init__) == inspect.signature(theirs.__init__)


@pytest.mark.parametrize("name", ["dpo", "sft"])
def test_evaluation_with_compute_metrics_works_as_in_trl(name, tmp_path):
    """With compute_metrics set, evaluation hands it the logits as TRL's own trainer does (no crash)."""
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction)
        return {"seen": 1.0}

    results = []
    for cls in (getattr(trl, f"{name.upper()}Trainer"), getattr(halo_trl, f"Halo{name.upper()}Trainer")):
        trainer = _build(name, cls, tmp_path, eval_strategy="no", per_device_eval_batch_size=4)
        trainer.compute_metrics = compute_metrics
        results.append(_quiet(lambda: trainer.evaluate(trainer.train_dataset)))
    theirs, ours = results
    assert set(ours) == set(theirs) and ours["eval_seen"] == 1.0
    assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-4)
