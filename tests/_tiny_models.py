"""Tiny random models from configs, a tokenizer built in memory and a KTO dataset: no downloads."""

from __future__ import annotations

import string

import torch

CHARS = string.ascii_letters + string.digits + string.punctuation + " "
VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}


def char_tokenizer():
    """A character-level PreTrainedTokenizerFast, built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_model(kind: str = "llama", seed: int = 0):
    """llama; gemma2 (final_logit_softcapping); tied (llama with tied embeddings); cohere (logit_scale)."""
    import transformers

    common = {"vocab_size": len(VOCAB), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if kind == "gemma2":
        config = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0, sliding_window=64,
                                           query_pre_attn_scalar=8)
        cls = transformers.Gemma2ForCausalLM
    elif kind == "cohere":
        config = transformers.CohereConfig(**common, logit_scale=0.5)
        cls = transformers.CohereForCausalLM
    else:
        config = transformers.LlamaConfig(**common, tie_word_embeddings=kind == "tied")
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():  # a head large enough that logits and gradients are not all near zero
        model.get_output_embeddings().weight.mul_(8.0)
    return model


PROMPTS = ["Q: 2+2? A:", "Q: sky? A:", "Q: 3+3? A:", "Q: grass? A:", "Q: 1+1? A:", "Q: snow? A:", "Q: 5+5? A:",
           "Q: sun? A:"]
GOOD = [" 4", " blue", " 6", " green", " 2", " white", " 10", " yellow"]
BAD = [" 5", " green", " 7", " blue", " 3", " black", " 11", " purple"]


def kto_dataset(n: int = 8):
    """Desirable (correct) and undesirable (wrong) completions, alternating."""
    from datasets import Dataset

    rows = {"prompt": [], "completion": [], "label": []}
    for i in range(n):
        good = i % 2 == 0
        rows["prompt"].append(PROMPTS[i % len(PROMPTS)])
        rows["completion"].append((GOOD if good else BAD)[i % len(PROMPTS)])
        rows["label"].append(good)
    return Dataset.from_dict(rows)
