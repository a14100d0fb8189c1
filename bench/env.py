"""The environment a measurement was taken in, for every results file."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "triton", "numpy", "safetensors", "mtkahypar", "sparse-ops")


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() + ("+dirty" if dirty else "")


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_ALLOCATOR: dict[str, object] = {"steady": False}


def steady_allocator() -> dict[str, object]:
    """Keep freed memory in the process (glibc: no mmap for large blocks, no trimming).

    By default glibc hands every large freed block back to the kernel, so each forward
    pass faults in and zeroes its activations afresh: about 3,000 page faults and 3–4 ms
    of a 20 ms res20s pass on this project's CPU machine, and a varying share, since the
    threshold adapts to what ran before. A benchmark measures the layers, not the page
    zeroing, and should not depend on which provider ran first: set once, for every
    provider alike (as the jemalloc/tcmalloc setups of CPU inference guides do).
    Recorded in :func:`environment`. Other C libraries: left as they are."""
    if not _ALLOCATOR["steady"]:
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
        except (OSError, AttributeError):
            ok = False
        _ALLOCATOR.update(
            steady=ok,
            how="glibc mallopt: M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB"
            if ok
            else "unchanged (not glibc)",
        )
    return dict(_ALLOCATOR)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "commit": git_commit(),
        "allocator": dict(_ALLOCATOR),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_sm_count"] = props.multi_processor_count
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["driver"] = nvidia_driver()
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def device_slug(device: torch.device | str) -> str:
    """A folder name for results: ``cpu`` or the GPU's name (``nvidia-h100-80gb-hbm3``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to measure on: ``device`` checked, or CUDA when there is one, else CPU.

    Raises :class:`bench.BenchError` for a name torch does not know or a device this
    machine lacks, before any work starts."""
    from . import BenchError

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise BenchError(f"unknown device {device!r}: use cpu or cuda (cuda:N)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"device {device!r}: no CUDA device here (use --device cpu)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise BenchError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices")
    elif resolved.type != "cpu":
        raise BenchError(f"device {device!r}: only cpu and cuda are supported")
    return resolved
