"""The README's two commands are the ones CI runs and the ones that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _command_after(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", text, re.S)
    assert match, f"README has no command block after <!-- {marker} -->"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command():
    command = _command_after("test-command")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci, f".ci/run does not run the README test command: {command}"


def test_main_command_runs_the_demo():
    command = _command_after("main-command")
    assert "torch==2.13.0" in command and command.endswith("python -m sparse_ops demo")


def test_top_level_layout():
    for name in ("kernels", "sparse_ops", "bench", "tests", "setup.py", "README.md"):
        assert (ROOT / name).exists(), name
