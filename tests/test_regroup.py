"""Regroup: the column rule by hand, planted structure, invariants, determinism, errors."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from sparse_ops import Ticket, load_ticket, models
from sparse_ops.masks import from_gemm_view, gemm_view, mask_stats
from sparse_ops.structure import RegroupConfig, RegroupError, groups_to_mask, regroup, regroup_mask
from sparse_ops.structure import partition as partition_module
from sparse_ops.structure.partition import PartitionerError


def _linear_mask(rows: list[list[int]], k: int) -> torch.Tensor:
    m = torch.zeros(len(rows), k, dtype=torch.bool)
    for r, cols in enumerate(rows):
        m[r, cols] = True
    return m


def _block_cols(new: torch.Tensor) -> list[int]:
    return gemm_view(new).any(0).nonzero().flatten().tolist()


def test_t1_rule_by_hand():
    # counts per column: 2, 2, 2, 1, 1, 0
    mask = _linear_mask([[0, 1, 2, 3], [0, 1, 2, 4]], 6)
    # width 3: uncovered 1, 1 → 3 > 1.5 → stop with columns 0, 1, 2
    new, _groups, change = regroup_mask(mask, RegroupConfig(parts=1, min_rows=1))
    assert _block_cols(new) == [0, 1, 2]
    assert change.dropped == 2 and change.refilled == 0
    # t1 = 3: width 3 fails (3 > 3 is false); width 4 (column 3): uncovered 0, 1 → stop
    new, _, _ = regroup_mask(mask, RegroupConfig(parts=1, min_rows=1, t1=3))
    assert _block_cols(new) == [0, 1, 2, 3]


def test_column_loop_uses_the_sorted_column():
    # The original decremented at column index i, not the i-th *sorted* column. Here the
    # popular columns are 3, 4, 5: the correct rule stops after exactly those three.
    mask = _linear_mask([[3, 4, 5], [0, 3, 4, 5]], 6)
    new, _, change = regroup_mask(mask, RegroupConfig(parts=1, min_rows=1))
    assert _block_cols(new) == [3, 4, 5]
    assert change.dropped == 1


def test_t2_keeps_dense_columns():
    # a 4-row part: columns 0..5 full, column 6 three-quarters full, noise elsewhere
    rows = [
        [0, 1, 2, 3, 4, 5, 6, 9],
        [0, 1, 2, 3, 4, 5, 6],
        [0, 1, 2, 3, 4, 5, 6],
        [0, 1, 2, 3, 4, 5, 8],
    ]
    mask = _linear_mask(rows, 10)
    base, _, _ = regroup_mask(mask, RegroupConfig(parts=1, min_rows=1, t1=0.5))
    dense, _, _ = regroup_mask(mask, RegroupConfig(parts=1, min_rows=1, t1=0.5, t2=0.75))
    assert len(_block_cols(base)) < 7
    assert _block_cols(dense) == [0, 1, 2, 3, 4, 5, 6]


def _planted(cout: int, cin: int, blocks: int, noise: float, seed: int):
    """Dense blocks with disjoint rows and columns, permuted, plus uniform noise."""
    g = torch.Generator().manual_seed(seed)
    k = cin * 9
    view = torch.zeros(cout, k, dtype=torch.bool)
    for r, c in zip(torch.tensor_split(torch.arange(cout), blocks),
                    torch.tensor_split(torch.arange(k), blocks), strict=True):  # fmt: skip
        view[r[:, None], c[: int(0.7 * len(c))][None, :]] = True
    view = view[torch.randperm(cout, generator=g)][:, torch.randperm(k, generator=g)]
    noisy = view | (torch.rand(cout, k, generator=g) < noise)
    return from_gemm_view(noisy, (cout, cin, 3, 3)), view


@pytest.mark.parametrize(
    ("cout", "cin", "blocks", "noise", "seed"),
    [(128, 64, 4, 0.03, 0), (256, 128, 8, 0.05, 1), (96, 17, 3, 0.02, 2), (512, 96, 8, 0.1, 3)],
)
def test_planted_blocks_are_recovered(cout, cin, blocks, noise, seed):
    mask, planted = _planted(cout, cin, blocks, noise, seed)
    config = RegroupConfig(parts=blocks, t2=0.5)
    new, _groups, change = regroup_mask(mask, config, name="planted")
    recovered = float((gemm_view(new) & planted).sum() / planted.sum())
    assert recovered >= 0.95, recovered
    assert change.status == "regrouped"
    assert mask_stats(new).structure == "group"


def _check_layout(mask_shape, new, groups, b1):
    seen = set()
    for g in groups:
        assert len(g.rows) <= b1
        assert not seen & set(g.rows), "rows shared by two groups"
        seen |= set(g.rows)
        assert list(g.cols) == sorted(g.cols)
    assert torch.equal(groups_to_mask(groups, mask_shape), new)


@settings(max_examples=25, deadline=None)
@given(
    cout=st.integers(1, 70),
    cin=st.integers(1, 6),
    k=st.sampled_from([1, 3]),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 3),
)
def test_output_is_union_of_dense_blocks_with_disjoint_rows(cout, cin, k, density, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(cout, cin, k, k, generator=g) < density
    new, groups, change = regroup_mask(mask, RegroupConfig(seed=seed))
    _check_layout(mask.shape, new, groups, 32)
    assert change.nnz_before == int(mask.sum()) and change.nnz_after == int(new.sum())
    if mask.any():
        assert new.any()
        # rows of one group share one column set: never more row patterns than groups
        assert mask_stats(new).blocks <= len(groups)


def test_all_zero_and_fully_dense_layers():
    empty = torch.zeros(64, 32, 3, 3, dtype=torch.bool)
    new, groups, change = regroup_mask(empty)
    assert not new.any() and groups == [] and change.status == "empty"
    dense = torch.ones(70, 5, 3, 3, dtype=torch.bool)
    new, groups, change = regroup_mask(dense)
    assert torch.equal(new, dense) and change.status == "dense"
    assert [len(g.rows) for g in groups] == [32, 32, 6]
    _check_layout(dense.shape, new, groups, 32)


def test_narrow_layers_are_regrouped():
    # With 8 fixed parts and a 16-row minimum the original never touched ≤ 64 channels.
    torch.manual_seed(0)
    mask = torch.rand(16, 16, 3, 3) < 0.4
    _new, groups, change = regroup_mask(mask)
    assert change.status == "regrouped" and len(groups) == 1
    assert change.detail["parts"] == 1


def test_same_seed_same_result_for_both_models():
    mask, _ = _planted(128, 32, 4, 0.05, 7)
    for model in ("graph", "hypergraph"):
        config = RegroupConfig(parts=4, model=model, seed=3)
        a, ga, _ = regroup_mask(mask, config)
        b, gb, _ = regroup_mask(mask, config)
        assert torch.equal(a, b) and ga == gb


def test_more_parts_than_rows():
    with pytest.raises(PartitionerError, match=r"layer\.x: cannot split 4 non-empty rows into 8"):
        regroup_mask(torch.ones(4, 3, 3, 3).bool() & (torch.rand(4, 3, 3, 3) < 0.5),
                     RegroupConfig(parts=8), name="layer.x")  # fmt: skip


def test_unsatisfiable_parameters_name_the_layer():
    torch.manual_seed(0)
    mask = torch.rand(40, 8, 3, 3) < 0.3
    with pytest.raises(RegroupError, match=r"conv9: regroup would empty this layer.*min_rows=32"):
        regroup_mask(mask, RegroupConfig(parts=2, min_rows=32), name="conv9")
    with pytest.raises(RegroupError, match="columns < b2=500"):
        regroup_mask(mask, RegroupConfig(parts=1, b2=500), name="conv9")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"t1": 0}, "t1 must be > 0"),
        ({"parts": "many"}, "parts must be a positive int or 'auto'"),
        ({"b1": 0}, "b1 must be a positive int"),
        ({"t2": 1.5}, "t2 must be in (0, 1] or None"),
        ({"model": "spectral"}, "model must be one of"),
    ],
)
def test_invalid_parameters(kwargs, fragment):
    with pytest.raises(RegroupError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        RegroupConfig(**kwargs)


def test_missing_partitioner_is_an_error(monkeypatch):
    def missing():
        raise PartitionerError("regroup needs the Mt-KaHyPar partitioner (pip install mtkahypar)")

    monkeypatch.setattr(partition_module, "_mtkahypar", missing)
    torch.manual_seed(0)
    with pytest.raises(PartitionerError, match="needs the Mt-KaHyPar partitioner"):
        regroup_mask(torch.rand(64, 8, 3, 3) < 0.3, RegroupConfig(parts=2))


def test_failing_partitioner_is_an_error(monkeypatch):
    class Broken:
        def context_from_preset(self, preset):
            raise RuntimeError("boom")

    mtk, _ = partition_module._mtkahypar()
    monkeypatch.setattr(partition_module, "_mtkahypar", lambda: (mtk, Broken()))
    torch.manual_seed(0)
    with pytest.raises(PartitionerError, match="convX: Mt-KaHyPar failed.*boom"):
        regroup_mask(torch.rand(64, 8, 3, 3) < 0.3, RegroupConfig(parts=2), name="convX")


def test_ticket_regroup_skips_linear_and_depthwise_and_round_trips(tmp_path):
    model = models.create("mobilenet")
    torch.manual_seed(0)
    masks = {
        "layers.1.conv1.weight": torch.rand(64, 1, 3, 3) < 0.5,  # depthwise
        "layers.1.conv2.weight": torch.rand(128, 64, 1, 1) < 0.3,
        "linear.weight": torch.rand(10, 1024) < 0.5,
    }
    ticket = Ticket(masks, model.state_dict(), "mobilenet")
    out = regroup(ticket, parts=2)
    statuses = {c["name"]: c["status"] for c in out.meta["structure_report"]["layers"]}
    assert statuses == {
        "layers.1.conv1.weight": "skipped: grouped conv",
        "layers.1.conv2.weight": "regrouped",
        "linear.weight": "skipped: linear",
    }
    layout = out.meta["groups"]["layers.1.conv2.weight"]
    assert torch.equal(groups_to_mask(layout, (128, 64, 1, 1)), out.masks["layers.1.conv2.weight"])
    back = load_ticket(out.save(tmp_path / "g.safetensors"))
    assert back.meta["groups"] == out.meta["groups"]
    assert back.meta["structure_report"]["params"]["parts"] == 2


def test_regroup_layer_selection_and_config_conflict():
    ticket = Ticket({"a.weight": torch.rand(32, 4, 3, 3) < 0.5})
    with pytest.raises(Exception, match="no mask named 'b.weight'"):
        regroup(ticket, layers=["b.weight"])
    with pytest.raises(TypeError, match="not both"):
        regroup(ticket, RegroupConfig(), parts=2)


def test_regroup_of_a_real_ticket_keeps_rows_disjoint():
    model = models.create("res20s")
    torch.manual_seed(0)
    masks = {
        n + ".weight": torch.rand(m.weight.shape) < 0.3
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d) and n != "conv1"
    }
    out = regroup(Ticket(masks, model.state_dict(), "res20s"))
    for name, layout in out.meta["groups"].items():
        rows = [r for g in layout for r in g["rows"]]
        assert len(rows) == len(set(rows)), name
        assert np.array_equal(
            groups_to_mask(layout, tuple(masks[name].shape)).numpy(), out.masks[name].numpy()
        )
