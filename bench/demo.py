"""``python -m bench.demo``: halo-ops at work, with nothing downloaded; CPU in a few minutes, or a GPU.

Part 1, one LM-head step: forward and backward of per-sequence log-probs through a Llama-sized
vocabulary (V=32000), plain PyTorch (full logits) next to halo-ops (never builds them): peak memory
beyond the inputs, time, and how far apart the results are.

Part 2, a KTO fine-tune: a tiny Llama with a 32000-entry head learns from the desirable and
undesirable arithmetic answers in ``bench/data/kto_arithmetic.jsonl``, once with halo-ops'
``HaloKTOTrainer`` and once with TRL's own ``KTOTrainer`` on the same seeds. Part 3, the same with DPO
(``HaloDPOTrainer`` against ``DPOTrainer``) on pairs built from the desirable answers. Prints the loss
and reward curves of each, their time and peak memory, and saves one plot of both fine-tunes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from halo_ops import linear_logprobs, resolve_impl

from .memory import peak_extra_bytes
from .providers import plain_logprobs
from .report import RUNS

DATA = Path(__file__).parent / "data" / "kto_arithmetic.jsonl"


def lm_head_step(args) -> None:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    gen = torch.Generator().manual_seed(0)
    hidden0 = torch.randn(args.batch, args.seq, args.hidden, generator=gen).to(device, dtype)
    weight0 = (torch.randn(args.vocab, args.hidden, generator=gen) / args.hidden**0.5).to(device, dtype)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    targets[:, : args.seq // 4] = -100  # prompt tokens are not scored

    def step(name, measure):
        """One forward+backward; ``measure`` is "time" (seconds) or "memory" (peak bytes)."""
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()

        def run():
            if name == "plain":
                per_token = plain_logprobs(hidden, weight, targets.clamp(min=0))
                logps = (per_token * (targets != -100)).sum(-1)
            else:
                logps = linear_logprobs(hidden, weight, targets, reduction="sum")
            logps.sum().backward()
            return logps.detach()

        if measure == "memory":
            return {"peak": peak_extra_bytes(run, device)[0]}
        start = time.perf_counter()
        logps = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return {"logps": logps, "grads": (hidden.grad, weight.grad), "seconds": time.perf_counter() - start}

    impl = resolve_impl("auto", device, dtype)
    n_tokens = args.batch * args.seq
    print(f"LM-head forward+backward: {args.batch} x {args.seq} tokens, D={args.hidden}, V={args.vocab}, "
          f"{str(dtype).removeprefix('torch.')} on {device} (halo-ops path: {impl})")
    print(f"full logits would be {n_tokens * args.vocab * 4 / 2**20:,.0f} MiB in fp32\n")
    step("halo-ops", "time")  # warm-up
    # Every timing before any peak: the CPU peak measurement changes how the allocator behaves
    results = {name: step(name, "time") for name in ("plain", "halo-ops")}
    for name in results:
        results[name].update(step(name, "memory"))
    print(f"{'':10s}{'peak MiB':>12s}{'seconds':>10s}")
    for name, r in results.items():
        print(f"{name:10s}{r['peak'] / 2**20:12,.0f}{r['seconds']:10.2f}")
    a, b = results["plain"], results["halo-ops"]
    print(f"\nmemory: halo-ops uses {b['peak'] / max(a['peak'], 1):.1%} of plain PyTorch's peak")
    print(f"max |Δ log p(sequence)| = {(a['logps'] - b['logps']).abs().max().item():.2e}")
    for name, ga, gb in zip(("hidden", "weight"), a["grads"], b["grads"]):
        rel = ((ga.float() - gb.float()).norm() / ga.float().norm()).item()
        print(f"relative ‖Δ grad {name}‖ = {rel:.2e}")


def _datasets():
    """The KTO rows of ``bench/data/kto_arithmetic.jsonl``, and DPO pairs built from its desirable rows (the correct
    answer chosen, the answer plus one rejected)."""
    import json

    from datasets import Dataset

    rows = [json.loads(line) for line in open(DATA)]
    kto = Dataset.from_dict({key: [row[key] for row in rows] for key in rows[0]})
    good = [row for row in rows if row["label"]]
    dpo = Dataset.from_dict({"prompt": [row["prompt"] for row in good],
                             "chosen": [row["completion"] for row in good],
                             "rejected": [f" {int(row['completion']) + 1}" for row in good]})
    return kto, dpo


def finetune(args, method: str) -> dict:
    """``method`` ("kto" or "dpo"): the same tiny Llama fine-tuned by halo-ops' trainer and by TRL's, same seeds.
    Prints the curves side by side, time and peak memory; returns the runs for the plot."""
    import copy
    import tempfile
    import warnings

    import trl
    from transformers.trainer_callback import PrinterCallback

    from halo_ops.integrations.trl import HaloDPOTrainer, HaloKTOTrainer

    from .tiny import char_tokenizer, tiny_model

    kto_data, dpo_data = _datasets()
    dataset = kto_data if method == "kto" else dpo_data
    policy = tiny_model("llama", seed=0, vocab_size=args.vocab, hidden_size=64)
    print(f"\n{method.upper()} fine-tune: {len(dataset)} examples, tiny Llama with V={args.vocab}, {args.steps} steps "
          f"of {args.kto_batch}; same seeds for both trainers\n")
    scratch = tempfile.mkdtemp(prefix=f"halo-{method}-demo-")  # the trainers' output_dir; nothing is saved there
    config_class = trl.KTOConfig if method == "kto" else trl.DPOConfig
    trainers = {"halo-ops": HaloKTOTrainer if method == "kto" else HaloDPOTrainer,
                "trl": trl.KTOTrainer if method == "kto" else trl.DPOTrainer}

    def build(cls, steps):
        config = config_class(output_dir=scratch, per_device_train_batch_size=args.kto_batch, max_steps=steps,
                              learning_rate=args.lr, beta=0.5 if method == "kto" else 0.1, logging_steps=1,
                              report_to=[], save_strategy="no", bf16=False, use_cpu=args.device == "cpu",
                              disable_tqdm=True, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = cls(model=copy.deepcopy(policy), ref_model=copy.deepcopy(policy), args=config,
                          train_dataset=dataset, processing_class=char_tokenizer())
        trainer.remove_callback(PrinterCallback)  # the curves are printed below, side by side
        return trainer

    runs = {}
    for name, cls in trainers.items():
        trainer = build(cls, args.steps)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        runs[name] = {"seconds": time.perf_counter() - start,
                      "log": [row for row in trainer.state.log_history if "loss" in row]}
    # Peak memory after every timing, on 3-step runs (the peak is reached in the first step)
    for name, cls in trainers.items():
        trainer = build(cls, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs[name]["peak"], _ = peak_extra_bytes(trainer.train, args.device)

    print(f"{'step':>5s}  {'loss (halo-ops)':>16s} {'loss (trl)':>11s}  {'margin (halo-ops)':>18s} {'margin (trl)':>13s}")
    for a, b in zip(runs["halo-ops"]["log"], runs["trl"]["log"]):
        print(f"{a['step']:5d}  {a['loss']:16.4f} {b['loss']:11.4f}  {a.get('rewards/margins', float('nan')):18.4f} "
              f"{b.get('rewards/margins', float('nan')):13.4f}")
    print(f"\n{'':10s}{'train seconds':>15s}{'peak MiB':>10s}")
    for name, run in runs.items():
        print(f"{name:10s}{run['seconds']:15.1f}{run['peak'] / 2**20:10.0f}")
    print(f"(seconds: the {args.steps}-step runs above; peak: a 3-step run of each, model, optimizer and data "
          "included; part 1 isolates the LM head)")
    return runs


def _plot(results, path):
    """Loss and reward curves of each fine-tune (``results``: method → runs), halo-ops and TRL on the same axes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib is not installed: no plot)")
        return None
    fig, axes = plt.subplots(len(results), 2, figsize=(10, 4 * len(results)), squeeze=False)
    styles = {"halo-ops": {"linestyle": "-", "linewidth": 2.5, "alpha": 0.6}, "trl": {"linestyle": "--", "linewidth": 1}}
    for row, (method, runs) in zip(axes, results.items()):
        for name, run in runs.items():
            steps = [entry["step"] for entry in run["log"]]
            row[0].plot(steps, [entry["loss"] for entry in run["log"]], label=name, color="C0", **styles[name])
            for side, color in (("chosen", "C2"), ("rejected", "C3")):
                row[1].plot(steps, [entry.get(f"rewards/{side}", float("nan")) for entry in run["log"]], color=color,
                            label=f"{name} {side}", **styles[name])
        row[0].set(title=f"{method.upper()} loss", xlabel="step")
        row[1].set(title=f"{method.upper()} rewards (β · log-ratio)", xlabel="step")
        for ax in row:
            ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="part 1: sequences")
    parser.add_argument("--seq", type=int, default=512, help="part 1: tokens per sequence")
    parser.add_argument("--hidden", type=int, default=256, help="part 1: D")
    parser.add_argument("--vocab", type=int, default=32000, help="V in both parts")
    parser.add_argument("--steps", type=int, default=60, help="part 2: optimizer steps")
    parser.add_argument("--kto-batch", type=int, default=16, help="part 2: sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="part 2: learning rate")
    parser.add_argument("--out", type=Path, default=RUNS, help="where the plot goes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--part", choices=["all", "lm-head", "kto", "dpo"], default="all")
    args = parser.parse_args(argv)
    if args.part in ("all", "lm-head"):
        lm_head_step(args)
    results = {method: finetune(args, method) for method in ("kto", "dpo") if args.part in ("all", method)}
    if results:
        plot = _plot(results, args.out / "demo.png")
        if plot:
            print(f"\nplot: {plot}")


if __name__ == "__main__":
    main()
