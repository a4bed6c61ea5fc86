"""HaloKTOTrainer against TRL's own KTOTrainer on tiny models, offline on CPU."""

import copy
import warnings

import pytest
import torch

from ._tiny_models import char_tokenizer, kto_dataset, tiny_model

trl = pytest.importorskip("trl")
from halo_ops.integrations.trl import HaloKTOTrainer, patch_kto_trainer  # noqa: E402

METRIC_KEYS = {"kl", "entropy", "num_tokens", "logits/chosen", "logits/rejected", "rewards/chosen", "logps/chosen",
               "rewards/rejected", "logps/rejected", "rewards/margins"}


def _config(tmp_path, **overrides):
    options = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "max_steps": 1, "report_to": [],
               "use_cpu": True, "save_strategy": "no", "beta": 0.3, "bf16": False, "logging_steps": 1,
               "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0}
    return trl.KTOConfig(**{**options, **overrides})


def _build(cls, model, ref_model, tmp_path, dataset=None, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model=model, ref_model=ref_model, args=_config(tmp_path, **overrides),
                   train_dataset=dataset or kto_dataset(8), processing_class=char_tokenizer(),
                   **({} if "peft_config" not in overrides else {}))


def _one_batch_step(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    model = trainer.model
    head = model.get_output_embeddings().weight
    backbone = model.base_model.layers[0].self_attn.q_proj.weight
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), metrics, head.grad.clone(), backbone.grad.clone()


def _compare(trl_result, halo_result, *, rtol):
    (loss_a, metrics_a, head_a, bb_a), (loss_b, metrics_b, head_b, bb_b) = trl_result, halo_result
    torch.testing.assert_close(loss_b, loss_a, atol=rtol * 1e-2, rtol=rtol)
    assert set(metrics_b) == set(metrics_a) and METRIC_KEYS <= set(metrics_b)
    # The margin is a difference of two means: its rounding error scales with the terms, not the result
    terms = {"rewards/margins": abs(metrics_a["rewards/chosen"]) + abs(metrics_a["rewards/rejected"])}
    for key, value in metrics_a.items():
        assert metrics_b[key] == pytest.approx(value, rel=rtol, abs=rtol * max(1e-2, terms.get(key, 0.0))), key
    torch.testing.assert_close(head_b, head_a, atol=rtol * head_a.abs().max().item(), rtol=rtol)
    torch.testing.assert_close(bb_b, bb_a, atol=rtol * bb_a.abs().max().item(), rtol=rtol)


# A reference that differs from the policy, chosen so that the KL reference point z0 is active (> 0):
# (seed, factor on the reference head; a sharper reference makes logp_π − logp_ref > 0 on mismatched pairs)
REFERENCE = {"llama": (3, 1.0), "tied": (1, 1.0), "gemma2": (1, 2.0), "mixtral": (3, 1.5)}


def reference_model(kind):
    seed, sharpen = REFERENCE[kind]
    model = tiny_model(kind, seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpen)
    return model


def _pair(kind, tmp_path, **overrides):
    policy, reference = tiny_model(kind, seed=0), reference_model(kind)
    results = []
    for cls in (trl.KTOTrainer, HaloKTOTrainer):
        trainer = _build(cls, copy.deepcopy(policy), copy.deepcopy(reference), tmp_path / cls.__name__, **overrides)
        results.append(_one_batch_step(trainer))
    return results


@pytest.mark.parametrize("kind", ["llama", "gemma2", "tied", "mixtral"])
def test_same_loss_metrics_and_gradients_as_trl(kind, tmp_path):
    trl_result, halo_result = _pair(kind, tmp_path)
    assert trl_result[1]["kl"] > 0 and abs(trl_result[1]["rewards/chosen"]) > 0
    _compare(trl_result, halo_result, rtol=2e-5)


@pytest.mark.parametrize("overrides", [
    {"loss_type": "apo_zero_unpaired"},
    {"desirable_weight": 1.7, "undesirable_weight": 0.6},
], ids=["apo_zero_unpaired", "weights"])
def test_loss_options_match_trl(overrides, tmp_path):
    _compare(*_pair("llama", tmp_path, **overrides), rtol=2e-5)


def test_bf16_autocast_default_matches_trl_within_bf16(tmp_path):
    """transformers' default bf16=True: both run the reference under autocast; TRL also rounds logits to bf16."""
    _compare(*_pair("llama", tmp_path, bf16=True), rtol=2e-2)


def test_lora_without_reference_model(tmp_path):
    peft = pytest.importorskip("peft")
    results = []
    for cls in (trl.KTOTrainer, HaloKTOTrainer):
        lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = cls(model=tiny_model("llama"), ref_model=None, args=_config(tmp_path / cls.__name__),
                          train_dataset=kto_dataset(8), processing_class=char_tokenizer(), peft_config=lora)
        batch = next(iter(trainer.get_train_dataloader()))
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        results.append((loss.detach(), {k: v[-1] for k, v in trainer._metrics["train"].items()}, grads))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    assert metrics_a["kl"] != 0 or metrics_a["rewards/chosen"] != 0  # the adapter moves the policy off the reference
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=2e-5)
    for key in metrics_a:
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=2e-5, abs=1e-7), key
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-7, rtol=1e-4)


def test_precompute_ref_log_probs(tmp_path):
    _compare(*_pair("llama", tmp_path, precompute_ref_log_probs=True), rtol=2e-5)


def test_training_with_accumulation_and_checkpointing_logs_like_trl(tmp_path):
    """Two optimizer steps with gradient accumulation and gradient checkpointing: TRL's log history, reproduced."""
    policy, reference = tiny_model("llama", seed=0), reference_model("llama")
    histories = []
    for cls in (trl.KTOTrainer, HaloKTOTrainer):
        trainer = _build(cls, copy.deepcopy(policy), copy.deepcopy(reference), tmp_path / cls.__name__,
                         max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         gradient_checkpointing=True, learning_rate=1e-2)
        trainer.train()
        histories.append([row for row in trainer.state.log_history if "loss" in row])
    assert len(histories[0]) == len(histories[1]) == 2
    for row_a, row_b in zip(*histories):
        for key in ("loss", "kl", "rewards/chosen", "logps/rejected"):
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-3, abs=1e-5), key


def test_patch_kto_trainer(tmp_path):
    policy, reference = tiny_model("llama", seed=0), reference_model("llama")
    expected = _one_batch_step(_build(trl.KTOTrainer, copy.deepcopy(policy), copy.deepcopy(reference),
                                      tmp_path / "a"))
    trainer = patch_kto_trainer(_build(trl.KTOTrainer, copy.deepcopy(policy), copy.deepcopy(reference),
                                       tmp_path / "b"))
    assert isinstance(trainer, HaloKTOTrainer)
    _compare(expected, _one_batch_step(trainer), rtol=2e-5)


def test_a_few_steps_reduce_the_loss(tmp_path):
    trainer = _build(HaloKTOTrainer, tiny_model("llama", seed=0), tiny_model("llama", seed=0), tmp_path,
                     max_steps=12, learning_rate=3e-3, per_device_train_batch_size=8, beta=0.5)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.01


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("patched", [False, True], ids=["HaloKTOTrainer", "patch_kto_trainer"])
def test_evaluation_with_compute_metrics(patched, tmp_path):
    """compute_metrics gets the logits, as from TRL's own KTOTrainer (which recomputes them with a plain
    forward); evaluating used to fail on FusedCausalLMOutput having no logits."""
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {"first_logit": float(prediction.predictions.reshape(-1)[0])}

    results = {}
    for cls in (trl.KTOTrainer, HaloKTOTrainer):
        build = trl.KTOTrainer if patched else cls
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = build(model=tiny_model("llama", seed=0), ref_model=reference_model("llama"),
                            args=_config(tmp_path / cls.__name__, per_device_eval_batch_size=4),
                            train_dataset=kto_dataset(8), eval_dataset=kto_dataset(4),
                            processing_class=char_tokenizer(), compute_metrics=compute_metrics)
        if patched and cls is HaloKTOTrainer:
            patch_kto_trainer(trainer)
        results[cls] = trainer.evaluate()
        assert len(seen.pop("shape")) == 3  # [batch, sequence, vocabulary] logits
    trl_metrics, halo_metrics = results[trl.KTOTrainer], results[HaloKTOTrainer]
    assert halo_metrics["eval_first_logit"] == pytest.approx(trl_metrics["eval_first_logit"], rel=1e-5)
    assert halo_metrics["eval_loss"] == pytest.approx(trl_metrics["eval_loss"], rel=1e-4)
