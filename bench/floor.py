"""``python -m bench.floor``: the device's measured GEMM rate and copy bandwidth, and the floor they set.

The LM-head work is GEMMs of 2·N·D·V flops each: the forward is one, a recompute backward three
more (bench/NOTES.md). This measures the rate of one large ``torch.matmul`` in the chosen dtype (the
rate cuBLAS reaches, a ceiling the kernels will not beat) and a device-to-device copy's bandwidth
(bytes read plus written), then prints the time of 1, 3 and 4 such GEMMs at each (N, D, V):
issue 5's targets are stated against them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .measure import DTYPES, median_seconds
from .report import environment


def gemm_tflops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, repeats: int = 3) -> float:
    """Measured TFLOP/s of an [m, k] @ [k, n] product on random inputs (never zeros: they run faster)."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up: handles and workspace
    seconds = median_seconds(lambda: torch.matmul(a, b), device, repeats)
    return 2 * m * k * n / seconds / 1e12


def copy_gbps(n_bytes: int, device: torch.device, repeats: int = 3) -> float:
    """Measured GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / seconds / 1e9


def floor_rows(tflops: float, shapes: list[tuple[int, int, int]]) -> list[dict]:
    rows = []
    for n, d, v in shapes:
        gemm_ms = 2 * n * d * v / (tflops * 1e12) * 1e3
        rows.append({"tokens": n, "hidden": d, "vocab": v, "gemm_ms": gemm_ms, "forward_floor_ms": gemm_ms,
                     "three_gemm_ms": 3 * gemm_ms, "fwd_bwd_floor_ms": 4 * gemm_ms})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--gemm", default=None, help="semicolon list of M,K,N products to time; the first one's rate "
                        "sets the floors (default 16384,4096,16384 on CUDA, 1024,256,1024 on CPU)")
    parser.add_argument("--shapes", default="16384,4096,128256", help="semicolon list of N,D,V for the floors")
    parser.add_argument("--out", type=Path, default=None, help="write floor.md here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    gemms = [tuple(int(x) for x in g.split(",")) for g in (args.gemm or ("16384,4096,16384" if cuda else
                                                                          "1024,256,1024")).split(";")]
    rates = [(g, gemm_tflops(*g, dtype, device)) for g in gemms]
    tflops = rates[0][1]
    gbps = copy_gbps(2**30 if cuda else 2**26, device)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    env = environment(device)
    name = str(dtype).removeprefix("torch.")
    lines = ["# Matmul floor", "", *(f"- {k_}: {v_}" for k_, v_ in env.items()), "",
             f"Device copy at {gbps:.0f} GB/s (read + write). {name} GEMMs, random inputs, median:", "",
             "| M | K | N | TFLOP/s |", "|---:|---:|---:|---:|",
             *(f"| {m} | {k} | {n} | {rate:.1f} |" for (m, k, n), rate in rates), "",
             f"Floors at the first product's rate ({tflops:.1f} TFLOP/s):", "",
             "| tokens | hidden | vocab | 1 GEMM ms (forward floor) | 3 GEMMs ms | 4 GEMMs ms (fwd+bwd floor) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in floor_rows(tflops, shapes):
        lines.append(f"| {r['tokens']} | {r['hidden']} | {r['vocab']} | {r['gemm_ms']:.2f} | {r['three_gemm_ms']:.2f} "
                     f"| {r['fwd_bwd_floor_ms']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "floor.md").write_text(text)
        (args.out / "floor.json").write_text(json.dumps({
            "dtype": name, "copy_gbps": gbps, "tflops": tflops,
            "gemms": [{"m": m, "k": k, "n": n, "tflops": rate} for (m, k, n), rate in rates], **env}, indent=1))


if __name__ == "__main__":
    main()
