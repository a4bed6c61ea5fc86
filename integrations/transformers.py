"""A fused LM head for any transformers causal LM: per-token log-probs (or the KTO loss) without logits.

    from halo_ops.integrations.transformers import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits"))
    out = model(input_ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    out.log_probs          # [B, T - 1], 0 where the next-token label is -100

Called with ``fused_lm_head=True`` the model runs its backbone and hands the last hidden states to
:func:`halo_ops.linear_logprobs`; the result has the fields and semantics of TRL 1.16's
``FusedCausalLMOutput``. Without the flag the original forward runs, so generation is unchanged.
With ``kto={...}`` as well (labels, ref_logps, kl and KTO options), the forward returns the KTO loss of
:func:`halo_ops.fused_linear_kto_loss` in ``out.loss`` and the :class:`halo_ops.KTOOutput` in
``out.kto``: the loss is computed inside the model's forward, where DDP and ZeRO-3 expect it.

No per-architecture code: the backbone is ``model.base_model``, the head ``get_output_embeddings()``
(looked up on every call, so PEFT and FSDP wrappers added later are seen), and the logit transform
comes from the config (``final_logit_softcapping``; ``logit_scale``, ``output_multiplier``,
``lm_head_multiplier`` or ``logits_scaling``, read as TRL reads them).
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass

import torch

from .. import KTOOutput, fused_linear_kto_loss, linear_logprobs
from ..vocab_parallel import is_dtensor
from ..zero3 import gathered

try:
    from transformers.utils import ModelOutput
except ImportError as error:
    raise ImportError("halo_ops.integrations.transformers needs the transformers package: "
                      "pip install 'halo-ops[transformers]'") from error

SUPPORTED_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass
class FusedCausalLMOutput(ModelOutput):
    """TRL 1.16's ``FusedCausalLMOutput`` fields (per-token fields are 0, ``is_top1`` False, where the label is
    -100), plus ``kto``. Fields not requested in ``outputs`` are None."""

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    kto: KTOOutput | None = None


def logit_transform_from_config(config) -> dict:
    """``{"logit_scale", "softcap"}`` from a transformers config, as TRL's ``add_fused_lm_head`` reads them."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        # Granite and MiniCPM3 divide by logits_scaling; HyperCLOVA X multiplies by it
        scaling = text_config.logits_scaling
        scale = scaling if getattr(text_config, "model_type", None) == "hyperclovax" else 1 / scaling
    return {"logit_scale": 1.0 if scale is None else float(scale), "softcap": softcap}


def _fsdp_managed(*modules) -> bool:
    """True when FSDP2 (``fully_shard``) manages one of ``modules``: its DTensor parameters are data-parallel
    shards to gather, not a tensor-parallel split."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in modules)


@contextlib.contextmanager
def full_lm_head(weight: torch.Tensor, bias: torch.Tensor | None, *, gather_dtensors: bool = True):
    """The LM head's weight and bias for a direct read: ZeRO-3 shards gathered, and FSDP2 DTensors gathered when
    ``gather_dtensors``. A tensor-parallel head (a DTensor split over the vocabulary, not under FSDP2) passes
    through: the ops take it as vocabulary-parallel (``halo_ops.VocabParallel``).

    ZeRO-3 shards are gathered with ``deepspeed.zero.GatheredParameters`` (the op's backward gathers
    them again for its recompute).
    """
    with gathered(weight, bias):
        if gather_dtensors and is_dtensor(weight):
            weight = weight.full_tensor()
            bias = bias.full_tensor() if is_dtensor(bias) else bias
        yield weight, bias


def _load_balancing_loss(backbone_outputs, text_config, kwargs):
    """The MoE load-balancing loss the model's own forward adds (Mixtral's, which MoE families share)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_local_experts", None) or getattr(text_config, "num_experts", None)
    return load_balancing_loss_func(backbone_outputs.router_logits, num_experts, text_config.num_experts_per_tok,
                                    kwargs.get("attention_mask"))


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",), *, impl: str = "auto") -> None:
    """Patch ``model.forward`` so ``model(..., labels=labels, fused_lm_head=True)`` scores labels without logits.

    The same signature and call forms as TRL 1.16's ``trl.trainer.utils.add_fused_lm_head``.

    Args:
        model: a transformers causal LM (add the head before wrapping the model with PEFT).
        temperature: the logits are divided by it.
        cast_lm_head_to_fp32: run the head's projection in float32, outside autocast.
        outputs: per-token fields to compute, among ``"log_probs"``, ``"entropy"``, ``"log_sum_sq_probs"``
            (log Σ_v p_v²), ``"mean_logits"`` and ``"is_top1"`` (the label is the argmax), all from the same
            pass over the vocabulary; ``log_probs`` (and ``loss``) always are, and no statistic not named is
            (``linear_logprobs``' ``return_stats``; the others come back None). ``entropy`` is differentiable,
            as TRL's is (GRPO's entropy bonus backpropagates through it); the other statistics carry no
            gradient.
        impl: beyond TRL's arguments, the backend, as :func:`halo_ops.linear_logprobs` takes it.

    MoE models whose config sets ``output_router_logits`` get TRL's ``aux_loss`` (the load-balancing
    loss) and, in log-prob mode, ``loss`` includes ``router_aux_loss_coef · aux_loss``.

    The fused forward takes ``labels`` [B, L] (shifted by one inside, as the model's own loss does) or
    pre-shifted ``shift_labels`` [B, T], an optional ``num_items_in_batch`` for the loss's
    denominator, and optionally ``kto``: a dict with ``labels``, ``ref_logps`` and the keyword
    options of :func:`halo_ops.fused_linear_kto_loss` (``kl``, ``beta``, ...).
    """
    unknown = set(outputs) - set(SUPPORTED_OUTPUTS)
    if unknown:
        raise ValueError(f"outputs must be among {SUPPORTED_OUTPUTS}; halo-ops does not compute {sorted(unknown)}")
    original_forward = model.forward
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    transform = logit_transform_from_config(model.config)
    # the statistics to compute, by linear_logprobs' names: no other one is
    return_stats = tuple({"mean_logits": "mean_logit"}.get(name, name) for name in outputs if name != "log_probs")

    # Keep the original signature: `generate` validates its model kwargs against it
    @functools.wraps(type(model).forward)
    def fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                      kto=None, **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return original_forward(*args, **kwargs)

        kwargs["use_cache"] = False
        # MoE models: like the model's own forward, request router logits when the config asks for them
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone = self.base_model(*args, **kwargs)
        hidden = backbone.last_hidden_state
        aux_loss = _load_balancing_loss(backbone, text_config, kwargs) if kwargs.get("output_router_logits") else None
        if shift_labels is None:
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        head = self.get_output_embeddings()
        hidden, targets = hidden.to(head.weight.device), targets.to(head.weight.device)
        mask = targets != -100
        precision = contextlib.nullcontext()
        if cast_lm_head_to_fp32:
            hidden, precision = hidden.float(), torch.autocast(hidden.device.type, enabled=False)
        with precision, full_lm_head(head.weight, head.bias, gather_dtensors=_fsdp_managed(self, head)) as (weight, bias):
            if cast_lm_head_to_fp32:
                weight, bias = weight.float(), None if bias is None else bias.float()
            if kto is not None:
                kto = dict(kto)
                kto.setdefault("impl", impl)
                kto_out = fused_linear_kto_loss(hidden, weight, targets, kto.pop("labels"), kto.pop("ref_logps"),
                                                bias=bias, temperature=temperature, **transform, **kto)
                # The KTO loss alone: a trainer adds router_aux_loss_coef · aux_loss itself, as TRL's does
                return FusedCausalLMOutput(loss=kto_out.loss, label_mask=mask, aux_loss=aux_loss, kto=kto_out)
            out = linear_logprobs(hidden, weight, targets, bias, temperature=temperature, return_stats=return_stats,
                                  impl=impl, **transform)
        log_probs = out.logps if return_stats else out
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / denominator
        if aux_loss is not None:
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            log_probs=log_probs,
            entropy=out.entropy if "entropy" in outputs else None,
            log_sum_sq_probs=out.log_sum_sq_probs if "log_sum_sq_probs" in outputs else None,
            mean_logits=out.mean_logit if "mean_logits" in outputs else None,
            is_top1=out.is_top1 if "is_top1" in outputs else None,
            label_mask=mask,
        )

    fused_forward.halo_ops_fused_head = True  # (functools.wraps gave it the model's name and module)
    model.forward = types.MethodType(fused_forward, model)
