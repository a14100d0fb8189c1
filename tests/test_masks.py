"""Mask geometry: the (ky, kx, c) GEMM view and structure classification."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from sparse_ops.masks import column_index, from_gemm_view, gemm_view, is_binary, mask_stats


def test_gemm_view_column_order_is_ky_kx_c():
    cout, cin, kh, kw = 5, 3, 2, 3
    w = torch.randn(cout, cin, kh, kw)
    view = gemm_view(w)
    assert view.shape == (cout, kh * kw * cin)
    for ky in range(kh):
        for kx in range(kw):
            for c in range(cin):
                col = column_index(ky, kx, c, kw=kw, cin=cin)
                torch.testing.assert_close(view[:, col], w[:, c, ky, kx])


@settings(max_examples=40, deadline=None)
@given(cout=st.integers(1, 9), cin=st.integers(1, 9), kh=st.integers(1, 4), kw=st.integers(1, 4))
def test_gemm_view_round_trip(cout, cin, kh, kw):
    w = torch.randn(cout, cin, kh, kw)
    assert torch.equal(from_gemm_view(gemm_view(w), w.shape), w)


def test_linear_view_is_identity():
    w = torch.randn(4, 7)
    assert gemm_view(w) is w
    assert torch.equal(from_gemm_view(w, w.shape), w)


def test_empty_and_dense():
    assert mask_stats(torch.zeros(4, 3, 3, 3, dtype=torch.bool)).structure == "empty"
    dense = mask_stats(torch.ones(4, 3, 3, 3, dtype=torch.bool))
    assert dense.structure == "dense" and dense.density == 1.0 and dense.blocks == 1


@pytest.mark.parametrize("shape", [(17, 33, 3, 3), (8, 5, 1, 1), (12, 9, 7, 7), (10, 100)])
def test_channel_structure(shape):
    keep_out = torch.rand(shape[0]) < 0.6
    keep_in = torch.rand(shape[1]) < 0.7
    keep_out[0] = keep_in[0] = True
    keep_out[-1] = keep_in[-1] = False
    extra = (None,) * (len(shape) - 2)
    mask = (keep_out[(slice(None), None, *extra)] & keep_in[(None, slice(None), *extra)]).expand(
        shape
    )
    stats = mask_stats(mask)
    assert stats.structure == "channel"
    assert stats.empty_out == int((~keep_out).sum())
    assert stats.empty_in == int((~keep_in).sum())
    assert stats.nnz == int(mask.sum())


def test_single_tap_block_is_group_not_channel():
    # Every row shares one pattern, but the pattern is the centre tap only: one dense
    # block in the GEMM view, yet not removable by dropping whole channels.
    mask = torch.zeros(16, 8, 3, 3, dtype=torch.bool)
    mask[:, :, 1, 1] = True
    stats = mask_stats(mask)
    assert stats.structure == "group" and stats.blocks == 1


def _planted_groups(cout: int, cin: int, k: int, groups: int) -> torch.Tensor:
    rows = torch.randperm(cout).chunk(groups)
    view = torch.zeros(cout, k * k * cin, dtype=torch.bool)
    for r in rows:
        cols = torch.randperm(view.shape[1])[: view.shape[1] // 3]
        view[r.unsqueeze(1), cols.unsqueeze(0)] = True
    return from_gemm_view(view, (cout, cin, k, k))


def test_group_structure_counts_blocks():
    mask = _planted_groups(64, 16, 3, 4)
    stats = mask_stats(mask)
    assert stats.structure == "group"
    assert stats.blocks == 4 and stats.mean_block_rows == 16.0
    assert stats.empty_out == 0


def test_random_mask_is_unstructured():
    mask = torch.rand(64, 32, 3, 3) < 0.3
    stats = mask_stats(mask)
    assert stats.structure == "unstructured"
    assert stats.blocks == 64


def test_thin_blocks_are_unstructured_unless_threshold_lowered():
    mask = _planted_groups(30, 8, 3, 10)  # 3 rows per block
    assert mask_stats(mask).structure == "unstructured"
    assert mask_stats(mask, min_block_rows=3).structure == "group"


def test_empty_rows_and_columns_counted():
    mask = torch.rand(10, 6, 3, 3) < 0.5
    mask[[1, 4]] = False
    mask[:, 2] = False
    stats = mask_stats(mask)
    assert stats.empty_out >= 2 and stats.empty_in >= 1
    assert stats.empty_out == int((~mask.flatten(1).any(1)).sum())
    assert stats.empty_in == int((~mask.any(dim=(0, 2, 3))).sum())


@settings(max_examples=30, deadline=None)
@given(
    cout=st.integers(1, 12),
    cin=st.integers(1, 12),
    k=st.sampled_from([1, 3]),
    p=st.floats(0.0, 1.0),
)
def test_stats_invariants(cout, cin, k, p):
    mask = torch.rand(cout, cin, k, k) < p
    s = mask_stats(mask)
    assert s.nnz == int(mask.sum()) and s.numel == mask.numel()
    assert 0.0 <= s.density <= 1.0
    assert s.blocks <= cout - s.empty_out
    assert s.structure in ("empty", "dense", "channel", "group", "unstructured")
    if s.structure == "channel":
        rows = mask.flatten(1).any(1)
        ins = mask.any(dim=(0, 2, 3))
        assert torch.equal(mask, rows[:, None, None, None] & ins[None, :, None, None])


def test_is_binary():
    assert is_binary(torch.tensor([0.0, 1.0, 1.0]))
    assert is_binary(torch.tensor([0, 1], dtype=torch.int32))
    assert not is_binary(torch.tensor([0.0, 0.5]))
    assert not is_binary(torch.tensor([2]))
