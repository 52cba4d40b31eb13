"""Shared bits of the benchmark scripts: imports, machine description, timing.

Not a test module; the scripts in this folder print figures, they assert nothing.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

def cpu_name() -> str:
    """Model name and family/model numbers from /proc/cpuinfo (VMs often hide the name)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown CPU"
    flags = info.get("flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    if "amx_tile" in flags:
        isa += "+AMX"
    return (f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family', '?')} "
            f"model {info.get('model', '?')}, {info.get('cpu MHz', '?')} MHz, {isa})")


def machine(device: torch.device) -> str:
    lines = [f"CPU: {cpu_name()}, {os.cpu_count()} logical cores",
             f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, python {platform.python_version()}"]
    if device.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}")
    return "\n".join(lines)


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Fraction of all cores busy over `seconds` (from /proc/stat), while this process sleeps."""
    def read():
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle
    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def check_idle(label: str = "before") -> float:
    """Print how busy the machine is; other processes on a 2-core machine distort every figure."""
    busy = cpu_busy_fraction()
    note = ""
    if busy > 0.10:
        note = ("  WARNING: other processes use the CPU; with 2 intra-op threads a busy core can slow "
                "PyTorch several-fold (threads wait for each other), so these figures are not reliable")
    print(f"CPU busy {label} the run (other processes): {100 * busy:.0f}%{note}", flush=True)
    return busy


class OtherLoad:
    """CPU used by *other* processes while a block runs, as a fraction of all cores.

    From /proc/stat (all processes) minus this process's own CPU time: on a
    shared 2-core machine, another process using one core reads 0.5.
    """

    def __init__(self):
        self.fraction = float("nan")

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        total = sum(fields[:8]) / tick  # steal included: a VM's stolen time is load too
        idle = (fields[3] + fields[4]) / tick
        own = sum(os.times()[:2])
        return total, total - idle, own

    def __enter__(self) -> "OtherLoad":
        try:
            self._start = self._sample()
        except (OSError, ValueError, IndexError):
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        if self._start is None:
            return
        total, busy, own = (b - a for a, b in zip(self._start, self._sample()))
        self.fraction = max(0.0, busy - own) / max(total, 1e-9)


def wait_until_idle(max_wait: float, threshold: float = 0.05) -> float:
    """Sleep (up to max_wait seconds) until other processes use < threshold of the CPU."""
    deadline = time.monotonic() + max_wait
    busy = cpu_busy_fraction()
    while busy >= threshold and time.monotonic() < deadline:
        busy = cpu_busy_fraction(2.0)
    return busy


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Sections:
    """Accumulated wall time per named section (synchronising CUDA at each boundary)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        sync(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def report(self, n_batches: int, indent: str = "    ") -> str:
        total = sum(self.seconds.values())
        return "\n".join(f"{indent}{name:<26s}{1000 * s / max(n_batches, 1):9.1f} ms/batch {100 * s / total:6.1f}%"
                         for name, s in self.seconds.items())


def median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times
