"""Launch settings shared by the launchers: block sizes, dot precision, interpreter switches."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (read at launch, not at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class BlockConfig:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int = 8
    num_stages: int = 3


# First defaults, not yet tuned on a GPU (bench/NOTES.md records tuning).
FORWARD_CONFIG = BlockConfig(block_n=64, block_v=128, block_d=64, num_warps=8, num_stages=3)
BACKWARD_CONFIG = BlockConfig(block_n=64, block_v=128, block_d=64, num_warps=8, num_stages=3)


def dot_options(dtype: torch.dtype) -> dict:
    """constexprs for tl.dot: exact fp32 (no silent TF32), and fp32 tiles for bf16 under the interpreter."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernels take float32, bfloat16 or float16 inputs, got {dtype}")
    return {
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST_BF16": interpreting() and dtype == torch.bfloat16,
    }


def launch_options(config: BlockConfig) -> dict:
    return {
        "BLOCK_N": config.block_n,
        "BLOCK_V": config.block_v,
        "BLOCK_D": config.block_d,
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }


def transform_args(logit_scale: float, softcap: float | None, temperature: float) -> dict:
    return {
        "logit_scale": float(logit_scale),
        "softcap": float(softcap) if softcap is not None else 1.0,
        "inv_temperature": 1.0 / float(temperature),
        "HAS_SOFTCAP": softcap is not None,
    }


def vocab_splits(n_tokens: int, vocab: int, config: BlockConfig, device: torch.device) -> int:
    """Split the vocabulary across programs when there are too few token blocks to fill the device."""
    if device.type != "cuda":
        return 1
    token_blocks = -(-n_tokens // config.block_n)
    vocab_blocks = -(-vocab // config.block_v)
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(vocab_blocks, -(-target // max(token_blocks, 1))))
