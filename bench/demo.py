"""``python -m bench.demo``: halo-ops next to plain PyTorch on one LM-head step, with memory and time.

One forward and backward of per-sequence log-probs through a Llama-sized vocabulary (V=32000):
plain PyTorch builds the [tokens, vocab] logits, halo-ops never does. Prints peak memory beyond
the inputs, wall time, and how far apart the two results are.
"""

from __future__ import annotations

import argparse
import time

import torch

from halo_ops import linear_logprobs
from halo_ops.linear_logprobs import resolve_impl

from .memory import peak_extra_bytes
from .providers import plain_logprobs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    gen = torch.Generator().manual_seed(0)
    hidden0 = torch.randn(args.batch, args.seq, args.hidden, generator=gen).to(device, dtype)
    weight0 = (torch.randn(args.vocab, args.hidden, generator=gen) / args.hidden**0.5).to(device, dtype)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    targets[:, : args.seq // 4] = -100  # prompt tokens are not scored

    def step(name):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()

        def run():
            if name == "plain":
                per_token = plain_logprobs(hidden, weight, targets.clamp(min=0))
                logps = (per_token * (targets != -100)).sum(-1)
            else:
                logps = linear_logprobs(hidden, weight, targets, reduction="sum")
            logps.sum().backward()
            return logps.detach()

        start = time.perf_counter()
        peak, logps = peak_extra_bytes(run, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return {"logps": logps, "grads": (hidden.grad, weight.grad), "peak": peak,
                "seconds": time.perf_counter() - start}

    impl = resolve_impl("auto", device, dtype)
    n_tokens = args.batch * args.seq
    print(f"LM-head forward+backward: {args.batch} x {args.seq} tokens, D={args.hidden}, V={args.vocab}, "
          f"{str(dtype).removeprefix('torch.')} on {device} (halo-ops path: {impl})")
    print(f"full logits would be {n_tokens * args.vocab * 4 / 2**20:,.0f} MiB in fp32\n")
    step("halo-ops")  # warm-up
    results = {name: step(name) for name in ("plain", "halo-ops")}
    print(f"{'':10s}{'peak MiB':>12s}{'seconds':>10s}")
    for name, r in results.items():
        print(f"{name:10s}{r['peak'] / 2**20:12,.0f}{r['seconds']:10.2f}")
    a, b = results["plain"], results["halo-ops"]
    print(f"\nmemory: halo-ops uses {b['peak'] / max(a['peak'], 1):.1%} of plain PyTorch's peak")
    print(f"max |Δ log p(sequence)| = {(a['logps'] - b['logps']).abs().max().item():.2e}")
    for name, ga, gb in zip(("hidden", "weight"), a["grads"], b["grads"]):
        rel = ((ga.float() - gb.float()).norm() / ga.float().norm()).item()
        print(f"relative ‖Δ grad {name}‖ = {rel:.2e}")


if __name__ == "__main__":
    main()
