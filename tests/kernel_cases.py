"""Shared inputs for kernel tests: shapes, masks, layouts, tolerances, poisoned outputs."""

from __future__ import annotations

import math

import torch

from sparse_ops import reference
from sparse_ops.masks import from_gemm_view

# One tolerance table. References are computed in fp64 from exactly the values the
# kernel saw (inputs already rounded to the dtype), so what is left is accumulation
# order and the final rounding — except tf32, which rounds fp32 inputs internally.
TOLERANCES = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    "tf32": {"atol": 2e-2, "rtol": 1e-2},
    torch.float16: {"atol": 1e-2, "rtol": 4e-3},
    torch.bfloat16: {"atol": 6e-2, "rtol": 2e-2},
}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (batch, Cin, Cout, H, W, k, stride, padding, dilation)
SHAPES = [
    (1, 3, 17, 8, 8, 3, 1, 1, 1),
    (3, 17, 33, 9, 7, 3, 2, 1, 1),
    (2, 33, 100, 6, 6, 1, 1, 0, 1),
    (1, 8, 16, 11, 11, 7, 2, 3, 1),
    (2, 16, 24, 9, 9, 5, 1, 2, 2),
    (1, 100, 33, 5, 5, 3, 1, 0, 1),
    (3, 5, 7, 6, 5, 3, 1, 3, 2),
]


def shape_id(shape) -> str:
    n, ci, co, h, w, k, s, p, d = shape
    return f"n{n}-{ci}to{co}-{h}x{w}-k{k}s{s}p{p}d{d}"


def conv_weight(cout: int, cin: int, k: int, g: torch.Generator) -> torch.Tensor:
    """He-scaled weight so outputs stay O(1) whatever the fan-in."""
    return torch.randn(cout, cin, k, k, generator=g) / math.sqrt(cin * k * k)


def channel_mask(cout, cin, k, mode: str, g: torch.Generator) -> torch.Tensor | None:
    keep_out = torch.rand(cout, generator=g) < 0.6
    keep_in = torch.rand(cin, generator=g) < 0.7
    keep_out[0] = keep_in[0] = True
    if mode == "dense":
        return None
    if mode == "in":
        keep_out[:] = True
    elif mode == "out":
        keep_in[:] = True
    elif mode == "empty":
        keep_out[:] = False
    return (keep_out[:, None, None, None] & keep_in[None, :, None, None]).expand(cout, cin, k, k)


def group_layout(cout: int, cin: int, k: int, mode: str, g: torch.Generator):
    """A layout and the mask it describes (rows in no group stay empty)."""
    k_total = k * k * cin
    perm = torch.randperm(cout, generator=g).tolist()
    if mode == "no-groups":
        groups = []
    elif mode == "dense":
        groups = [{"rows": list(range(cout)), "cols": list(range(k_total))}]
    elif mode == "one-row":
        groups = [
            {
                "rows": [r],
                "cols": torch.randperm(k_total, generator=g)[: max(1, k_total // 3)].tolist(),
            }
            for r in perm[: min(cout, 5)]
        ]
    elif mode == "runs":  # columns in aligned runs of 8 channels of one tap (Cin % 8 == 0)
        groups, start = [], 0
        n_runs = k_total // 8
        while start < cout - 1:
            size = int(torch.randint(1, 40, (1,), generator=g))
            runs = torch.randperm(n_runs, generator=g)[
                : int(torch.randint(1, n_runs + 1, (1,), generator=g))
            ]
            cols = (runs[:, None] * 8 + torch.arange(8)).flatten().tolist()
            groups.append({"rows": perm[start : start + size], "cols": cols})
            start += size + 1
    else:  # "mixed": a few groups of several rows, some rows left out
        groups, start = [], 0
        while start < cout - 1:
            size = int(torch.randint(1, 40, (1,), generator=g))
            rows = perm[start : start + size]
            width = int(torch.randint(1, k_total + 1, (1,), generator=g))
            cols = torch.randperm(k_total, generator=g)[:width].tolist()
            groups.append({"rows": rows, "cols": cols})
            start += size + 1  # skip one row: it belongs to no group
    view = torch.zeros(cout, k_total, dtype=torch.bool)
    for grp in groups:
        view[torch.tensor(grp["rows"])[:, None], torch.tensor(grp["cols"])[None, :]] = True
    return groups, from_gemm_view(view, (cout, cin, k, k))


def poisoned_output(shape, dtype, device=DEVICE) -> torch.Tensor:
    """NaN everywhere: any element a kernel fails to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device).contiguous(
        memory_format=torch.channels_last
    )


def expected(x, dense_weight, bias, geometry, residual, relu):
    s, p, d = geometry
    return reference.conv2d(
        x, dense_weight, bias, stride=s, padding=p, dilation=d, residual=residual, relu=relu
    )


def assert_matches(y: torch.Tensor, ref: torch.Tensor, dtype_key) -> None:
    assert not torch.isnan(y).any(), "some output elements were never written"
    torch.testing.assert_close(y.detach().cpu().double(), ref, **TOLERANCES[dtype_key])
