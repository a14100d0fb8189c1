"""Converted files written by an earlier sparse-ops, kept to prove later versions still
read them (tests/test_converted_golden.py).

``python tests/converted_golden.py DIR`` writes, with whatever sparse-ops is importable,
``DIR/<case>.safetensors`` (a converted tiny network) and ``DIR/<case>.io.safetensors``
(an input and the output that version computed). The committed files under
``tests/data/converted-2b2b460/`` were written by commit 2b2b460, the last one before
the packed formats moved into the kernels package.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from model_cases import perturb_batchnorm
from safetensors.torch import save_file
from torch import nn

CASES = {
    # channel units with removed channels, a residual tie and bias maps
    "refill": {"kind": "refill", "on_unstructured": "error"},
    # group units plus exact leftover packs
    "regroup": {"kind": "random", "on_unstructured": "regroup"},
}


class Tiny(nn.Module):
    """Stem, one residual block and a strided conv: every unit kind in a few KB."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv4, self.bn4 = nn.Conv2d(16, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(y)) + x)
        x = torch.relu(self.bn4(self.conv4(x)))
        return self.fc(x.mean((2, 3)))


def model_and_ticket(kind: str):
    from sparse_ops import Ticket, structure

    torch.manual_seed(0)
    model = perturb_batchnorm(Tiny(), scale=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    names = [f"conv{i}.weight" for i in range(1, 5)]
    masks = {n: torch.rand(state[n].shape, generator=g) < 0.4 for n in names}
    ticket = Ticket(masks, state)
    if kind == "refill":
        ticket = structure.refill(ticket)
    return model, ticket


def write(directory: Path) -> None:
    from sparse_ops.convert import convert, save_converted

    directory.mkdir(parents=True, exist_ok=True)
    for case, spec in CASES.items():
        model, ticket = model_and_ticket(spec["kind"])
        example = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(2))
        fast = convert(
            model, ticket, input_size=(3, 10, 10), on_unstructured=spec["on_unstructured"]
        )
        with torch.no_grad():
            out = fast(example)
        save_converted(fast, directory / f"{case}.safetensors")
        save_file({"input": example, "output": out}, str(directory / f"{case}.io.safetensors"))


if __name__ == "__main__":
    write(Path(sys.argv[1]))
