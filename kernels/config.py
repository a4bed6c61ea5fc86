"""Launch settings shared by the launchers: block sizes, dot precision, interpreter switches."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

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
    num_warps: int = 8  # on AMD, 64-lane waves
    num_stages: int = 3
    # AMD only (Triton's HIP options; 0 leaves the compiler's choice): a waves-per-SIMD occupancy hint, and the
    # MFMA instruction's non-K size (16 or 32)
    waves_per_eu: int = 0
    matrix_instr_nonkdim: int = 0
    kpack: int = 0  # AMD CDNA 3: 2 packs two K elements per MFMA operand load (CDNA 4 takes only 1)

    def label(self) -> str:
        """``64x128x64 w8 s3``, with the AMD options where set (``wpe2 mfma16 kpack2``)."""
        amd = "".join(f" {name}{value}" for name, value in (("wpe", self.waves_per_eu),
                                                           ("mfma", self.matrix_instr_nonkdim), ("kpack", self.kpack))
                      if value)
        return f"{self.block_n}x{self.block_v}x{self.block_d} w{self.num_warps} s{self.num_stages}{amd}"


KERNELS = ("forward", "backward", "backward_dh", "backward_dw", "slab", "fold")
SCHEDULE = "schedule"  # a table entry naming the fastest backward schedule instead of a block config
BACKWARD_SCHEDULES = ("atomic", "owner", "slab", "gemm")  # "gemm" covers the forward too

# Defaults, not timed on a GPU yet (bench/NOTES.md). Half-precision tiles feed the tensor cores.
# An exact fp32 tl.dot runs on the FMA units and holds its operands in registers, so fp32 takes
# smaller tiles: with the half-precision ones it spills and needs 112 KiB of shared memory in the
# backward, over the 99 KiB of sm_86/sm_89. Both compile with no spills and fit every sm_80+
# architecture (python -m bench.cross_compile), with one exception below.
HALF_CONFIG = BlockConfig(block_n=64, block_v=128, block_d=64, num_warps=8, num_stages=3)
FP32_CONFIG = BlockConfig(block_n=64, block_v=64, block_d=16, num_warps=8, num_stages=2)
# Where FP32_CONFIG spills: the fused forward with statistics (seven running partials per row) spilled 8 bytes on
# sm_80/sm_90 at 64 × 64 with 2 stages; one stage keeps it in registers.
FP32_KERNEL_CONFIGS = {"forward": BlockConfig(block_n=64, block_v=64, block_d=16, num_warps=8, num_stages=1)}
# Where HALF_CONFIG spills on an architecture: on sm_100 (B200) the deterministic dW pass spills
# 128-440 bytes with it, and on sm_80 (A100) 8 bytes with bias, softcap and filtering under Triton 3.3;
# half the D block and one stage fewer compile with no spills.
_DW_SMALLER = BlockConfig(block_n=64, block_v=128, block_d=32, num_warps=8, num_stages=2)
HALF_ARCH_CONFIGS = {("backward_dw", "sm_100"): _DW_SMALLER, ("backward_dw", "sm_80"): _DW_SMALLER}
# AMD Instinct, half precision: the same tiles (num_warps counts 64-lane waves there: 8 waves = 512 lanes), with
# the AMD backend's two-stage stream pipelining, 16×16 MFMA instructions, and on CDNA 3 (MI300X) kpack=2, as
# AMD's MI300 Triton tuning guide sets for GEMMs. Predictions: compiled and checked (python -m bench.cross_compile
# --arch gfx942,gfx950), never timed.
AMD_ARCHS = ("gfx942", "gfx950")
AMD_HALF_CONFIGS = {
    "gfx942": BlockConfig(block_n=64, block_v=128, block_d=64, num_warps=8, num_stages=2, matrix_instr_nonkdim=16,
                          kpack=2),
    "gfx950": BlockConfig(block_n=64, block_v=128, block_d=64, num_warps=8, num_stages=2, matrix_instr_nonkdim=16),
}
# float32 on AMD, in the heaviest specialization (bias, softcap, statistics, filtering): the exact-fp32 dW pass
# spills 16 bytes on gfx950 with FP32_CONFIG and none with half the vocabulary block; TF32 (XF32 on gfx942, three
# bf16 products on gfx950) spills 468-728 bytes in the dW pass with TF32_CONFIG and none with 64 × 64 tiles.
AMD_FP32_KERNEL_CONFIGS = {"backward_dw": BlockConfig(block_n=64, block_v=32, block_d=16, num_warps=8, num_stages=2)}
AMD_TF32_CONFIG = BlockConfig(block_n=64, block_v=64, block_d=32, num_warps=8, num_stages=2)
# float32 at torch.set_float32_matmul_precision("high"/"medium"): the dots run as TF32 on the tensor cores, so the
# operands stream through shared memory as half precision's do (4 bytes each, hence BLOCK_D 32 where half takes 64).
# Two stages: with three the atomic backward needs 104 KiB of shared memory, over sm_89's 99 KiB.
TF32_CONFIG = BlockConfig(block_n=64, block_v=128, block_d=32, num_warps=8, num_stages=2)

# What the autotuner (halo_ops.autotune on first use, python -m bench.autotune offline) tries beside the default,
# per precision class and kernel ("fold" covers the slab folds: logits, dL/dy and the Jacobian's weights). Hopper
# and Blackwell hold 228 KiB of shared memory per SM and take bigger tiles (wgmma and tcgen05 want 128-row tiles);
# Ampere and Ada keep to the tiles that fit their 99-164 KiB. Each one compiles without spills for the kernel it is
# tried on, in its heaviest specialization (bias, softcap, statistics, filtering): python -m bench.cross_compile
# --candidates, on every architecture it is tried on; the configs that spilled there are left out (bench/NOTES.md
# item 28).
CANDIDATES = {
    "half": {
        "forward": [],  # every bigger tile spills with the statistics' seven running partials (NOTES item 28)
        "backward": [],
        "backward_dh": [],
        "backward_dw": [],
        "slab": [BlockConfig(64, 128, 64, 4, 4), BlockConfig(128, 64, 64, 4, 3), BlockConfig(64, 256, 64, 8, 3)],
        "fold": [BlockConfig(32, 128, 64, 4, 3), BlockConfig(64, 64, 64, 4, 3), BlockConfig(32, 256, 64, 8, 3)],
    },
    "half_large": {
        "forward": [],
        "backward": [BlockConfig(128, 128, 32, 8, 4), BlockConfig(128, 128, 64, 8, 4), BlockConfig(128, 128, 64, 16, 3),
                     BlockConfig(128, 64, 64, 4, 3), BlockConfig(64, 256, 64, 8, 3)],
        "backward_dh": [BlockConfig(128, 128, 32, 8, 4)],
        "backward_dw": [],
        "slab": [BlockConfig(128, 128, 64, 8, 3), BlockConfig(128, 128, 64, 8, 4)],
        "fold": [],
    },
    # AMD: the candidates that spilled in the dW (and dH) passes are kept to the other kernels
    "half_amd": {kernel: [BlockConfig(64, 128, 32, 8, 2, matrix_instr_nonkdim=16),
                          BlockConfig(64, 64, 64, 8, 2, matrix_instr_nonkdim=16),
                          BlockConfig(64, 128, 64, 8, 2, waves_per_eu=2, matrix_instr_nonkdim=16),
                          *([] if kernel == "backward_dw" else [BlockConfig(64, 128, 64, 8, 2, matrix_instr_nonkdim=32)])]
                 for kernel in KERNELS},
    "float32_amd": {kernel: [BlockConfig(64, 32, 16, 8, 2),
                             *([] if kernel in ("backward_dh", "backward_dw") else [BlockConfig(64, 64, 16, 4, 2)])]
                    for kernel in KERNELS},
    "tf32_amd": {kernel: [*([] if kernel == "backward_dw" else [BlockConfig(64, 64, 16, 8, 2)]),
                          *([] if kernel in ("backward_dh", "backward_dw") else [BlockConfig(32, 64, 32, 8, 2)])]
                 for kernel in KERNELS},
    "float32": {
        "forward": [BlockConfig(32, 64, 32, 8, 2), BlockConfig(64, 128, 16, 8, 2), BlockConfig(32, 128, 32, 8, 2)],
        "backward": [BlockConfig(64, 64, 32, 8, 1), BlockConfig(32, 64, 32, 8, 2)],
        "backward_dh": [BlockConfig(64, 64, 32, 8, 1), BlockConfig(32, 64, 32, 8, 2), BlockConfig(32, 128, 32, 8, 2)],
        "backward_dw": [BlockConfig(64, 64, 32, 8, 1), BlockConfig(64, 128, 16, 8, 2)],
        "slab": [BlockConfig(64, 64, 32, 8, 1), BlockConfig(32, 64, 32, 8, 2), BlockConfig(64, 128, 16, 8, 2),
                 BlockConfig(32, 128, 32, 8, 2)],
        "fold": [BlockConfig(64, 64, 32, 8, 1), BlockConfig(32, 64, 32, 8, 2), BlockConfig(64, 128, 16, 8, 2),
                 BlockConfig(32, 128, 32, 8, 2)],
    },
    "float32_large": {
        "forward": [], "slab": [], "fold": [],
        "backward": [BlockConfig(64, 128, 16, 8, 2), BlockConfig(32, 128, 32, 8, 2)],
        "backward_dh": [BlockConfig(64, 128, 16, 8, 2)],
        "backward_dw": [BlockConfig(32, 64, 32, 8, 2)],
    },
    "tf32": {
        "forward": [BlockConfig(128, 64, 32, 8, 2), BlockConfig(64, 64, 32, 4, 2)],
        "backward": [BlockConfig(128, 64, 32, 8, 2), BlockConfig(64, 64, 32, 4, 2)],
        "backward_dh": [],
        "backward_dw": [],
        "slab": [BlockConfig(128, 64, 32, 8, 2), BlockConfig(64, 64, 32, 4, 2)],
        "fold": [BlockConfig(128, 64, 32, 8, 2), BlockConfig(64, 64, 32, 4, 2)],
    },
    "tf32_large": {
        "forward": [BlockConfig(128, 64, 32, 8, 3)], "backward": [BlockConfig(128, 64, 32, 8, 3)],
        "backward_dh": [], "backward_dw": [], "slab": [BlockConfig(128, 64, 32, 8, 3)],
        "fold": [BlockConfig(128, 64, 32, 8, 3)],
    },
}
LARGE_TILE_ARCHS = ("sm_90", "sm_100")

# A tuned table is keyed on (kernel, GPU architecture, dtype, hidden bucket, vocabulary bucket); a
# bucket is the smallest edge at or above the size.
HIDDEN_BUCKETS = (1024, 2048, 4096, 8192, 2**31 - 1)
VOCAB_BUCKETS = (65536, 163840, 2**31 - 1)  # up to Llama 2/Mistral, up to Llama 3/Qwen 2, beyond (Gemma)
TUNED_TABLE = Path(__file__).with_name("tuned_configs.json")
TUNED_TABLE_ENV = "HALO_OPS_TUNED_CONFIGS"


def bucket(size: int, edges: tuple[int, ...]) -> int:
    return next(edge for edge in edges if size <= edge)


def precision_class(dtype: torch.dtype) -> str:
    """``bfloat16``, ``float16``, ``float32`` (exact dots) or ``tf32`` (float32 at a matmul precision below
    "highest", read now): the tiles and the tuned entries go by it."""
    name = str(dtype).removeprefix("torch.")
    return "tf32" if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest" else name


def table_key(kernel: str, arch: str, dtype: torch.dtype, hidden: int, vocab: int) -> tuple:
    return kernel, arch, precision_class(dtype), bucket(hidden, HIDDEN_BUCKETS), bucket(vocab, VOCAB_BUCKETS)


@functools.lru_cache(maxsize=8)
def tuned_configs(path: str) -> dict[tuple, BlockConfig]:
    """The table written by ``python -m bench.autotune``: {"entries": [{kernel, arch, dtype,
    hidden_bucket, vocab_bucket, config: {block_n, ...}, ...}]} → {key: BlockConfig}."""
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)["entries"]
    table = {}
    for entry in entries:
        key = (entry["kernel"], entry["arch"], entry["dtype"], entry["hidden_bucket"], entry["vocab_bucket"])
        if entry["kernel"] == SCHEDULE:
            if entry["schedule"] not in BACKWARD_SCHEDULES:
                raise ValueError(f"{path}: unknown schedule {entry['schedule']!r}, expected one of {BACKWARD_SCHEDULES}")
            table[key] = entry["schedule"]
            continue
        if entry["kernel"] not in KERNELS:
            raise ValueError(f"{path}: unknown kernel {entry['kernel']!r}, expected one of {KERNELS}")
        table[key] = BlockConfig(**entry["config"])
    return table


def _tuned_table() -> dict:
    return tuned_configs(os.environ.get(TUNED_TABLE_ENV) or str(TUNED_TABLE))


def tuned_schedule(dtype: torch.dtype, hidden: int, vocab: int, arch: str | None) -> str | None:
    """The backward schedule measured fastest for this architecture, dtype and (hidden, vocabulary) bucket,
    or None where the table has no entry (or off a GPU)."""
    return None if arch is None else _tuned_table().get(table_key(SCHEDULE, arch, dtype, hidden, vocab))


def device_arch(device: torch.device) -> str | None:
    """``sm_90`` for an H100, ``gfx942`` for an MI300X, None off a GPU (the interpreter takes the defaults).

    ROCm's torch reports its GPUs as ``cuda`` devices too, with a capability such as (9, 4) that is not an
    NVIDIA architecture: there the name comes from ``gcnArchName`` (``gfx942:sramecc+:xnack-``)."""
    if device.type != "cuda":
        return None
    if torch.version.hip:
        return torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def select_config(kernel: str, dtype: torch.dtype, hidden: int, vocab: int, arch: str | None) -> BlockConfig:
    """The tuned config for this kernel, architecture, dtype and (hidden, vocabulary) bucket, read from
    $HALO_OPS_TUNED_CONFIGS or the shipped table; the dtype's default where the table has none."""
    if arch is not None:
        config = _tuned_table().get(table_key(kernel, arch, dtype, hidden, vocab))
        if config is not None:
            return config
    return default_config(kernel, dtype, arch)


def default_config(kernel: str, dtype: torch.dtype, arch: str | None) -> BlockConfig:
    """The built-in config, before any tuning: by precision class, and by architecture where it needs one."""
    precision = precision_class(dtype)
    amd = arch in AMD_ARCHS
    if precision == "tf32":
        return AMD_TF32_CONFIG if amd else TF32_CONFIG
    if precision == "float32":
        return (amd and AMD_FP32_KERNEL_CONFIGS.get(kernel)) or FP32_KERNEL_CONFIGS.get(kernel, FP32_CONFIG)
    if amd:
        return AMD_HALF_CONFIGS[arch]
    return HALF_ARCH_CONFIGS.get((kernel, arch), HALF_CONFIG)


def candidate_configs(kernel: str, dtype: torch.dtype, arch: str | None) -> list[BlockConfig]:
    """The default config for this kernel first, then the candidates the autotuner tries beside it."""
    family = {"bfloat16": "half", "float16": "half"}.get(precision_class(dtype), precision_class(dtype))
    if arch in AMD_ARCHS:
        candidates = CANDIDATES[family + "_amd"][kernel]
    else:
        candidates = CANDIDATES[family][kernel] + (CANDIDATES[family + "_large"][kernel] if arch in LARGE_TILE_ARCHS
                                                   else [])
    return list(dict.fromkeys([default_config(kernel, dtype, arch), *candidates]))


def config_for(kernel: str, options, hidden: torch.Tensor, weight: torch.Tensor) -> BlockConfig:
    """The config a launcher runs ``kernel`` with: the one measured for this call's key (``options.configs``,
    from halo_ops.autotune), else ``select_config``'s."""
    for name, *fields in getattr(options, "configs", ()):
        if name == kernel:
            return BlockConfig(*fields)
    return select_config(kernel, hidden.dtype, weight.shape[1], weight.shape[0], device_arch(hidden.device))


# AMD targets whose matrix cores take TF32 (XF32): CDNA 3. CDNA 4 (gfx950) has none; Triton's AMD backend then
# offers "bf16x3" (three bf16 products, more accurate than TF32) where it has it, else exact fp32.
AMD_TF32_ARCHS = ("gfx940", "gfx941", "gfx942")


def launch_target():
    """The (backend, arch) the next launch compiles for, e.g. ("cuda", 90) or ("hip", "gfx942"); None under the
    interpreter."""
    if interpreting():
        return None
    from triton.runtime import driver

    target = driver.active.get_current_target()
    return target.backend, target.arch


def dot_options(dtype: torch.dtype) -> dict:
    """constexprs for tl.dot. float32 follows torch.get_float32_matmul_precision(): exact ("ieee") at
    the default "highest", TF32 tensor cores at "high" or "medium", as torch's own matmuls do (on an AMD GPU
    without TF32, "bf16x3" where Triton has it, else exact). bfloat16 tiles become fp32 under the interpreter,
    which multiplies their bit patterns (triton-lang/triton#11584)."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernels take float32, bfloat16 or float16 inputs, got {dtype}")
    exact = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    precision = "ieee" if exact else "tf32"  # for bf16/fp16 operands NVIDIA's Triton ignores it
    target = launch_target()
    if target is not None and target[0] == "hip":  # the AMD backend accepts only the precisions its arch has
        if dtype != torch.float32:
            precision = "ieee"
        elif not exact and target[1] not in AMD_TF32_ARCHS:
            from triton.backends.amd.compiler import HIPOptions

            precision = "bf16x3" if "bf16x3" in HIPOptions.allowed_dot_input_precisions else "ieee"
    return {
        "INPUT_PRECISION": precision,
        "UPCAST_BF16": interpreting() and dtype == torch.bfloat16,
    }


def launch_options(config: BlockConfig, with_block_d: bool = True) -> dict:
    """Block sizes, warps and stages as launch keywords (``with_block_d=False`` for kernels without a D loop).

    Floating-point contraction (a · b + c as one FMA, one rounding) is asked for explicitly: the kernels were
    checked with it, and Triton's default comes from ``TRITON_DEFAULT_FP_FUSION`` (on until 3.9, to be off from
    3.10), which would change the numerics from one Triton to the next. ``TRITON_FORCE_DISABLE_FP_FUSION=1``
    still turns it off. The interpreter ignores the keyword."""
    options = {"BLOCK_N": config.block_n, "BLOCK_V": config.block_v, "num_warps": config.num_warps,
               "num_stages": config.num_stages, "enable_fp_fusion": True}
    # only AMD entries set these; NVIDIA's Triton rejects the keywords
    for amd_option in ("waves_per_eu", "matrix_instr_nonkdim", "kpack"):
        if getattr(config, amd_option):
            options[amd_option] = getattr(config, amd_option)
    if with_block_d:
        options["BLOCK_D"] = config.block_d
    return options


def vocab_splits(n_tokens: int, vocab: int, config: BlockConfig, device: torch.device, group: int = 1) -> int:
    """Vocabulary splits: enough that ``group`` token blocks (the forward grid's group) and the splits fill the
    device twice over, and enough that all token blocks do when there are few; at most one per BLOCK_V."""
    if device.type != "cuda":
        return 1
    token_blocks = -(-n_tokens // config.block_n)
    vocab_blocks = -(-vocab // config.block_v)
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    in_flight = max(1, min(group, token_blocks))
    return max(1, min(vocab_blocks, -(-target // in_flight)))
