"""KTO data for the integration tests; the models and tokenizer come from bench.tiny."""

from bench.tiny import VOCAB, char_tokenizer, tiny_model  # noqa: F401

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
