"""Regroup: the column rule by hand, planted structure, invariants, determinism, errors."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from sparse_ops import Ticket, load_ticket, models
from sparse_ops.layouts import GroupLayout
from sparse_ops.masks import from_gemm_view, gemm_view, mask_stats
from sparse_ops.packing import pack_groups
from sparse_ops.structure import RegroupConfig, RegroupError, regroup, regroup_mask
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


def _planted(cout: int, cin: int, blocks: int, noise: float, seed: int, labels: bool = False):
    """Dense blocks with disjoint rows and columns, permuted, plus uniform noise.

    Returns the noisy mask and the planted GEMM view (and, with ``labels``, each row's
    planted block)."""
    g = torch.Generator().manual_seed(seed)
    k = cin * 9
    view = torch.zeros(cout, k, dtype=torch.bool)
    block = torch.zeros(cout, dtype=torch.long)
    row_sets = torch.tensor_split(torch.arange(cout), blocks)
    col_sets = torch.tensor_split(torch.arange(k), blocks)
    for b, (r, c) in enumerate(zip(row_sets, col_sets, strict=True)):
        view[r[:, None], c[: int(0.7 * len(c))][None, :]] = True
        block[r] = b
    rows = torch.randperm(cout, generator=g)
    view, block = view[rows][:, torch.randperm(k, generator=g)], block[rows]
    noisy = view | (torch.rand(cout, k, generator=g) < noise)
    mask = from_gemm_view(noisy, (cout, cin, 3, 3))
    return (mask, view, block) if labels else (mask, view)


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


def _kept_on_true_partition(mask, planted, block) -> int:
    """Planted nonzeros the column rule (t1 = 1.5) keeps, run on each planted block alone."""
    kept = 0
    for b in block.unique():
        rows = (block == b).nonzero().flatten()
        new, _, _ = regroup_mask(mask[rows], RegroupConfig(parts=1, min_rows=1))
        kept += int((gemm_view(new) & planted[rows]).sum())
    return kept


# ResNet-18's layer2/3/4 conv1 shapes, four planted row groups of 32, 64 and 128 rows.
@pytest.mark.parametrize(("cout", "cin", "seed"), [(128, 64, 0), (256, 128, 1), (512, 256, 2)])
def test_auto_parts_find_planted_groups_smaller_or_larger_than_group_rows(cout, cin, seed):
    mask, planted, block = _planted(cout, cin, 4, 0.01, seed, labels=True)
    new, groups, change = regroup_mask(mask, name="planted")  # parts="auto", group_rows=64
    for g in groups:  # rows from one planted group
        purity = int(torch.bincount(block[list(g.rows)]).max()) / len(g.rows)
        assert purity >= 0.9, (change.detail, purity)
    kept = int((gemm_view(new) & planted).sum())
    assert kept >= 0.9 * _kept_on_true_partition(mask, planted, block), change.detail
    tried = [p for p, _ in change.detail["part_scores"]]
    assert change.detail["parts"] in tried and len(tried) <= 3


def test_rows_rule_keeps_the_fixed_count():
    # The fixed round(rows / group_rows) merges 128 rows of four 32-row groups into 2 parts.
    mask, _, block = _planted(128, 64, 4, 0.01, 0, labels=True)
    _, groups, change = regroup_mask(mask, RegroupConfig(parts="rows"))
    assert change.detail["parts"] == 2 and "part_scores" not in change.detail
    assert min(int(torch.bincount(block[list(g.rows)]).max()) / len(g.rows) for g in groups) < 0.9


def test_coarsen_merges_parts_of_one_planted_group():
    mask, _, block = _planted(256, 32, 4, 0.02, 4, labels=True)
    partitioner = partition_module.RowPartitioner(gemm_view(mask).numpy(), layer="planted")
    fine = partitioner.split(8)
    coarse = partitioner.coarsen(fine, 8, 4)
    assert sorted(np.unique(coarse).tolist()) == [0, 1, 2, 3]
    rows = torch.from_numpy(partitioner.rows)
    for labels, parts in ((fine, 8), (coarse, 4)):
        for p in range(parts):
            assert block[rows[torch.from_numpy(labels == p)]].unique().numel() == 1
    # Merging only: every fine part lies inside one coarse part.
    assert all(np.unique(coarse[fine == p]).size == 1 for p in range(8))


def test_balance_bound_leaves_no_part_below_min_rows():
    # At ε = 0.1 Mt-KaHyPar fills seven of 8 parts to 35 rows and leaves 11 for the last,
    # which regroup would drop (min_rows = 16); the tightened bound keeps every part.
    view = (torch.rand(256, 1152, generator=torch.Generator().manual_seed(0)) < 0.4).numpy()
    partitioner = partition_module.RowPartitioner(view)
    assert np.bincount(partitioner.split(8)).min() < 16
    assert np.bincount(partitioner.split(8, min_part=16), minlength=8).min() >= 16
    _, _, change = regroup_mask(torch.from_numpy(view), RegroupConfig(parts=8))
    assert change.detail["dropped_parts"] == [] and len(change.detail["blocks"]) == 8


def _check_layout(mask_shape, new, groups, b1):
    seen = set()
    for g in groups:
        assert len(g.rows) <= b1
        assert not seen & set(g.rows), "rows shared by two groups"
        seen |= set(g.rows)
        assert list(g.cols) == sorted(g.cols)
    assert torch.equal(GroupLayout.of(groups).to_mask(mask_shape), new)


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
    assert not new.any() and len(groups) == 0 and change.status == "empty"
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
        regroup_mask(
            torch.ones(4, 3, 3, 3).bool() & (torch.rand(4, 3, 3, 3) < 0.5),
            RegroupConfig(parts=8),
            name="layer.x",
        )


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
        ({"parts": "many"}, "parts must be a positive int, 'auto' or 'rows'"),
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
    assert torch.equal(
        GroupLayout.of(layout).to_mask((128, 64, 1, 1)), out.masks["layers.1.conv2.weight"]
    )
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
            GroupLayout.of(layout).to_mask(tuple(masks[name].shape)).numpy(),
            out.masks[name].numpy(),
        )


# ---------------------------------------------------------------- column runs


def _run_structured_mask(cout: int, cin: int, seed: int, noise: float = 0.0) -> torch.Tensor:
    """Two planted row blocks whose kept columns are whole runs of 8 channels of a tap."""
    rng = np.random.default_rng(seed)
    view = np.zeros((cout, 9 * cin), dtype=bool)
    half = cout // 2
    for rows in (slice(0, half), slice(half, cout)):
        runs = rng.choice(9 * cin // 8, size=9 * cin // 40, replace=False)
        cols = (runs[:, None] * 8 + np.arange(8)).reshape(-1)
        view[rows, cols] = True
    view ^= rng.random(view.shape) < noise
    return from_gemm_view(torch.from_numpy(view), (cout, cin, 3, 3))


@pytest.mark.parametrize("cin", [16, 24])
def test_col_run_8_chooses_aligned_runs(cin):

    mask = _run_structured_mask(64, cin, seed=cin, noise=0.02)
    new, groups, report = regroup_mask(mask, RegroupConfig(col_run=8, group_rows=32))
    assert groups and report.detail["col_runs"] == [8] * len(report.detail["blocks"])
    for grp in groups:
        cols = np.asarray(grp.cols)
        assert cols.size % 8 == 0
        runs = cols.reshape(-1, 8)
        assert (runs[:, 0] % 8 == 0).all() and (np.diff(runs, axis=1) == 1).all()
    pack = pack_groups(torch.randn(mask.shape), new, [g.as_dict() for g in groups])
    assert pack.col_run == 8
    assert torch.equal(GroupLayout.of(groups).to_mask(mask.shape), new)


def test_col_run_keeps_planted_runs_and_auto_takes_them():
    mask = _run_structured_mask(64, 16, seed=3, noise=0.0)
    single = regroup_mask(mask, RegroupConfig(group_rows=32))[2]
    _, _, report = regroup_mask(mask, RegroupConfig(col_run="auto", group_rows=32))
    assert report.detail["col_runs"] == [8, 8]
    # Planted whole runs: runs drop no more planted nonzeros than single columns do
    # (the t1 rule stops both short of a dense block; here 512 vs 576 of 1536).
    assert report.dropped <= single.dropped


def test_col_run_auto_declines_runs_that_lose_nonzeros():
    # Scattered single columns: a run block carries 8 columns per kept column, so the t1
    # rule stops earlier and drops nonzeros single columns keep (1408 vs 960 here).
    rng = np.random.default_rng(0)
    view = np.zeros((64, 9 * 16), dtype=bool)
    view[:, rng.choice(9 * 16, size=40, replace=False)] = True
    mask = from_gemm_view(torch.from_numpy(view), (64, 16, 3, 3))
    # Two parts fixed: every row is alike, so parts='auto' would rightly take one.
    forced = regroup_mask(mask, RegroupConfig(col_run=8, parts=2))[2]
    single = regroup_mask(mask, RegroupConfig(col_run=1, parts=2))[2]
    auto = regroup_mask(mask, RegroupConfig(col_run="auto", parts=2))[2]
    assert forced.dropped > single.dropped
    assert auto.detail["col_runs"] == [1, 1] and auto.dropped == single.dropped


def test_col_run_needs_channels_in_multiples_of_8():
    mask = torch.rand(32, 12, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.4
    report = regroup_mask(mask, RegroupConfig(col_run=8, group_rows=32))[2]
    assert set(report.detail["col_runs"]) == {1}


@pytest.mark.parametrize("bad", [4, "8", 0])
def test_col_run_values_checked(bad):
    with pytest.raises(RegroupError, match="col_run must be"):
        RegroupConfig(col_run=bad)
