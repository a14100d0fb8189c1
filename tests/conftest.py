"""Shared fixtures. Triton kernels run under the interpreter when no GPU is present.

TRITON_INTERPRET is read when a kernel is *defined*, so it is set here, before any
test module imports ``kernels``.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fixed_seeds():
    """Every test starts from the same RNG state, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    # The compile gate's tests last: by then its background job (below) is done or nearly.
    items.sort(key=lambda item: item.path.name == COMPILE_GATE)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# ---------------------------------------------------------------- the compile gate
# tests/test_kernel_compile.py compiles the kernels for GPU targets in a subprocess (a
# few minutes of CPU). When other tests are collected too, it starts right after
# collection with one worker, so it runs on the core the mostly single-threaded
# interpreter tests leave idle, and its test only waits for what is left.

COMPILE_GATE = "test_kernel_compile.py"


class CompileJob:
    def __init__(self, workers: int, folder: str):
        import subprocess
        import sys
        from pathlib import Path

        self.folder = Path(folder)
        self.log = open(self.folder / "kernel_static.log", "w")  # noqa: SIM115 (lives with the job)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        command = [
            sys.executable,
            "-m",
            "sparse_ops_bench.scripts.kernel_static",
            "--matrix",
            "ci",
            "--jobs",
            str(workers),
            "--out",
            str(self.folder),
        ]
        root = Path(__file__).resolve().parents[1]
        # Its own process group, so stop() reaches the compile workers it spawns too.
        self.process = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.log.flush()

    def output(self) -> str:
        return (self.folder / "kernel_static.log").read_text()

    def stop(self) -> None:
        import signal
        import subprocess

        if self.process.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.log.close()


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    gate = [item for item in session.items if item.path.name == COMPILE_GATE]
    if not gate or len(gate) == len(session.items):
        return  # no gate, or nothing else to overlap with: the fixture starts it
    import tempfile

    folder = tempfile.mkdtemp(prefix="sparse-ops-compile-gate-")
    session.config._compile_job = CompileJob(1, folder)


def pytest_unconfigure(config):
    job = getattr(config, "_compile_job", None)
    if job is not None:
        job.stop()


@pytest.fixture(scope="session")
def compile_job(request, tmp_path_factory):
    """The running (or a new) ``sparse_ops_bench.scripts.kernel_static --matrix ci`` job."""
    job = getattr(request.config, "_compile_job", None)
    if job is None:
        job = CompileJob(os.cpu_count() or 1, str(tmp_path_factory.mktemp("kernel_static")))
        request.config._compile_job = job
    return job
