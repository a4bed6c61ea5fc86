"""schedule="auto" measured on first use (halo_ops.autotune): the cache is written, reused, invalidated by a new
version, off under HALO_OPS_AUTOTUNE=0, never filled while torch.compile traces; the winner is checked against the
gemm schedule. Under the interpreter (HALO_OPS_AUTOTUNE=1) with an injected clock, and once with real timings."""

import json

import pytest
import torch

import halo_ops
from halo_ops import autotune, linear_logprobs, token_op
from halo_ops.kernels import config as kconfig

from .conftest import DEVICE

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not halo_ops.kernels.interpreting(),
                                reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")

FAST = {"owner": 1e-3, "fold": 5e-4}  # the injected clock: owner is the fastest schedule


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    """Autotuning on, an empty cache directory, this process's choices forgotten; yields the measured labels."""
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(autotune, "_choices", {})
    measured = []
    real_measure = autotune.measure
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: measured.append(1) or real_measure(*a, **k))
    yield measured


def injected_clock(monkeypatch, times: dict, calls: list | None = None):
    """time_call answers from ``times`` by the candidate's schedule (and its first config's BLOCK_N): no timing."""
    real_step = autotune.step

    def step(options, *args):
        call = real_step(options, *args)
        call.options = options
        return call

    def time_call(call, device, repeats):
        options = call.options
        if calls is not None:
            calls.append((options.schedule, options.configs))
        if options.configs:
            return times.get("config", {}).get(options.configs[0][1:], 2e-3)
        return times.get(options.schedule, 2e-3)

    monkeypatch.setattr(autotune, "step", step)
    monkeypatch.setattr(autotune, "time_call", time_call)


def inputs(tokens=40, dim=16, vocab=100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=gen).to(DEVICE).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) * 0.5).to(DEVICE).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(DEVICE)
    return hidden, weight, targets


def schedules_run(monkeypatch) -> list:
    """The schedules the token op's backward runs with, call by call."""
    runs = []
    real = token_op.backward_accumulators
    monkeypatch.setattr(token_op, "backward_accumulators",
                        lambda options, *a, **k: runs.append((options.schedule, options.configs)) or real(options, *a, **k))
    return runs


def grads(hidden, weight, targets, **kwargs):
    leaves = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    out = linear_logprobs(leaves[0], leaves[1], targets, **kwargs)
    (out * torch.linspace(-1, 2, out.shape[0], device=out.device)).sum().backward()
    return out.detach(), leaves[0].grad, leaves[1].grad


def test_first_call_measures_then_the_cache_serves(tuning, monkeypatch, tmp_path):
    import dataclasses

    fields = dataclasses.astuple(kconfig.CANDIDATES["float32"]["forward"][1])  # what the injected clock favours
    injected_clock(monkeypatch, {"owner": 1e-3, "config": {fields: 5e-4}})
    runs = schedules_run(monkeypatch)
    hidden, weight, targets = inputs()
    expected = grads(hidden, weight, targets, impl="torch")
    got = grads(hidden, weight, targets)
    assert tuning == [1]
    entries = json.loads(autotune.cache_file().read_text())["entries"]
    (key, entry), = entries.items()
    assert key.endswith("|float32|D=16|V<=65536|N<=1024|-|hw")
    assert entry["schedule"] == "owner"
    assert [list(c[1:]) for c in entry["configs"]] == [list(fields)]
    assert set(entry["ms"]) >= {"atomic", "owner", "slab", "gemm"}
    assert runs[-1][0] == "owner" and runs[-1][1][0][1:] == fields  # the op ran the measured choice
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-4)
    grads(hidden, weight, targets)  # the same key again: from memory
    monkeypatch.setattr(autotune, "_choices", {})  # a new process: from the file
    grads(hidden, weight, targets)
    assert tuning == [1] and runs[-1][0] == "owner"
    grads(*inputs(tokens=2000))  # another token bucket: another key
    assert tuning == [1, 1] and len(json.loads(autotune.cache_file().read_text())["entries"]) == 2


def test_a_new_version_measures_again(tuning, monkeypatch):
    injected_clock(monkeypatch, FAST)
    hidden, weight, targets = inputs()
    grads(hidden, weight, targets)
    first = autotune.cache_file()
    monkeypatch.setattr(halo_ops, "__version__", "99.0")
    monkeypatch.setattr(autotune, "_choices", {})
    grads(hidden, weight, targets)
    assert tuning == [1, 1] and autotune.cache_file() != first and autotune.cache_file().exists()


def test_off_under_autotune_0_and_while_compiling(tuning, monkeypatch):
    injected_clock(monkeypatch, FAST)
    runs = schedules_run(monkeypatch)
    hidden, weight, targets = inputs()
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "0")
    grads(hidden, weight, targets)
    assert tuning == [] and runs[-1] == ("gemm", ())  # the written prediction
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, w, t: linear_logprobs(h, w, t, reduction="sum"), fullgraph=True)
    leaf = hidden.detach().clone().requires_grad_()
    compiled(leaf, weight, targets).sum().backward()
    assert tuning == [] and runs[-1] == ("gemm", ())  # nothing cached: the prediction, and no measuring inside
    grads(hidden, weight, targets)  # eager: measures
    assert tuning == [1] and runs[-1][0] == "owner"
    torch._dynamo.reset()
    compiled(leaf, weight, targets).sum().backward()  # traced again: the cached choice, read as a constant
    assert tuning == [1] and runs[-1][0] == "owner"


def test_a_winner_that_differs_from_the_gemm_schedule_is_dropped(tuning, monkeypatch):
    injected_clock(monkeypatch, FAST)
    real_step = autotune.step

    def step(options, *args):  # the owner schedule "is wrong on this GPU"
        call = real_step(options, *args)
        if options.schedule != "owner":
            return call
        wrong = lambda: tuple(x + 1.0 for x in call())  # noqa: E731
        wrong.options = getattr(call, "options", options)
        return wrong

    monkeypatch.setattr(autotune, "step", step)
    hidden, weight, targets = inputs()
    with pytest.warns(RuntimeWarning, match="differs from the gemm schedule"):
        grads(hidden, weight, targets)
    (entry,) = json.loads(autotune.cache_file().read_text())["entries"].values()
    assert entry["schedule"] == "gemm" and entry["configs"] == []


def test_deterministic_and_forward_only_keys(tuning, monkeypatch):
    calls = []
    injected_clock(monkeypatch, {"atomic": 1e-4}, calls)
    hidden, weight, targets = inputs()
    grads(hidden, weight, targets, deterministic=True)
    assert "atomic" not in {s for s, _ in calls}  # run-dependent sums are not candidates
    calls.clear()
    with torch.no_grad():
        linear_logprobs(hidden, weight, targets)
    assert {s for s, c in calls if not c} == {"atomic", "gemm"}  # forward only: the fused kernel or the GEMMs
    keys = list(json.loads(autotune.cache_file().read_text())["entries"])
    assert any(k.endswith("|d|hw") for k in keys) and any(k.endswith("|forward") for k in keys)


def test_real_timings_at_a_tiny_shape(tuning, monkeypatch):
    """No injected clock: every schedule timed for real, the fastest kept, the budget bounding the config stage."""
    monkeypatch.setattr(autotune, "BUDGET_SECONDS", 1.0)
    monkeypatch.setattr(autotune, "REPEATS", 1)
    hidden, weight, targets = inputs(tokens=24, dim=16, vocab=64)
    expected = grads(hidden, weight, targets, impl="torch")
    got = grads(hidden, weight, targets)
    (entry,) = json.loads(autotune.cache_file().read_text())["entries"].values()
    by_schedule = {s: entry["ms"][s] for s in ("atomic", "owner", "slab", "gemm")}
    assert entry["schedule"] == min(by_schedule, key=by_schedule.get)
    assert entry["seconds"] > 0 and all(ms > 0 for ms in entry["ms"].values())
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-4)


def test_the_setting_is_checked(monkeypatch):
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "yes")
    with pytest.raises(ValueError, match="HALO_OPS_AUTOTUNE must be 0 or 1"):
        autotune.enabled(torch.device("cpu"))
    monkeypatch.delenv(autotune.ENV_AUTOTUNE)
    assert autotune.enabled(torch.device("cpu")) is False  # unset: CUDA only


def test_the_command_line_measures_a_shape_ahead_of_use(tuning, monkeypatch, capsys):
    """python -m halo_ops.autotune measures one key and prints its entry; the op then finds it cached."""
    injected_clock(monkeypatch, FAST)
    shape = ["--tokens", "40", "--hidden", "16", "--vocab", "100", "--dtype", "fp32", "--device", DEVICE]
    assert autotune.main(shape) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["schedule"] == "owner" and printed["from_cache"] is False and tuning == [1]
    assert autotune.main(shape) == 0 and json.loads(capsys.readouterr().out)["from_cache"] is True
    grads(*inputs())  # the same key: nothing measured
    assert tuning == [1]


def test_paths_that_run_no_schedule_measure_nothing(tuning, monkeypatch):
    """The frozen head's Jacobian and the fused KTO op's eager schedule run kernels of their own: their first call
    times and compiles no schedule. With recompute=True the fused op runs the token op's schedule, measured."""
    injected_clock(monkeypatch, FAST)
    hidden, weight, targets = inputs(tokens=32)
    frozen = linear_logprobs(hidden, weight.detach(), targets)
    frozen.sum().backward()
    assert tuning == []
    labels = torch.tensor([True, False], device=DEVICE)
    ref = torch.zeros(2, device=DEVICE)
    shaped = (hidden.detach().view(2, 16, -1).requires_grad_(), weight, targets.view(2, 16))
    halo_ops.fused_linear_kto_loss(*shaped, labels, ref).loss.backward()
    assert tuning == []
    halo_ops.fused_linear_kto_loss(*shaped, labels, ref, recompute=True).loss.backward()
    assert tuning == [1]
