"""TRL's trainers on halo-ops: ``HaloKTOTrainer``, ``HaloDPOTrainer``, ``HaloSFTTrainer``, ``HaloGRPOTrainer``,
``HaloRLOOTrainer`` (drop-in subclasses: same constructors and configs) and ``patch_trainer``.

    from halo_ops.integrations.trl import HaloDPOTrainer   # instead of trl.DPOTrainer; same arguments

TRL 1.16's DPO, SFT, GRPO and RLOO trainers call ``trl.trainer.utils.add_fused_lm_head`` in their constructors
and then ``model(..., fused_lm_head=True)``. Their halo-ops forms run TRL's constructor with
:func:`halo_ops.integrations.transformers.add_fused_lm_head` in its place, called with TRL's own arguments
(temperature, ``cast_lm_head_to_fp32``, the output fields), so the head is halo-ops' and every other line is
TRL's: each ``loss_type``, SFT's losses and GRPO's and RLOO's options keep TRL's semantics, and the entropy
stays differentiable for GRPO's entropy bonus.

KTO:

The loss runs on :func:`halo_ops.fused_linear_kto_loss` inside the policy's forward (forward and
backward); the reference model and the KL pairs go through :func:`halo_ops.linear_logprobs` under
``no_grad`` (forward only, nothing saved). Metrics are logged under TRL's names. Everything else (data
collation, precomputed reference log-probs, PEFT with the adapter disabled as the reference,
gradient accumulation and checkpointing) is TRL's own code.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings

import torch

from .. import kto_kl
from .transformers import add_fused_lm_head  # first: it names a missing transformers package

try:
    from trl import DPOTrainer, GRPOTrainer, KTOTrainer, RLOOTrainer, SFTTrainer
except ImportError as error:
    raise ImportError("halo_ops.integrations.trl needs the trl package (1.16 or later): pip install 'halo-ops[trl]'"
                      ) from error

# The model-input keys TRL 1.16's KTOTrainer strips before calling the model
_NON_MODEL_KEYS = {"completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "KL_token_type_ids",
                   "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps"}


def _patch_models(trainer) -> None:
    policy = trainer.model.get_base_model() if _is_peft(trainer.model) else trainer.model
    _add_head(trainer, trainer.accelerator.unwrap_model(policy), outputs=("log_probs", "entropy", "mean_logits"))
    if trainer.ref_model is not None:
        _add_head(trainer, trainer.accelerator.unwrap_model(trainer.ref_model))


def _add_head(trainer, model, **options) -> None:
    """add_fused_lm_head, keeping the mixed precision of a model accelerate has already prepared.

    accelerate's ``prepare_model`` wraps ``forward`` in autocast (``_original_forward`` marks it). TRL patches
    its head before that, so its reference forward runs under autocast; a head patched afterwards sits outside
    the wrapper, so its fused path enters ``accelerator.autocast()`` itself to compute the same numbers.
    """
    add_fused_lm_head(model, **options)
    if not hasattr(model, "_original_forward"):
        return
    fused = model.forward

    @functools.wraps(fused)
    def forward(*args, fused_lm_head=False, **kwargs):
        with trainer.accelerator.autocast() if fused_lm_head else contextlib.nullcontext():
            return fused(*args, fused_lm_head=fused_lm_head, **kwargs)

    model.forward = forward


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _reference_context(trainer):
    """The reference: ``ref_model``, or the policy with its (or its ``ref``) adapter disabled under PEFT."""
    if trainer.ref_model is not None or not _is_peft(trainer.model):
        return trainer.ref_model, contextlib.nullcontext()
    from trl.trainer.kto_trainer import use_adapter

    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    return trainer.model, use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)


class HaloKTOTrainer(KTOTrainer):
    """``trl.KTOTrainer`` with the LM-head part of its loss on halo-ops kernels. Same constructor and config."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _patch_models(self)

    def _sequence_logps(self, model, input_ids, attention_mask, completion_mask, extra=None):
        """Forward-only per-sequence completion log-probs (sum over completion tokens), [B]."""
        labels = input_ids.masked_fill(completion_mask == 0, -100)
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                        use_cache=False, **(extra or {}))
        return out.log_probs[:, -(input_ids.size(1) - 1):].sum(-1)

    def _compute_loss(self, model, inputs, return_outputs):
        from trl.trainer.kto_trainer import disable_gradient_checkpointing

        mode = "train" if self.model.training else "eval"
        batch = {k: (v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        labels = torch.as_tensor(batch["label"], dtype=torch.bool, device=self.accelerator.device)
        model_kwargs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        kl_args = None
        if self.calculate_KL:
            kl_args = (batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])

        # Reference log-probs of the completions and of the KL pairs: forward only
        if self.precompute_ref_logps:
            ref_logps = batch["ref_logps"]
            ref_kl_logps = batch["ref_KL_logps"] if self.calculate_KL else None
        else:
            ref_model, adapter = _reference_context(self)
            with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), adapter:
                ref_logps = self._sequence_logps(ref_model, batch["input_ids"], batch["attention_mask"],
                                                 batch["completion_mask"])
                ref_kl_logps = self._sequence_logps(ref_model, *kl_args) if kl_args else None
        kl = None
        if self.calculate_KL:
            kl = kto_kl(self._sequence_logps(model, *kl_args), ref_kl_logps)

        kto = {"labels": labels, "ref_logps": ref_logps.float(), "kl": kl, "beta": self.beta,
               "desirable_weight": self.desirable_weight, "undesirable_weight": self.undesirable_weight,
               "loss_type": self.loss_type}
        outputs = model(**model_kwargs, labels=completion_labels, fused_lm_head=True, kto=kto)
        self._log_kto_metrics(mode, outputs.kto, batch)
        loss = outputs.loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        if return_outputs:
            # As TRL 1.16 does: prediction_step hands outputs.logits to compute_metrics, and the fused head builds
            # none, so they come from one more plain forward, without gradient
            warnings.warn(
                "`return_outputs=True`, and the logits it passes to `compute_metrics`, are deprecated in TRL and will be "
                "removed in its v2.0.0. The fused LM head does not build the logits, so they are recomputed with an "
                "extra forward pass.", FutureWarning, stacklevel=2)
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _log_kto_metrics(self, mode: str, out, batch) -> None:
        """TRL's metrics, aggregated across processes from halo-ops' sums and counts."""
        gather = lambda t: self.accelerator.gather_for_metrics(t.detach().reshape(1)).sum().item()  # noqa: E731
        m = {key: gather(value) for key, value in out.metrics.items() if key.endswith("_sum") or key.startswith("count/")}
        self._metrics[mode]["kl"].append(out.kl.item())
        tokens = m["count/chosen_tokens"] + m["count/rejected_tokens"]
        self._metrics[mode]["entropy"].append(m["entropy_sum"] / tokens if tokens > 0 else 0.0)
        if mode == "train":
            num_tokens = self.accelerator.gather_for_metrics(batch["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        for side, tokens_key in (("chosen", "count/chosen_tokens"), ("rejected", "count/rejected_tokens")):
            if m[tokens_key] > 0:
                self._metrics[mode][f"logits/{side}"].append(m[f"logits/{side}_sum"] / m[tokens_key])
        for side in ("chosen", "rejected"):
            if m[f"count/{side}"] > 0:
                self._metrics[mode][f"rewards/{side}"].append(m[f"rewards/{side}_sum"] / m[f"count/{side}"])
                self._metrics[mode][f"logps/{side}"].append(m[f"logps/{side}_sum"] / m[f"count/{side}"])
        if m["count/chosen"] > 0 and m["count/rejected"] > 0:
            self._metrics[mode]["rewards/margins"].append(
                self._metrics[mode]["rewards/chosen"][-1] - self._metrics[mode]["rewards/rejected"][-1])


def patch_kto_trainer(trainer: KTOTrainer) -> KTOTrainer:
    """Switch an already built ``trl.KTOTrainer`` to halo-ops, in place; returns it."""
    if not isinstance(trainer, KTOTrainer):
        raise TypeError(f"patch_kto_trainer takes a trl.KTOTrainer, got {type(trainer).__name__}")
    if not isinstance(trainer, HaloKTOTrainer):
        _patch_models(trainer)
        trainer.__class__ = type(f"Halo{type(trainer).__name__}", (HaloKTOTrainer, type(trainer)), {})
    return trainer


@contextlib.contextmanager
def _halo_head_in(module_name: str):
    """While the block runs, the trainer module's ``add_fused_lm_head`` is halo-ops' (called with TRL's arguments)."""
    module = importlib.import_module(module_name)
    trl_head = module.add_fused_lm_head
    module.add_fused_lm_head = add_fused_lm_head
    try:
        yield
    finally:
        module.add_fused_lm_head = trl_head


def _halo_trainer(trl_class):
    """``trl_class`` with halo-ops' fused LM head: the same constructor, TRL's own code for everything else."""

    @functools.wraps(trl_class.__init__)  # TRL's signature, for users and tools that inspect it
    def __init__(self, *args, **kwargs):
        with _halo_head_in(trl_class.__module__):
            trl_class.__init__(self, *args, **kwargs)

    name = f"Halo{trl_class.__name__}"
    doc = f"``trl.{trl_class.__name__}`` with halo-ops' fused LM head. Same constructor and config."
    return type(name, (trl_class,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


HaloDPOTrainer = _halo_trainer(DPOTrainer)
HaloSFTTrainer = _halo_trainer(SFTTrainer)
HaloGRPOTrainer = _halo_trainer(GRPOTrainer)
HaloRLOOTrainer = _halo_trainer(RLOOTrainer)
_HALO_CLASSES = {DPOTrainer: HaloDPOTrainer, SFTTrainer: HaloSFTTrainer, GRPOTrainer: HaloGRPOTrainer,
                 RLOOTrainer: HaloRLOOTrainer}


def _trl_head_arguments(model) -> dict:
    """The arguments TRL's ``add_fused_lm_head`` was called with on ``model``, read from its patched forward."""
    fused = getattr(model, "_original_forward", model.forward)  # under accelerate's autocast wrapper, TRL's forward
    fn = getattr(fused, "__func__", fused)
    cells = dict(zip(fn.__code__.co_freevars, (cell.cell_contents for cell in fn.__closure__ or ())))
    if "original_forward" not in cells or "outputs" not in cells:
        raise TypeError(f"{type(model).__name__} has no TRL fused LM head to replace (was the trainer built by TRL "
                        "1.16 or later?)")
    return {"temperature": cells.get("temperature", 1.0),
            "cast_lm_head_to_fp32": cells.get("cast_lm_head_to_fp32", False), "outputs": cells["outputs"]}


def patch_trainer(trainer):
    """Switch an already built TRL trainer that uses the fused LM head (KTO, DPO, SFT, GRPO, RLOO) to halo-ops', in
    place, with the head arguments TRL chose; returns it."""
    if isinstance(trainer, KTOTrainer):
        return patch_kto_trainer(trainer)
    base = next((cls for cls in _HALO_CLASSES if isinstance(trainer, cls)), None)
    if base is None:
        raise TypeError(f"patch_trainer takes a TRL KTO, DPO, SFT, GRPO or RLOO trainer, got {type(trainer).__name__}")
    if isinstance(trainer, _HALO_CLASSES[base]):
        return trainer
    policy = trainer.model.get_base_model() if _is_peft(trainer.model) else trainer.model
    models = [trainer.accelerator.unwrap_model(policy)]
    if getattr(trainer, "ref_model", None) is not None:
        models.append(trainer.accelerator.unwrap_model(trainer.ref_model))
    for model in models:
        _add_head(trainer, model, **_trl_head_arguments(model))
    trainer.__class__ = type(f"Halo{type(trainer).__name__}", (_HALO_CLASSES[base], type(trainer)), {})
    return trainer
