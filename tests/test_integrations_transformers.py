"""add_fused_lm_head on tiny transformers models: against the model's own logits and TRL's fused head."""

import copy

import pytest
import torch

from ._tiny_models import char_tokenizer, tiny_model

transformers = pytest.importorskip("transformers")
from halo_ops.integrations.transformers import add_fused_lm_head  # noqa: E402

KINDS = ["llama", "gemma2", "tied", "cohere"]
OUTPUTS = ("log_probs", "entropy", "mean_logits")


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
    return picked * valid, entropy * valid, logits.mean(-1) * valid


@pytest.mark.parametrize("kind", KINDS)
def test_matches_model_logits_and_trl_fused_head(kind):
    from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head

    ids, mask, labels = _batch()
    ours, theirs = tiny_model(kind), None
    theirs = copy.deepcopy(ours)
    reference = _full_logits_reference(copy.deepcopy(ours), ids, mask, labels)
    add_fused_lm_head(ours, outputs=OUTPUTS)
    trl_add_fused_lm_head(theirs, outputs=OUTPUTS)
    results = []
    for model in (ours, theirs):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        out.loss.backward()
        head = model.get_output_embeddings().weight
        backbone = model.base_model.layers[0].self_attn.q_proj.weight
        results.append((out, head.grad.clone(), backbone.grad.clone()))
    (a, head_a, bb_a), (b, head_b, bb_b) = results
    for field, ref in zip(OUTPUTS, reference):
        torch.testing.assert_close(getattr(a, field).double(), ref, atol=2e-5, rtol=1e-5, msg=field)
        torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=2e-5, rtol=1e-5, msg=field)
    assert torch.equal(a.label_mask, b.label_mask)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(head_a, head_b, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(bb_a, bb_b, atol=1e-7, rtol=1e-4)


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
    with pytest.raises(ValueError, match="is_top1"):
        add_fused_lm_head(tiny_model("llama"), outputs=("log_probs", "is_top1"))
