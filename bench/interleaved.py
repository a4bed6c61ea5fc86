"""``python -m bench.interleaved``: medians of calls timed in turn, round after round, in one process.

On a shared or small CPU the machine's speed drifts within a run (one competing process changed a ratio
threefold here). Timing each variant once per round, in turn, exposes every variant to the same drift, so
their ratios hold even when the absolute times move. The order rotates from round to round: a fixed order
made one variant 1.24× slower than another that it measured 1.03× of when it ran first. Variants: the frozen head (Jacobian and recompute)
against a trainable head, the fused KTO op (recompute and eager) against the composed public pieces, the fused
DPO loss (eager and recompute) against its composed pieces, the chunked log-probs against plain PyTorch, and
the forward's cost of each per-token statistic.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from halo_ops import fused_linear_kto_loss, fused_linear_preference_loss, kto_loss, linear_logprobs

from .kto_step import KTOShape


def _token_variants(shape: KTOShape):
    x = shape.inputs("cpu")
    hidden, weight, targets = x["hidden"].detach().flatten(0, 1), x["weight"].detach(), x["targets"].flatten()
    upstream = torch.randn(hidden.shape[0])

    def run(frozen: bool, recompute):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(not frozen)
        logps = linear_logprobs(h, w, targets, impl="torch", recompute=recompute, check_targets=False)
        (logps * upstream).sum().backward()

    return {"trainable": lambda: run(False, None), "frozen (Jacobian)": lambda: run(True, None),
            "frozen (recompute)": lambda: run(True, True)}


def _kto_variants(shape: KTOShape):
    x = shape.inputs("cpu")
    with torch.no_grad():  # the reference model's log-probs: near the policy's, so no sigmoid saturates
        ref = linear_logprobs(x["ref_hidden"], x["ref_weight"], x["targets"], reduction="sum", impl="torch")

    def fused(recompute, token_metrics=True):
        h, w = x["hidden"].detach().clone().requires_grad_(), x["weight"].detach().clone().requires_grad_()
        fused_linear_kto_loss(h, w, x["targets"], x["labels"], ref, kl=0.1, impl="torch", recompute=recompute,
                              token_metrics=token_metrics, check_targets=False).loss.backward()

    def composed():
        h, w = x["hidden"].detach().clone().requires_grad_(), x["weight"].detach().clone().requires_grad_()
        policy = linear_logprobs(h, w, x["targets"], reduction="sum", impl="torch", check_targets=False)
        kto_loss(policy, ref, x["labels"], kl=0.1).loss.backward()

    return {"composed (linear_logprobs + kto_loss)": composed, "fused (recompute)": lambda: fused(True),
            "fused (recompute, no token metrics)": lambda: fused(True, False), "fused (eager)": lambda: fused(False),
            "fused (eager, no token metrics)": lambda: fused(False, False)}


def _dpo_variants(shape: KTOShape):
    """The fused DPO loss on the batch's sequences as pairs (first half chosen), eager and recompute, against the
    composed public pieces: ``linear_logprobs(reduction="sum")`` then ``losses.preference.dpo_losses``."""
    from halo_ops.losses.preference import dpo_losses

    x = shape.inputs("cpu")
    pairs = x["hidden"].shape[0] // 2
    with torch.no_grad():
        ref = linear_logprobs(x["ref_hidden"], x["ref_weight"], x["targets"], reduction="sum", impl="torch")

    def run(recompute):
        h, w = x["hidden"].detach().clone().requires_grad_(), x["weight"].detach().clone().requires_grad_()
        fused_linear_preference_loss(h, w, x["targets"], method="dpo", ref_chosen_logps=ref[:pairs],
                                     ref_rejected_logps=ref[pairs:], impl="torch", recompute=recompute,
                                     check_targets=False).loss.backward()

    def composed():
        h, w = x["hidden"].detach().clone().requires_grad_(), x["weight"].detach().clone().requires_grad_()
        policy = linear_logprobs(h, w, x["targets"], reduction="sum", impl="torch", check_targets=False)
        losses = dpo_losses(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:])[0]
        (losses.sum() / pairs).backward()

    return {"composed (linear_logprobs + dpo_losses)": composed, "dpo (recompute)": lambda: run(True),
            "dpo (eager)": lambda: run(None)}


def _logprob_variants(shape: KTOShape):
    """Per-token log-probs, forward and backward: the chunked path against plain PyTorch (full logits)."""
    from .providers import plain_logprobs

    x = shape.inputs("cpu")
    hidden, weight, targets = x["hidden"].detach().flatten(0, 1), x["weight"].detach(), x["targets"].flatten()
    targets = targets.clamp(min=0)  # every token scored, as plain PyTorch scores them
    upstream = torch.randn(hidden.shape[0])

    def run(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        (fn(h, w, targets) * upstream).sum().backward()

    return {"plain": lambda: run(plain_logprobs),
            "halo-ops[torch]": lambda: run(lambda h, w, t: linear_logprobs(h, w, t, impl="torch", check_targets=False))}


def _stats_variants(shape: KTOShape):
    """The per-token log-probs' forward (``torch.no_grad``, PyTorch path) with no statistic, each one alone, and all
    four: what each statistic costs."""
    from halo_ops.partials import STATISTICS

    x = shape.inputs("cpu")
    hidden, weight, targets = x["hidden"].detach(), x["weight"].detach(), x["targets"]

    def run(stats):
        with torch.no_grad():
            linear_logprobs(hidden, weight, targets, impl="torch", return_stats=stats, check_targets=False)

    variants = {"log-probs only": lambda: run(())}
    variants.update({f"+ {name}": (lambda name=name: run((name,))) for name in STATISTICS})
    variants["+ all four (return_stats=True)"] = lambda: run(True)
    return variants


def interleaved(variants: dict, rounds: int) -> dict[str, list[float]]:
    for fn in variants.values():  # warm-up
        fn()
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):  # each round starts one variant later: none always follows the same one
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = variants[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.interleaved", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=("frozen-head", "kto-loss", "dpo-loss", "logprobs", "stats"))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compete", action="store_true",
                        help="run one competing busy process (a spinning Python loop) during the measurement")
    args = parser.parse_args(argv)
    shape = KTOShape(args.tokens // args.seq, args.seq, args.hidden, args.vocab, torch.float32)
    variants = {"frozen-head": _token_variants, "kto-loss": _kto_variants, "dpo-loss": _dpo_variants,
                "logprobs": _logprob_variants, "stats": _stats_variants}[args.which](shape)
    competitor = None
    if args.compete:
        import subprocess
        import sys

        competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        times = interleaved(variants, args.rounds)
    finally:
        if competitor is not None:
            competitor.kill()
    first = statistics.median(next(iter(times.values())))
    print(f"{args.which}: N={args.tokens} D={args.hidden} V={args.vocab} fp32, CPU {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds" + (", one competing busy process" if args.compete else ", idle"))
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:40s} median {median:7.3f} s  ({median / first:.2f}×)  runs {[round(v, 2) for v in values]}")


if __name__ == "__main__":
    main()
