"""Converted files saved by an earlier sparse-ops (commit 2b2b460, before the packed
formats moved into the kernels package) load and compute what they computed then."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from converted_golden import CASES, model_and_ticket
from safetensors.torch import load_file

from sparse_ops.convert import convert, load_converted
from sparse_ops.nn import ChannelPrunedConv2d, GroupSparseConv2d

GOLDEN = Path(__file__).parent / "data" / "converted-2b2b460"
UNIT_OF = {"refill": ChannelPrunedConv2d, "regroup": GroupSparseConv2d}


@pytest.mark.parametrize("case", sorted(CASES))
def test_file_from_before_the_move_loads_and_computes_the_same(case):
    saved = load_file(str(GOLDEN / f"{case}.io.safetensors"))
    loaded = load_converted(GOLDEN / f"{case}.safetensors")
    assert any(isinstance(m, UNIT_OF[case]) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(saved["input"]), saved["output"], atol=1e-5, rtol=1e-5)
    # Today's converter, same model and ticket: the same function as the old file.
    model, ticket = model_and_ticket(CASES[case]["kind"])
    fresh = convert(
        model, ticket, input_size=(3, 10, 10), on_unstructured=CASES[case]["on_unstructured"]
    )
    with torch.no_grad():
        torch.testing.assert_close(fresh(saved["input"]), saved["output"], atol=1e-4, rtol=1e-4)
