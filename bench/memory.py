"""Peak memory of a call beyond what was live before it, on CPU (process RSS) and CUDA (allocator)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Callable

import torch

_M_MMAP_THRESHOLD = -3
_libc = None


def _glibc():
    """glibc, set so that allocations of 64 KiB and more are mmap'ed and unmapped on free.

    Without it glibc keeps freed memory resident (and raises its mmap threshold as it goes), so a
    second call's peak would not show in the process's resident set at all.
    """
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if hasattr(libc, "mallopt"):
            libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        _libc = libc
    return _libc


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def peak_extra_bytes(fn: Callable[[], object], device: str | torch.device = "cpu") -> tuple[int, object]:
    """Run ``fn`` and return (peak bytes above the memory in use before the call, fn's result).

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU (Linux, glibc): the process's
    resident high-water mark (VmHWM), reset through /proc/self/clear_refs before the call, with
    large allocations mmap'ed so that freed memory leaves the resident set; it counts every page
    the call touched, so it bounds the tensors' peak from above.
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, result
    libc = _glibc()
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    result = fn()
    return (_status_kib("VmHWM") - before) * 1024, result
