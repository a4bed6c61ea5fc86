"""Launch configs: the per-(kernel, arch, dtype, D bucket, V bucket) table, its defaults, the autotuner
that writes it, and the cross-compile check that every specialization builds for real GPUs."""

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from halo_ops.kernels import BlockConfig, linear_logprobs_backward
from halo_ops.kernels import config as kconfig

from ._cases import token_options, triton_forward

ROOT = Path(__file__).resolve().parents[1]
TUNED = BlockConfig(block_n=16, block_v=32, block_d=16, num_warps=1, num_stages=1)


def write_table(path: Path, entries: list[dict]) -> str:
    path.write_text(json.dumps({"entries": entries}))
    return str(path)


def entry(kernel="forward", arch="sm_90", dtype="bfloat16", hidden_bucket=4096, vocab_bucket=163840,
          config=TUNED) -> dict:
    return {"kernel": kernel, "arch": arch, "dtype": dtype, "hidden_bucket": hidden_bucket,
            "vocab_bucket": vocab_bucket, "config": asdict(config)}


def test_defaults_per_dtype_and_architecture():
    forward_fp32 = kconfig.select_config("forward", torch.float32, 4096, 128256, None)
    assert forward_fp32 == kconfig.FP32_KERNEL_CONFIGS["forward"] != kconfig.FP32_CONFIG  # one stage: no spill
    assert kconfig.select_config("slab", torch.float32, 4096, 128256, None) == kconfig.FP32_CONFIG
    for dtype in (torch.bfloat16, torch.float16):
        for kernel in kconfig.KERNELS:
            assert kconfig.select_config(kernel, dtype, 4096, 128256, None) == kconfig.HALF_CONFIG
            assert kconfig.select_config(kernel, dtype, 4096, 128256, "sm_90") == kconfig.HALF_CONFIG
        on_blackwell = kconfig.select_config("backward_dw", dtype, 4096, 128256, "sm_100")
        assert on_blackwell == kconfig.HALF_ARCH_CONFIGS[("backward_dw", "sm_100")] != kconfig.HALF_CONFIG
        assert kconfig.default_config("backward_dw", dtype, "sm_100") == on_blackwell  # the autotuner's baseline
    assert kconfig.select_config("backward_dw", torch.float32, 4096, 128256, "sm_100") == kconfig.FP32_CONFIG


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_tf32_takes_its_own_tiles_and_table_entries(precision, monkeypatch):
    """float32 at a matmul precision below "highest" runs its dots as TF32: tensor-core tiles, not the exact fp32
    ones (BLOCK_D 16, one stage), and table entries of its own."""
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision)
    assert kconfig.precision_class(torch.float32) == "tf32" and kconfig.precision_class(torch.bfloat16) == "bfloat16"
    for kernel in kconfig.KERNELS:
        assert kconfig.select_config(kernel, torch.float32, 4096, 128256, "sm_90") == kconfig.TF32_CONFIG
    assert kconfig.table_key("forward", "sm_90", torch.float32, 4096, 128256)[2] == "tf32"
    assert kconfig.candidate_configs("forward", torch.float32, "sm_90")[1:] == \
        kconfig.CANDIDATES["tf32"]["forward"] + kconfig.CANDIDATES["tf32_large"]["forward"]


def test_candidates_by_architecture():
    """Hopper and Blackwell try the 128-row tiles beside the rest; Ampere and Ada do not; the default comes first."""
    for arch in ("sm_90", "sm_100"):
        tried = kconfig.candidate_configs("backward", torch.bfloat16, arch)
        assert tried[0] == kconfig.HALF_CONFIG and set(kconfig.CANDIDATES["half_large"]["backward"]) <= set(tried)
        assert BlockConfig(128, 128, 64, 16, 3) in tried
    for arch in ("sm_80", "sm_89", None):
        tried = kconfig.candidate_configs("backward", torch.bfloat16, arch)
        assert tried[1:] == kconfig.CANDIDATES["half"]["backward"]
    assert kconfig.candidate_configs("backward_dw", torch.bfloat16, "sm_100")[0] == \
        kconfig.HALF_ARCH_CONFIGS[("backward_dw", "sm_100")]
    assert kconfig.candidate_configs("forward", torch.float32, "sm_90")[0] == kconfig.FP32_KERNEL_CONFIGS["forward"]


def test_shipped_table_parses():
    table = kconfig.tuned_configs(str(kconfig.TUNED_TABLE))
    for (kernel, arch, dtype, hidden_bucket, vocab_bucket), config in table.items():
        assert kernel in kconfig.KERNELS and arch.startswith("sm_") and dtype in ("float32", "bfloat16", "float16")
        assert hidden_bucket in kconfig.HIDDEN_BUCKETS and vocab_bucket in kconfig.VOCAB_BUCKETS
        assert isinstance(config, BlockConfig)


@pytest.mark.parametrize(
    ("hidden", "vocab", "arch", "dtype", "tuned"),
    [
        (4096, 128256, "sm_90", torch.bfloat16, True),
        (2049, 151936, "sm_90", torch.bfloat16, True),  # same buckets: 2049..4096, 65537..163840
        (2048, 128256, "sm_90", torch.bfloat16, False),  # D bucket below
        (4096, 256000, "sm_90", torch.bfloat16, False),  # V bucket above
        (4096, 128256, "sm_80", torch.bfloat16, False),  # another GPU
        (4096, 128256, "sm_90", torch.float16, False),  # another dtype
        (4096, 128256, None, torch.bfloat16, False),  # no GPU: the defaults
    ],
)
def test_table_lookup_by_bucket(tmp_path, monkeypatch, hidden, vocab, arch, dtype, tuned):
    monkeypatch.setenv(kconfig.TUNED_TABLE_ENV, write_table(tmp_path / "t.json", [entry()]))
    expected = TUNED if tuned else kconfig.HALF_CONFIG
    assert kconfig.select_config("forward", dtype, hidden, vocab, arch) == expected
    assert kconfig.select_config("backward", dtype, hidden, vocab, arch) == kconfig.HALF_CONFIG


def test_table_with_unknown_kernel_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(kconfig.TUNED_TABLE_ENV, write_table(tmp_path / "t.json", [entry(kernel="fwd")]))
    with pytest.raises(ValueError, match="unknown kernel 'fwd'"):
        kconfig.select_config("forward", torch.bfloat16, 4096, 128256, "sm_90")


def test_launchers_take_each_kernels_config_from_the_table(tmp_path, monkeypatch):
    """With a table entry for this 'GPU', each launcher launches with it, and the results do not change."""
    from halo_ops.kernels import linear_logprobs_bwd, linear_logprobs_fwd

    if not (kconfig.interpreting() or torch.cuda.is_available()):
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 24, generator=gen).to(device)
    weight = torch.randn(70, 24, generator=gen).to(device)
    targets = torch.randint(0, 70, (40,), generator=gen).to(device)
    grad = torch.randn(40, generator=gen).to(device)
    def run():
        logps, lse, _ = triton_forward(hidden, weight, None, targets, token_options())
        atomic = linear_logprobs_backward(hidden, weight, None, targets, lse, grad, token_options(), (True, True, False))
        owned = linear_logprobs_backward(hidden, weight, None, targets, lse, grad, token_options(deterministic=True),
                                         (True, True, False))
        return logps, *atomic[:2], *owned[:2]

    expected = run()
    dh_config = BlockConfig(block_n=32, block_v=16, block_d=16, num_warps=2, num_stages=1)
    table = [entry(kernel=k, arch="sm_test", dtype="float32", hidden_bucket=1024, vocab_bucket=65536,
                   config=dh_config if k == "backward_dh" else TUNED) for k in kconfig.KERNELS]
    monkeypatch.setenv(kconfig.TUNED_TABLE_ENV, write_table(tmp_path / "t.json", table))
    launched = []
    monkeypatch.setattr(kconfig, "device_arch", lambda _device: "sm_test")
    for module in (linear_logprobs_fwd, linear_logprobs_bwd):
        real = module.launch_options
        monkeypatch.setattr(module, "launch_options", lambda cfg, real=real: launched.append(cfg) or real(cfg))
    got = run()
    assert launched == [TUNED, TUNED, dh_config, TUNED]  # forward, backward, backward_dh, backward_dw
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    # a measured choice (halo_ops.autotune) travels in the options and takes precedence over the table
    measured = BlockConfig(block_n=16, block_v=16, block_d=16, num_warps=1, num_stages=1)
    launched.clear()
    options = dataclasses.replace(token_options(), configs=(("forward", *dataclasses.astuple(measured)),))
    logps = triton_forward(hidden, weight, None, targets, options)[0]
    assert launched == [measured]
    torch.testing.assert_close(logps, expected[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("precision", "expected"), [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_float32_dots_follow_torch_matmul_precision(precision, expected):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        assert kconfig.dot_options(torch.float32)["INPUT_PRECISION"] == expected
    finally:
        torch.set_float32_matmul_precision(before)


# --- the autotuner ---------------------------------------------------------------------------------


def fake_timer(fastest: BlockConfig):
    """Times from the config alone, so the winner is known: ``fastest`` takes 1 ms, the rest 2 ms."""

    def timer(call, device, repeats):
        return 1e-3 if call.config == fastest else 2e-3

    return timer


@pytest.fixture
def autotune(monkeypatch):
    from bench import autotune

    real = autotune.kernel_call

    def tagged(kernel, hidden, weight, targets, config):
        call = real(kernel, hidden, weight, targets, config)
        call.config = config
        return call

    monkeypatch.setattr(autotune, "kernel_call", tagged)
    return autotune


@pytest.mark.parametrize("kernel", list(kconfig.KERNELS))
def test_autotune_checks_and_times_every_candidate(autotune, kernel):
    from bench.measure import Shape

    if not (kconfig.interpreting() or torch.cuda.is_available()):
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    shape = Shape(tokens=48, hidden=24, vocab=100, dtype=torch.float32)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    broken = BlockConfig(block_n=16, block_v=24, block_d=12)  # not powers of two: tl.arange refuses them
    rows = autotune.tune(kernel, shape, device, [TUNED, broken], timer=fake_timer(TUNED))
    assert [r["config"] for r in rows] == [kconfig.default_config(kernel, torch.float32, None), TUNED, broken]
    assert rows[0]["default"] and rows[0]["error"] < autotune.TOLERANCE["float32"]
    assert rows[1]["ms"] == 1.0 and rows[1]["error"] < autotune.TOLERANCE["float32"]
    assert rows[2]["ms"] is None and "failure" in rows[2]
    assert autotune.best(rows, min_gain=0.03)["config"] == TUNED
    assert autotune.best(rows, min_gain=0.6) is None  # 2 ms → 1 ms is a 50% gain


def test_autotune_writes_a_table_the_launchers_read(autotune, tmp_path, monkeypatch):
    if not (kconfig.interpreting() or torch.cuda.is_available()):
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.setattr(autotune, "median_seconds", fake_timer(TUNED))
    autotune.main(["--device", "cuda" if torch.cuda.is_available() else "cpu", "--tokens", "48", "--hidden", "24",
                   "--vocab", "100", "--dtype", "fp32", "--kernels", "forward,backward", "--arch", "sm_test",
                   "--candidates", "16,32,16,1,1", "--out", str(tmp_path)])
    table = json.loads((tmp_path / "tuned_configs.json").read_text())
    assert [(e["kernel"], e["arch"], e["dtype"]) for e in table["entries"]] == [
        ("forward", "sm_test", "float32"), ("backward", "sm_test", "float32")]
    report = (tmp_path / "autotune.md").read_text()
    assert "| forward | 48 | 24 | 100 | float32 | 16 | 32 | 16 | 1 | 1 | 1.000 |" in report
    monkeypatch.setenv(kconfig.TUNED_TABLE_ENV, str(tmp_path / "tuned_configs.json"))
    assert kconfig.select_config("forward", torch.float32, 24, 100, "sm_test") == TUNED
    assert kconfig.select_config("backward_dh", torch.float32, 24, 100, "sm_test") == kconfig.FP32_CONFIG


# --- cross-compilation for real GPUs ---------------------------------------------------------------


def test_every_specialization_builds_for_ampere_ada_hopper_and_blackwell(tmp_path):
    """Each kernel specialization the ops launch compiles for sm_80, sm_89, sm_90 and sm_100 with no
    register spills, within the architecture's shared memory, on tensor cores for half precision
    (wgmma on Hopper, tcgen05 on Blackwell), and accumulates through relaxed reductions. Runs in a
    process of its own: the kernels must be compiled, not interpreted."""
    pytest.importorskip("triton")
    from bench.cross_compile import _cuobjdump

    if not os.path.exists(_cuobjdump()):
        pytest.skip("this Triton install has no NVIDIA toolchain (cuobjdump)")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    result = subprocess.run([sys.executable, "-m", "bench.cross_compile", "--arch", "80,89,90,100", "--out",
                             str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "TRITON_DEFAULT_FP_FUSION" not in result.stderr  # every launch says whether it contracts to FMAs
    rows = json.loads((tmp_path / "cross-compile.json").read_text())
    built = {(r["arch"], r["kernel"]) for r in rows}
    for arch in ("sm_80", "sm_89", "sm_90", "sm_100"):
        for kernel in ("linear_logprobs_fwd_kernel", "linear_logprobs_bwd_kernel", "linear_logprobs_bwd_dh_kernel",
                       "linear_logprobs_bwd_dw_kernel", "kto_sequence_kernel"):
            assert (arch, kernel) in built
    for arch, matrix in (("sm_90", "wgmma"), ("sm_100", "tcgen05")):
        half = [r for r in rows if r["arch"] == arch and r["case"].startswith(("bfloat16", "float16"))
                and r["kernel"].startswith("linear_logprobs")]
        assert half and all(r["matrix"] == matrix for r in half), arch
    assert all(r["spill_bytes"] == 0 and r["fits"] for r in rows)
    atomic = [r for r in rows if r["kernel"] == "linear_logprobs_bwd_kernel"]
    assert atomic and all(r["atomics"] == "red" for r in atomic)  # relaxed reductions, no acq_rel round trips


def test_every_specialization_builds_for_amd_instinct(tmp_path):
    """The same specializations compile for MI300X (gfx942) and MI355X (gfx950) through Triton's AMD backend,
    with no scratch or spilled registers, within the LDS a workgroup may use, on MFMA instructions for every dot
    (half precision and fp32 alike), and accumulating through in-memory float adds that return nothing."""
    amd = pytest.importorskip("triton.backends.amd.compiler")
    if hasattr(amd.HIPBackend, "path_to_rocm_lld"):  # older Triton links with ROCm's ld.lld, not in its wheel
        try:
            amd.HIPBackend.path_to_rocm_lld()
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"this Triton's AMD backend needs a ROCm install to link: {exc}")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    result = subprocess.run([sys.executable, "-m", "bench.cross_compile", "--arch", "gfx942,gfx950", "--out",
                             str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "TRITON_DEFAULT_FP_FUSION" not in result.stderr
    rows = json.loads((tmp_path / "cross-compile.json").read_text())
    for arch in ("gfx942", "gfx950"):
        built = {r["kernel"] for r in rows if r["arch"] == arch}
        assert {"linear_logprobs_fwd_kernel", "linear_logprobs_bwd_kernel", "linear_logprobs_bwd_dh_kernel",
                "linear_logprobs_bwd_dw_kernel", "dlogits_slab_kernel", "logits_fold_kernel", "exp_weights_kernel",
                "kto_sequence_kernel"} <= built
        dots = [r for r in rows if r["arch"] == arch and r["kernel"].startswith("linear_logprobs")]
        assert dots and all(r["matrix"] == "mfma" for r in dots)
        assert all(r["warps"] == 8 and r["stages"] == 2 for r in dots if not r["case"].startswith("float32"))
    assert all(r["spill_bytes"] == 0 and r["fits"] and r["programs_per_sm"] >= 1 for r in rows)
    atomic = [r for r in rows if r["kernel"] == "linear_logprobs_bwd_kernel"]
    assert atomic and all(r["atomics"] == "red" for r in atomic)


def test_amd_gpus_are_named_and_configured_as_such(monkeypatch):
    """ROCm's torch reports its GPUs as cuda devices with capability (9, 4): the arch comes from gcnArchName, the
    configs from the AMD entries (AMD options passed only there), the dot precisions from what the arch has."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(gcnArchName="gfx942:sramecc+:xnack-"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 4))
    assert kconfig.device_arch(torch.device("cuda")) == "gfx942"
    for arch in kconfig.AMD_ARCHS:
        half = kconfig.select_config("forward", torch.bfloat16, 4096, 128256, arch)
        assert half == kconfig.AMD_HALF_CONFIGS[arch] and half.num_stages == 2 and half.matrix_instr_nonkdim == 16
        assert kconfig.launch_options(half)["matrix_instr_nonkdim"] == 16
        assert kconfig.default_config("backward_dw", torch.float32, arch) == kconfig.AMD_FP32_KERNEL_CONFIGS["backward_dw"]
        assert all(not c.waves_per_eu or c in kconfig.CANDIDATES["half_amd"]["forward"]
                   for c in kconfig.candidate_configs("forward", torch.bfloat16, arch))
    assert kconfig.launch_options(kconfig.AMD_HALF_CONFIGS["gfx942"])["kpack"] == 2
    nvidia = kconfig.launch_options(kconfig.HALF_CONFIG)
    assert not {"waves_per_eu", "matrix_instr_nonkdim", "kpack"} & set(nvidia) and nvidia["enable_fp_fusion"] is True
    from triton.backends.amd.compiler import HIPOptions

    bf16x3 = "bf16x3" if "bf16x3" in HIPOptions.allowed_dot_input_precisions else "ieee"  # Triton 3.3: ieee only
    precision = torch.get_float32_matmul_precision()
    try:
        for target, dtype, matmul, expected in ((("hip", "gfx942"), torch.bfloat16, "highest", "ieee"),
                                                (("hip", "gfx942"), torch.float32, "high", "tf32"),
                                                (("hip", "gfx950"), torch.float32, "high", bf16x3),
                                                (("hip", "gfx950"), torch.float32, "highest", "ieee"),
                                                (("cuda", 90), torch.float32, "high", "tf32")):
            monkeypatch.setattr(kconfig, "launch_target", lambda target=target: target)
            torch.set_float32_matmul_precision(matmul)
            assert kconfig.dot_options(dtype)["INPUT_PRECISION"] == expected, (target, dtype, matmul)
    finally:
        torch.set_float32_matmul_precision(precision)


def test_schedule_entries_drive_auto(tmp_path, monkeypatch, autotune):
    """python -m bench.autotune --kernels schedule times every backward schedule, checks it against the atomic
    one, and writes the fastest; impl='auto' then runs that schedule for the architecture and bucket."""
    from bench.measure import Shape
    from halo_ops.inputs import resolve_schedule

    if not (kconfig.interpreting() or torch.cuda.is_available()):
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = Shape(tokens=48, hidden=24, vocab=100, dtype=torch.float32)
    rows = autotune.tune_schedule(shape, device, timer=lambda call, _d, _r: 1e-3 if call.schedule == "owner" else 2e-3)
    assert [r["schedule"] for r in rows] == list(kconfig.BACKWARD_SCHEDULES)
    assert all(r["ms"] is not None and r["error"] < autotune.TOLERANCE["float32"] for r in rows)
    entry = autotune.schedule_entry("sm_test", shape, rows, {"device": "test", "date": "today"})
    assert entry["schedule"] == "owner" and entry["ms"]["slab"] == 2.0
    monkeypatch.setenv(kconfig.TUNED_TABLE_ENV, write_table(tmp_path / "t.json", [entry]))
    monkeypatch.setattr(kconfig, "device_arch", lambda _device: "sm_test")
    pick = {"impl": "triton", "grad_filter_eps": 0.0, "device": device, "dtype": torch.float32, "dim": 24}
    assert resolve_schedule("auto", deterministic=False, vocab=100, **pick) == "owner"
    assert resolve_schedule("auto", deterministic=False, vocab=10**6, **pick) == "gemm"  # no entry: the prediction
    assert resolve_schedule("atomic", deterministic=False, vocab=100, **pick) == "atomic"  # named: as asked


def test_a_missing_fp32_output_gemm_is_found_once_and_warned():
    """The fp32-output GEMM is probed once per device on a tiny product (never inferred from a real GEMM's
    error), and its absence is warned about once."""
    import warnings

    from halo_ops.kernels import slab_backward

    slab_backward.fp32_output_gemm.cache_clear()
    probes = []
    real_addmm = torch.addmm

    def addmm(*args, **kwargs):
        probes.append(kwargs.get("out_dtype"))
        raise RuntimeError("no out_dtype here")

    with warnings.catch_warnings(record=True) as caught, pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("always")
        patch.setattr(torch, "addmm", addmm)
        device = torch.device("cpu")
        assert slab_backward.fp32_output_gemm(device) is False
        assert slab_backward.fp32_output_gemm(device) is False
    assert probes == [torch.float32] and torch.addmm is real_addmm
    assert len([w for w in caught if "no fp32-output GEMM" in str(w.message)]) == 1
    slab_backward.fp32_output_gemm.cache_clear()
