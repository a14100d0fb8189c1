"""``sparse-ops demo``: the main job on the embedded default (no downloads, no user data).

What it shows today: one ticket travelling through every checkpoint layout users
bring. A CIFAR ResNet-20 (``res20s``) is pruned exactly the way Structure-LTH's IMP
stores it (global L1 magnitude pruning through torch.nn.utils.prune, 20% of the
remaining weights per round, stem conv and classifier excluded, rewind state kept),
written as a Structure-LTH checkpoint, a torch.nn.utils.prune state dict, an open_lth
level directory and a plain state dict, and read back from each by format
auto-detection; every import must give the same masks and weights. The ticket is
then saved in our format, reloaded, and inspected layer by layer.

Outputs in the folder: the checkpoint files, ``inspect.txt`` and ``summary.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from . import exporters, models
from .inspection import inspect_report, render_inspect
from .tables import format_table
from .tickets import Ticket, load_ticket

ARCH = "res20s"
ROUNDS = 4
RATE = 0.2
SEED = 0


class _Progress:
    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet, self.index, self.start = total, quiet, 0, time.perf_counter()

    def step(self, text: str) -> None:
        self.index += 1
        if not self.quiet:
            elapsed = time.perf_counter() - self.start
            print(f"[{self.index}/{self.total}] {text} (t={elapsed:.1f}s)", flush=True)

    def say(self, text: str = "") -> None:
        if not self.quiet:
            print(text, flush=True)


def _prune_like_structure_lth(model: nn.Module) -> None:
    """Global L1 pruning of every Conv2d but the stem, as Structure-LTH's IMP round does."""
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    targets = [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d) and m is not stem]
    for _ in range(ROUNDS):
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=RATE)


def _same_pruning(a: Ticket, b: Ticket) -> bool:
    """Equal masks, counting an all-ones mask (open_lth's "prunable, not pruned") as none."""
    names = a.masks.keys() | b.masks.keys()
    ones = torch.ones((), dtype=torch.bool)
    return all(
        torch.equal(a.masks.get(n, ones).expand_as(m), b.masks.get(n, ones).expand_as(m))
        for n in names
        for m in [a.masks.get(n, b.masks.get(n))]
    )


def _same(a: Ticket, b: Ticket, section: str) -> bool:
    sa, sb = getattr(a, section), getattr(b, section)
    if sa is None or sb is None:
        return sa is sb
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def run_demo(out: str | Path = "sparse-ops-out", *, quiet: bool = False) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress = _Progress(5, quiet)

    progress.step(f"build {ARCH} and prune it {ROUNDS}× by {RATE:.0%} as Structure-LTH's IMP")
    torch.manual_seed(SEED)
    model = models.create(ARCH)
    rewind = {k: v.clone() for k, v in model.state_dict().items()}
    _prune_like_structure_lth(model)
    reference = Ticket.from_module(model, arch=ARCH)
    reference = Ticket(reference.masks, reference.weights, ARCH, rewind=rewind)
    progress.say(f"      {reference}")

    progress.step("write the ticket in each layout users bring")
    files = {
        "Structure-LTH checkpoint": exporters.save_structure_lth(
            reference, out / "structure_lth" / f"{ROUNDS}checkpoint.pth.tar", state=ROUNDS
        ),
        "torch.nn.utils.prune state dict": out / "torch_prune_state_dict.pth",
        "open_lth level directory": exporters.save_open_lth_level(
            reference, out / "open_lth" / f"level_{ROUNDS}" / "main"
        ),
        "plain state dict (zeros = mask)": out / "zeros_state_dict.pth",
    }
    torch.save(model.state_dict(), files["torch.nn.utils.prune state dict"])
    torch.save(reference.masked_weights(), files["plain state dict (zeros = mask)"])

    progress.step("read each back by format auto-detection and compare")
    rows, checks = [], []
    expected = reference.masked_weights()
    for label, path in files.items():
        ticket = load_ticket(path, arch=ARCH)
        masks_ok = _same_pruning(ticket, reference)
        # Some layouts store weights masked (open_lth, zeros), some not (prune's *_orig):
        # the effective, masked weights must agree.
        effective = ticket.masked_weights() if ticket.weights is not None else {}
        weights_ok = effective.keys() == expected.keys() and all(
            torch.equal(v, expected[k]) for k, v in effective.items()
        )
        checks.append(masks_ok and weights_ok)
        rows.append(
            [label, ticket.meta["source_format"], len(ticket.masks), ticket.density,
             masks_ok, weights_ok]
        )  # fmt: skip
    table = format_table(
        ["layout", "detected as", "masked layers", "density", "masks equal", "weights equal"],
        rows,
        align="llrrll",
    )
    progress.say(table)

    progress.step("save in our format (safetensors + JSON metadata) and reload")
    ours = reference.save(out / f"{ARCH}_ticket.safetensors")
    reloaded = load_ticket(ours)
    round_trip = all(_same(reloaded, reference, s) for s in ("masks", "weights", "rewind"))
    checks.append(round_trip and reloaded.arch == ARCH)
    progress.say(f"      {ours} → {reloaded}; identical: {round_trip}")

    progress.step("inspect the ticket")
    report = inspect_report(ours, arch=ARCH)
    text = render_inspect(report)
    (out / "inspect.txt").write_text(text + "\n")
    progress.say(text)

    summary = {
        "ok": all(checks),
        "arch": ARCH,
        "rounds": ROUNDS,
        "rate": RATE,
        "expected_density": (1 - RATE) ** ROUNDS,
        "global_density": report["global_density"],
        "imports": [
            {"layout": r[0], "detected_as": r[1], "masks_equal": r[4], "weights_equal": r[5]}
            for r in rows
        ],
        "round_trip_identical": round_trip,
        "files": {k: str(v) for k, v in files.items()} | {"sparse-ops ticket": str(ours)},
        "report": report,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    verdict = "all checks passed" if summary["ok"] else "CHECKS FAILED"
    progress.say(f"\n{verdict}; outputs in {out}/")
    return summary
