"""Tiny random causal LMs from configs and a character tokenizer built in memory: nothing is downloaded.

Used by the demo and the tests.
"""

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


def tiny_model(kind: str = "llama", seed: int = 0, vocab_size: int | None = None, hidden_size: int = 32):
    """llama; gemma2 (final_logit_softcapping); tied (llama with tied embeddings); cohere (logit_scale);
    mixtral (MoE with router logits and an aux loss).

    ``vocab_size`` may exceed the tokenizer's (the head then scores the extra, never-seen ids too).
    """
    import transformers

    common = {"vocab_size": vocab_size or len(VOCAB), "hidden_size": hidden_size,
              "intermediate_size": 2 * hidden_size, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if kind == "gemma2":
        config = transformers.Gemma2Config(**common, head_dim=hidden_size // 4, final_logit_softcapping=3.0, sliding_window=64,
                                           query_pre_attn_scalar=hidden_size // 4)
        cls = transformers.Gemma2ForCausalLM
    elif kind == "mixtral":
        config = transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                            output_router_logits=True, router_aux_loss_coef=0.02)
        cls = transformers.MixtralForCausalLM
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
