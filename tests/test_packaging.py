"""Installed import names: ours only, never another distribution's.

The repository's ``kernels/`` and ``bench/`` folders install as ``sparse_ops_kernels`` and
``sparse_ops_bench``. A bare ``kernels`` is Hugging Face's hub-kernel loader (used by
transformers) and ``bench`` too generic: installing a distribution that owns one of
those names beside sparse-ops must leave both importable.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

OURS = {"sparse_ops", "sparse_ops_kernels", "sparse_ops_bench"}


def test_installed_top_level_names_are_ours():
    top_level = metadata.distribution("sparse-ops").read_text("top_level.txt")
    assert set(top_level.split()) == OURS


def test_another_kernels_package_and_ours_both_import(tmp_path):
    """A stand-in for the PyPI ``kernels`` package first on the path, and a working
    directory outside the repository (so its folders are not importable by name)."""
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("OWNER = 'someone else'\n")
    (tmp_path / "site" / "bench").mkdir()
    (tmp_path / "site" / "bench" / "__init__.py").write_text("OWNER = 'someone else'\n")
    probe = (
        "import kernels, bench\n"
        "assert kernels.OWNER == bench.OWNER == 'someone else'\n"
        "import sparse_ops, sparse_ops.ops, sparse_ops_kernels.channel_conv\n"
        "from sparse_ops_bench import cli\n"
        "import sparse_ops_bench.scripts.kernel_static, sparse_ops_bench.scripts.summary\n"
        "from sparse_ops.cli import main\n"
        "assert main(['models']) == 0\n"
        "print('both import')\n"
    )
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "both import" in done.stdout


def test_built_package_carries_the_kernel_config_tables(tmp_path):
    """The kernels read their autotune tables from JSON next to their modules: a build
    (what a wheel holds) must ship them, under the installed package name."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    built = tmp_path / "sparse_ops_kernels"
    assert sorted(p.name for p in built.glob("*.json")) == ["channel_conv.json", "group_conv.json"]
    probe = (
        "from sparse_ops_kernels import configs\n"
        f"table = configs.load_table({str(built / 'group_conv.py')!r})\n"
        "assert table.config_ids['tensor'] and (3, 9) in table.spills\n"
    )
    check = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-2000:]
