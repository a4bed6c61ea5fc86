"""``python -m bench.cross_compile``: build every kernel specialization for an NVIDIA or AMD GPU, on any machine.

Triton compiles for a target without a GPU present: only the launch needs the driver. This module
stands in a driver that names a target (``sm_100`` for B200, ``sm_90`` for H100/H200, ``sm_80`` for
A100, ``sm_89`` for L4/L40S/RTX 4090) and turns every launch into a compile, then runs the real launchers with small CPU
tensors. Each specialization the ops produce is therefore built exactly as a GPU run would build it
(same arguments, same constexprs, same warps and stages), and its cubin is read back with the
``cuobjdump`` that ships with Triton:

- registers per thread and spill bytes (``LOCAL``), which the interpreter cannot show;
- shared memory per program, against the architecture's per-block limit (a launch above it fails);
- the matrix instructions used: ``tcgen05`` (Blackwell), ``wgmma`` (Hopper), ``mma`` (Ampere-style),
  or none;
- the global atomics in the machine code (SASS): ``red`` (RED/REDG, fire-and-forget reductions) or ``atom``
  (ATOM/ATOMG, a read-modify-write that waits for its result);
- programs per SM from registers, shared memory and warps, the occupancy bound.

AMD Instinct targets (``gfx942`` for MI300X/MI325X, ``gfx950`` for MI355X) compile through Triton's AMD
backend to AMDGCN and an hsaco, read from the assembly's metadata: VGPRs (AGPRs included) and SGPRs,
scratch and spilled registers, LDS per workgroup against the architecture's limit, waves per SIMD
(the occupancy the compiler reports), MFMA instructions for the dots, and the global atomics
(``buffer_atomic_add_f32``/``global_atomic_add_f32``: a float add in memory, ``red`` without a returned value,
``atom`` with one; or a compare-and-swap loop, ``cas``).

It runs without TRITON_INTERPRET (kernels must be compiled, not interpreted, in this process).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

# Per-architecture limits (CUDA programming guide, compute capabilities table): the most dynamic
# shared memory one program may use, shared memory per SM, and resident warps per SM.
ARCH_LIMITS = {
    80: {"max_shared_per_block": 166912, "shared_per_sm": 167936, "warps_per_sm": 64},
    86: {"max_shared_per_block": 101376, "shared_per_sm": 102400, "warps_per_sm": 48},
    89: {"max_shared_per_block": 101376, "shared_per_sm": 102400, "warps_per_sm": 48},
    90: {"max_shared_per_block": 232448, "shared_per_sm": 233472, "warps_per_sm": 64},
    100: {"max_shared_per_block": 232448, "shared_per_sm": 233472, "warps_per_sm": 64},
}
REGISTERS_PER_SM = 65536
MAX_PROGRAMS_PER_SM = 32
# AMD Instinct (CDNA 3 and 4 ISA guides): LDS one workgroup may use; 64-lane waves.
AMD_LIMITS = {"gfx942": {"lds_per_workgroup": 65536}, "gfx950": {"lds_per_workgroup": 163840}}
ARCHS = (*ARCH_LIMITS, *AMD_LIMITS)


def target_name(arch) -> str:
    """``sm_90`` for 90, ``gfx942`` for "gfx942": the name kernels.config.device_arch gives such a GPU."""
    return arch if str(arch).startswith("gfx") else f"sm_{arch}"


def parse_archs(text: str) -> list:
    """``"80,90,gfx942"`` → [80, 90, "gfx942"], each checked against the known targets."""
    archs = [a if a.startswith("gfx") else int(a) for a in (x.strip() for x in text.split(",")) if a]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise SystemExit(f"unknown --arch {unknown}: known {', '.join(map(str, ARCHS))}")
    return archs


class _TargetDriver:
    """Just enough of a Triton driver to specialize and compile for ``target`` (no launches)."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return f"cross-compile:{self.target.backend}:{self.target.arch}"

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def compiling_for(arch):
    """Inside, every Triton launch compiles for ``sm_<arch>`` (an int) or an AMD ``gfx…`` target and launches
    nothing; yields the list of (kernel name, CompiledKernel) pairs, one per launch."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from halo_ops.kernels import config, interpreting, linear_logprobs_fwd

    if interpreting() or not isinstance(linear_logprobs_fwd.linear_logprobs_fwd_kernel.fn, JITFunction):
        raise RuntimeError("cross-compiling needs compiled kernels: run it in a process without TRITON_INTERPRET=1")
    launches = []
    real_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        compiled = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append((self.__name__, compiled))
        return compiled

    previous = driver._active if hasattr(driver, "_active") else driver.active  # Triton ≥ 3.4, and before
    real_arch = config.device_arch
    target = GPUTarget("hip", arch, 64) if target_name(arch).startswith("gfx") else GPUTarget("cuda", arch, 32)
    driver.set_active(_TargetDriver(target))
    JITFunction.run = compile_only
    config.device_arch = lambda _device: target_name(arch)  # the launchers pick configs for the target, not the CPU
    try:
        yield launches
    finally:
        config.device_arch = real_arch
        JITFunction.run = real_run
        driver.set_active(previous)


@dataclass(frozen=True)
class Case:
    """One launcher call: the kernel specialization it produces is what gets built."""

    label: str
    dtype: torch.dtype
    bias: bool = False
    softcap: bool = False
    return_stats: bool = False
    schedule: str = "atomic"  # the backward schedule: atomic, owner or slab
    grad_filter_eps: float = 0.0
    needs: tuple[bool, bool, bool] = (True, True, True)
    matmul_precision: str = "highest"  # torch.set_float32_matmul_precision: "high" takes fp32 GEMMs to TF32
    config: object = None  # kernels.BlockConfig for every launch, {kernel: BlockConfig} for one; None: the launchers' own

    forward_gradients: bool = False  # also the frozen head's Jacobian forward and the fused losses' eager schedule


def standard_cases() -> list[Case]:
    """The specializations the public ops produce: every dtype, plain and with every option on, each
    backward schedule (atomic, owner, slab, gemm), gradient filtering, a frozen head (dH only, the LoRA case),
    and the schedules that form gradients in the forward (the Jacobian, eager)."""
    cases = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        cases.append(Case(f"{name}", dtype))
        cases.append(Case(f"{name} bias+softcap+stats+filter", dtype, bias=True, softcap=True, return_stats=True,
                          grad_filter_eps=2**-12))
        cases.append(Case(f"{name} owner", dtype, schedule="owner"))
        cases.append(Case(f"{name} slab", dtype, schedule="slab"))
        cases.append(Case(f"{name} gemm", dtype, schedule="gemm"))
        cases.append(Case(f"{name} jacobian+eager", dtype, schedule="gemm", forward_gradients=True))
    cases.append(Case("float32 TF32 (matmul precision high)", torch.float32, matmul_precision="high"))
    cases.append(Case("bfloat16 owner bias+softcap+filter", torch.bfloat16, bias=True, softcap=True,
                      schedule="owner", grad_filter_eps=2**-12))
    cases.append(Case("bfloat16 slab bias+softcap+filter", torch.bfloat16, bias=True, softcap=True,
                      schedule="slab", grad_filter_eps=2**-12))
    cases.append(Case("bfloat16 gemm bias+softcap+stats+filter", torch.bfloat16, bias=True, softcap=True,
                      return_stats=True, schedule="gemm", grad_filter_eps=2**-12))
    cases.append(Case("bfloat16 frozen head (dH only)", torch.bfloat16, needs=(True, False, False)))
    cases.append(Case("bfloat16 jacobian+eager bias+softcap+stats+filter", torch.bfloat16, bias=True, softcap=True,
                      return_stats=True, schedule="gemm", grad_filter_eps=2**-12, forward_gradients=True))
    return cases


def candidate_cases(arch) -> list[Case]:
    """The autotuner's configs on ``arch`` (``kernels.config.candidate_configs``: the default and the
    candidates), each on the heaviest specialization (bias, softcap, statistics, filtering) of the first
    schedule that launches its kernel (``halo_ops.autotune.SCHEDULE_KERNELS``)."""
    from halo_ops.autotune import SCHEDULE_KERNELS
    from halo_ops.kernels.config import candidate_configs

    schedule_of = {}
    for schedule, kernels in SCHEDULE_KERNELS.items():
        for kernel in kernels:
            schedule_of.setdefault(kernel, schedule)
    heavy = {"bias": True, "softcap": True, "grad_filter_eps": 2**-12, "return_stats": True}
    cases = []
    for label, dtype, matmul in (("bfloat16", torch.bfloat16, "highest"), ("float32", torch.float32, "highest"),
                                 ("float32 TF32", torch.float32, "high")):
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(matmul)
        try:
            tried = {kernel: candidate_configs(kernel, dtype, target_name(arch)) for kernel in schedule_of}
        finally:
            torch.set_float32_matmul_precision(precision)
        for kernel, configs in tried.items():
            for config in configs:
                cases.append(Case(f"{label} {kernel} candidate {config.label()}", dtype, schedule=schedule_of[kernel],
                                  matmul_precision=matmul, forward_gradients=kernel == "fold",
                                  config={kernel: config}, **heavy))
    return cases


def launch_case(case: Case, n_tokens: int = 256, dim: int = 256, vocab: int = 1024) -> None:
    """Run the forward and backward launchers (and the KTO sequence kernel) once for ``case``."""
    from halo_ops.kernels import kto_sequence_terms, linear_logprobs_backward, linear_logprobs_forward

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(n_tokens, dim, generator=generator).to(case.dtype)
    weight = torch.randn(vocab, dim, generator=generator).to(case.dtype)
    bias = torch.randn(vocab, generator=generator).to(case.dtype) if case.bias else None
    targets = torch.randint(0, vocab, (n_tokens,), generator=generator)
    from halo_ops.options import TokenOptions
    from halo_ops.partials import STATISTICS
    from halo_ops.token_op import weight_slice_rows
    from halo_ops.transform import LogitTransform

    options = TokenOptions("triton", LogitTransform(softcap=30.0 if case.softcap else None),
                           stats=STATISTICS if case.return_stats else (), schedule=case.schedule,
                           grad_filter_eps=case.grad_filter_eps)
    if isinstance(case.config, dict):  # one kernel's config, as a measured choice travels (options.configs)
        from dataclasses import astuple, replace

        options = replace(options, configs=tuple((kernel, *astuple(c)) for kernel, c in case.config.items()))
    config = {"config": case.config} if case.config is not None and not isinstance(case.config, dict) else {}
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(case.matmul_precision)
    try:
        linear_logprobs_forward(hidden, weight, bias, targets, options, **config)
        linear_logprobs_backward(hidden, weight, bias, targets, torch.zeros(n_tokens), torch.ones(n_tokens), options,
                                 case.needs, slice_rows=weight_slice_rows(vocab, dim, case.dtype), **config)
        if case.forward_gradients:
            from halo_ops.kernels import eager_gradients, jacobian_forward

            jacobian_forward(hidden, weight, bias, targets, options, **config)
            coefficients = lambda r0, r1, partials: (torch.zeros(r1 - r0), torch.ones(r1 - r0))  # noqa: E731
            eager_gradients(hidden, weight, bias, targets, options, n_tokens // 2, coefficients, case.needs, **config)
    finally:
        torch.set_float32_matmul_precision(precision)
    if case.dtype == torch.float32 and not case.bias and case.schedule == "atomic":
        batch = torch.zeros(8)
        kto_sequence_terms(batch, batch, batch > 0, torch.zeros(()), beta=0.1, desirable_weight=1.0,
                           undesirable_weight=1.0, token_stats=(batch, batch, batch))


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(compiled, arch) -> dict:
    """Registers, spills, shared memory, matrix instructions and programs per SM of one compiled kernel."""
    if target_name(arch).startswith("gfx"):
        return amd_resource_usage(compiled, arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump, sass = (subprocess.run([_cuobjdump(), flag, cubin.name], capture_output=True, text=True,
                                     check=True).stdout for flag in ("--dump-resource-usage", "--dump-sass"))
    usage = {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", dump)}
    ptx = compiled.asm["ptx"]
    matrix = ("tcgen05" if "tcgen05.mma" in ptx else "wgmma" if "wgmma.mma_async" in ptx
              else "mma" if re.search(r"\bmma\.sync", ptx) else "none")
    # Read from the machine code, not the PTX: ptxas lowers a PTX atom whose result is unused to a reduction.
    # RED/REDG: fire-and-forget reductions; ATOM/ATOMG: read-modify-write that waits for its result.
    atomics = ("atom" if re.search(r"\bATOMG?\.", sass) else "red" if re.search(r"\bREDG?\.", sass) else "none")
    warps, shared = compiled.metadata.num_warps, compiled.metadata.shared
    limits = ARCH_LIMITS[arch]
    registers_per_program = math.ceil(usage["reg"] * 32 / 256) * 256 * warps  # allocated per warp in 256s
    programs_per_sm = min(
        REGISTERS_PER_SM // registers_per_program,
        limits["shared_per_sm"] // (shared + 1024),  # 1 KiB per program is reserved by the system
        limits["warps_per_sm"] // warps,
        MAX_PROGRAMS_PER_SM,
    )
    return {
        "registers": usage["reg"],
        "spill_bytes": usage["local"] + usage["stack"],
        "shared_bytes": shared,
        "fits": shared <= limits["max_shared_per_block"],
        "matrix": matrix,
        "atomics": atomics,
        "warps": warps,
        "stages": compiled.metadata.num_stages,
        "programs_per_sm": programs_per_sm,
    }


def amd_resource_usage(compiled, arch: str) -> dict:
    """The same row for an AMD target, from the AMDGCN assembly's metadata: ``registers`` are VGPRs per lane
    (AGPRs included), ``spill_bytes`` the scratch per lane plus the spilled VGPRs and SGPRs (4 bytes each),
    ``programs_per_sm`` the waves per SIMD the compiler reports."""
    amdgcn = compiled.asm["amdgcn"]

    def field(pattern: str) -> int:
        found = re.findall(pattern, amdgcn)
        return max(int(x) for x in found) if found else 0

    vgprs = field(r"; TotalNumVgprs: (\d+)") or field(r"\.vgpr_count:\s+(\d+)")
    spilled = field(r"\.vgpr_spill_count:\s+(\d+)") + field(r"\.sgpr_spill_count:\s+(\d+)")
    scratch = field(r"; ScratchSize: (\d+)") or field(r"\.private_segment_fixed_size:\s+(\d+)")
    shared = compiled.metadata.shared
    # a float add the hardware does in memory: "red" without a returned value (no glc/sc0 modifier), "atom" with
    # one; "cas": a compare-and-swap loop where the arch has no such add
    adds = re.findall(r"^\s*(?:global|buffer|flat)_atomic_(?:pk_)?add_(?:f32|bf16|f16)\b.*$", amdgcn, re.M)
    atomics = ("cas" if re.search(r"\b(global|buffer|flat)_atomic_cmpswap", amdgcn)
               else "atom" if any(re.search(r"\b(glc|sc0)\b", line) for line in adds)
               else "red" if adds else "none")
    return {
        "registers": vgprs,
        "sgprs": field(r"\.sgpr_count:\s+(\d+)"),
        "spill_bytes": scratch + 4 * spilled,
        "shared_bytes": shared,
        "fits": shared <= AMD_LIMITS[arch]["lds_per_workgroup"],
        "matrix": "mfma" if re.search(r"\bv_mfma_", amdgcn) else "none",
        "atomics": atomics,
        "warps": compiled.metadata.num_warps,
        "stages": compiled.metadata.num_stages,
        "programs_per_sm": field(r"; Occupancy: (\d+)"),
    }


def build(cases: list[Case], arch) -> list[dict]:
    """One row per compiled kernel: the case, the kernel and its resource usage on ``sm_<arch>`` or ``gfx…``."""
    rows = []
    for case in cases:
        with compiling_for(arch) as launches:
            launch_case(case)
        seen = set()
        for name, compiled in launches:
            if name in seen:
                continue
            seen.add(name)
            rows.append({"arch": target_name(arch), "case": case.label, "kernel": name,
                         **resource_usage(compiled, arch)})
    return rows


def problems(rows: list[dict], *, tensor_cores: bool = True) -> list[str]:
    """What would go wrong on the GPU: spills, shared memory over the limit, half-precision GEMMs
    without matrix instructions, accumulations through returning atomics (ATOM in the SASS)."""
    found = []
    for row in rows:
        where = f"{row['arch']} {row['case']}: {row['kernel']}"
        if row["spill_bytes"]:
            found.append(f"{where} spills {row['spill_bytes']} bytes")
        if not row["fits"]:
            found.append(f"{where} needs {row['shared_bytes']} bytes of shared memory, over the limit")
        half = not row["case"].startswith("float32") or "TF32" in row["case"]
        if tensor_cores and half and row["kernel"].startswith("linear_logprobs") and row["matrix"] == "none":
            found.append(f"{where} uses no tensor-core instructions")
        if row["atomics"] == "atom":
            found.append(f"{where} uses returning atomics (ATOM in its SASS, glc/sc0 in its AMDGCN): accumulations "
                         "need only reductions")
        if row["atomics"] == "cas":
            found.append(f"{where} accumulates through a compare-and-swap loop, not a hardware float atomic add")
    return found


def markdown(rows: list[dict]) -> str:
    columns = ["arch", "case", "kernel", "registers", "sgprs", "spill_bytes", "shared_bytes", "matrix", "atomics",
               "warps", "stages", "programs_per_sm"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cross_compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="80,89,90,100,gfx942,gfx950", help=f"comma list of {', '.join(map(str, ARCHS))}")
    parser.add_argument("--dtype", default=None, help="only the cases of this dtype (bfloat16, float16, float32)")
    parser.add_argument("--config", default=None,
                        help="BLOCK_N,BLOCK_V,BLOCK_D,warps,stages for every launch (default: the launchers' own)")
    parser.add_argument("--candidates", action="store_true",
                        help="build the autotuner's candidate configs (kernels.config.CANDIDATES) instead")
    parser.add_argument("--out", type=Path, default=None, help="write <name>.md and <name>.json here")
    parser.add_argument("--name", default="cross-compile", help="results file stem (default: cross-compile)")
    args = parser.parse_args(argv)
    import triton

    cases = [c for c in standard_cases() if args.dtype is None or c.label.startswith(args.dtype)]
    if args.config:
        from dataclasses import replace

        from halo_ops.kernels import BlockConfig

        config = BlockConfig(*(int(x) for x in args.config.split(",")))
        cases = [replace(c, config=config) for c in cases]
    rows = []
    for arch in parse_archs(args.arch):
        arch_cases = candidate_cases(arch) if args.candidates else cases
        rows += build([c for c in arch_cases if args.dtype is None or c.label.startswith(args.dtype)], arch)
    from .report import environment

    date = environment(torch.device("cpu"))["date"]
    text = (f"Built {date} with triton {triton.__version__} and torch {torch.__version__}, on a machine without a "
            f"GPU (`python -m bench.cross_compile --arch {args.arch}`).\n\n" + markdown(rows))
    print(text)
    found = problems(rows)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        flagged = "".join(f"- PROBLEM: {line}\n" for line in found) or "- no problem found\n"
        (args.out / f"{args.name}.md").write_text("# Kernel resource usage per architecture\n\n" + text
                                                 + "\nChecks (spills, shared memory, tensor cores, returning atomics):\n\n"
                                                 + flagged)
        (args.out / f"{args.name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    for line in found:
        print("PROBLEM:", line)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
