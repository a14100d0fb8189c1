"""The GPU path compiles: kernels built for sm_90a and sm_80 ahead of time, on the CPU.

The interpreter the other kernel tests use never compiles anything, so it cannot see
a type error in a branch, a register spill or a lost vector load. This test compiles
the ``ci`` matrix of ``bench.kernel_static`` (every autotune config × dtype × target on
each kernel's heaviest launch, every other launch the product makes once) with the
specialisation a real launch would get, in a subprocess without ``TRITON_INTERPRET``,
and requires: every compile succeeds, nothing spills, and the aligned channel launches
keep 16-byte asynchronous copies and vector stores (``kernel_static.floor_failures``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _can_compile() -> str | None:
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the platform's wheel
        return f"Triton's NVIDIA backend is not importable here: {e}"
    return None


@pytest.fixture(scope="module")
def ci_report(tmp_path_factory):
    reason = _can_compile()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("kernel_static")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "bench.kernel_static", "--matrix", "ci", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    report = out / "kernel_static.json"
    assert report.exists(), f"kernel_static wrote no report:\n{result.stderr[-4000:]}"
    return json.loads(report.read_text()), result


def _describe(row) -> str:
    from bench.kernel_static import _config_id

    return f"{row['kernel']} {row['case']} {row['dtype']} {row['target']} {_config_id(row)}"


def test_every_launch_compiles_for_sm90a_and_sm80(ci_report):
    payload, _ = ci_report
    rows = payload["rows"]
    failed = [f"{_describe(r)}: {r['error'].splitlines()[-1]}" for r in rows if not r["ok"]]
    assert not failed, "does not compile:\n" + "\n".join(failed)
    # The matrix really covered what it claims: both kernels, both targets, all dtypes.
    seen = {(r["kernel"], r["target"], r["dtype"]) for r in rows}
    for kernel in ("channel", "group"):
        for target in ("sm_90a", "sm_80"):
            for dtype in ("float16", "bfloat16", "float32"):
                assert (kernel, target, dtype) in seen


def _spills(stats) -> bool:
    return bool(stats["spill_stores"] or stats["spill_loads"])


def test_no_config_spills(ci_report):
    payload, _ = ci_report
    spilled = [f"{_describe(r)}: {r['stats']['spill_stores']} B stores, "
               f"{r['stats']['spill_loads']} B loads"
               for r in payload["rows"] if r["ok"] and _spills(r["stats"])]  # fmt: skip
    assert not spilled, "register spills:\n" + "\n".join(spilled)


def test_aligned_channel_launches_use_vector_async_copies(ci_report):
    from bench.kernel_static import CASE_BY_NAME, floor_failures

    payload, result = ci_report
    missed = [f"{_describe(r)}: {'; '.join(floor_failures(r))}" for r in payload["rows"]
              if r["ok"] and floor_failures(r)]  # fmt: skip
    assert not missed, "floors missed:\n" + "\n".join(missed)
    aligned = [r for r in payload["rows"] if CASE_BY_NAME[r["case"]].aligned]
    assert aligned and all(r["stats"]["loop"] for r in aligned)
    assert result.returncode == 0, result.stderr[-2000:]
