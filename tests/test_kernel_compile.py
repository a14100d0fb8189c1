"""The GPU path compiles: kernels built for sm_90a and sm_80 ahead of time, on the CPU.

The interpreter the other kernel tests use never compiles anything, so it cannot see
a type error in a branch, a register spill or a lost vector load. This test compiles
the ``ci`` matrix of ``bench/scripts/kernel_static.py`` (every autotune config of every launch
class × fp16/bf16/fp32, on a launch of that class; every other launch the product makes
once) with the specialisation a real launch would get, in a subprocess without
``TRITON_INTERPRET`` (started right after collection: see ``conftest.py``), and requires:
every compile succeeds, nothing spills, every config the autotuner may pick on this
Triton was compiled, and the aligned channel launches keep 16-byte asynchronous copies
and vector stores (``static_report.floor_failures``).
"""

from __future__ import annotations

import json

import pytest


def _can_compile() -> str | None:
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the platform's wheel
        return f"Triton's NVIDIA backend is not importable here: {e}"
    return None


@pytest.fixture(scope="module")
def ci_report(compile_job):
    reason = _can_compile()
    if reason:
        pytest.skip(reason)
    returncode = compile_job.wait(timeout=1800)
    report = compile_job.folder / "kernel_static.json"
    assert report.exists(), f"kernel_static wrote no report:\n{compile_job.output()[-4000:]}"
    return json.loads(report.read_text()), returncode, compile_job.output()


def _describe(row) -> str:
    from sparse_ops_bench.static_report import config_label

    return f"{row['kernel']} {row['case']} {row['dtype']} {row['target']} {config_label(row)}"


def test_every_launch_compiles_for_sm90a_and_sm80(ci_report):
    payload, _, _ = ci_report
    rows = payload["rows"]
    failed = [f"{_describe(r)}: {r['error'].splitlines()[-1]}" for r in rows if not r["ok"]]
    assert not failed, "does not compile:\n" + "\n".join(failed)
    # The matrix really covered what it claims: both kernels, fp16/bf16/fp32 and exact
    # fp32 on sm_90a, fp16 and exact fp32 on sm_80 too.
    seen = {(r["kernel"], r["target"], r["dtype"]) for r in rows}
    for kernel in ("channel", "group"):
        for dtype in ("float16", "bfloat16", "float32", "float32-ieee"):
            assert (kernel, "sm_90a", dtype) in seen
        for dtype in ("float16", "float32-ieee"):
            assert (kernel, "sm_80", dtype) in seen


def _spills(stats) -> bool:
    return bool(stats["spill_stores"] or stats["spill_loads"])


def test_no_config_spills(ci_report):
    payload, _, _ = ci_report
    spilled = [
        f"{_describe(r)}: {r['stats']['spill_stores']} B stores, "
        f"{r['stats']['spill_loads']} B loads"
        for r in payload["rows"]
        if r["ok"] and _spills(r["stats"])
    ]
    assert not spilled, "register spills:\n" + "\n".join(spilled)


def test_aligned_channel_launches_use_vector_async_copies(ci_report):
    from sparse_ops_bench.static_cases import CASE_BY_NAME
    from sparse_ops_bench.static_report import floor_failures

    payload, returncode, output = ci_report
    missed = [
        f"{_describe(r)}: {'; '.join(floor_failures(r))}"
        for r in payload["rows"]
        if r["ok"] and floor_failures(r)
    ]
    assert not missed, "floors missed:\n" + "\n".join(missed)
    aligned = [r for r in payload["rows"] if CASE_BY_NAME[r["case"]].aligned]
    assert aligned and all(r["stats"]["loop"] for r in aligned)
    assert returncode == 0, output[-2000:]


def test_every_config_the_autotuner_may_pick_was_compiled(ci_report):
    """The matrix stays complete: each config set's configs (those not withheld on this
    Triton for spilling) all appear, on a launch of their class, fp16 and sm_90a."""
    import torch

    from sparse_ops_kernels import channel_conv, configs, group_conv

    payload, _, _ = ci_report
    seen: dict[tuple[str, str], set[str]] = {}
    for r in payload["rows"]:
        if r["ok"] and r["target"] == "sm_90a":
            config_set = r["launch_class"].split(":")[0]
            seen.setdefault((r["kernel"], config_set), set()).add(r["config_id"])
    for kernel, module in (("channel", channel_conv), ("group", group_conv)):
        for name, config_set in module.CONFIG_SETS.items():
            dtype = torch.float32 if name == "fma" else torch.float16
            classes = {
                r["launch_class"]
                for r in payload["rows"]
                if r["kernel"] == kernel and r["launch_class"].split(":")[0] == name
            }
            held = set().union(*(configs.known_spills(module.SPILLS, c, dtype) for c in classes))
            expected = {configs.config_id(c) for c in config_set} - held
            missing = expected - seen.get((kernel, name), set())
            assert not missing, f"{kernel} {name}: never compiled {sorted(missing)}"
