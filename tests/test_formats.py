"""ChannelPlan / GroupPack: packing, validation messages, schedule, saved state."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from kernel_cases import channel_mask, conv_weight, group_layout

from sparse_ops import ops
from sparse_ops.masks import gemm_view
from sparse_ops.packing import pack_channels, pack_groups
from sparse_ops.structure import RegroupConfig, regroup_mask
from sparse_ops_kernels.errors import KernelInputError
from sparse_ops_kernels.formats import ChannelPlan, FormatError, GroupPack


@pytest.fixture
def g():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("mode", ["dense", "in", "out", "both", "empty"])
def test_channel_plan_round_trip(g, mode):
    weight = conv_weight(17, 9, 3, g)
    mask = channel_mask(17, 9, 3, mode, g)
    plan = pack_channels(weight, mask, torch.randn(17), stride=2, padding=1)
    expected = weight if mask is None else weight * mask
    assert torch.equal(plan.dense_weight(), expected)
    kept_out = 17 if plan.out_idx is None else plan.out_idx.numel()
    fill = 0 if plan.fill_idx is None else plan.fill_idx.numel()
    assert kept_out + fill == 17 and plan.weight.shape[0] == kept_out
    assert plan.stride == (2, 2) and plan.kernel_size == (3, 3)
    if mode == "dense":
        assert plan.in_idx is None and plan.out_idx is None and plan.fill_idx is None


def test_channel_plan_rejects_unstructured_mask(g):
    weight = conv_weight(8, 4, 3, g)
    mask = torch.ones(8, 4, 3, 3, dtype=torch.bool)
    mask[5, 2, 1, 1] = False
    with pytest.raises(FormatError, match=r"layer3.conv: mask is not channel-structured.*'5'"):
        pack_channels(weight, mask, name="layer3.conv")


def test_channel_plan_checks_shapes(g):
    weight = conv_weight(8, 4, 3, g)
    with pytest.raises(FormatError, match=r"bias shape \(7,\) ≠ \(8,\)"):
        pack_channels(weight, None, torch.zeros(7))
    with pytest.raises(FormatError, match="mask shape"):
        pack_channels(weight, torch.ones(8, 4, 1, 1))
    with pytest.raises(FormatError, match="expected a conv weight"):
        pack_channels(torch.ones(8, 4))
    with pytest.raises(FormatError, match="stride and dilation must be ≥ 1"):
        pack_channels(weight, stride=0)


@pytest.mark.parametrize("mode", ["one-row", "no-groups", "dense", "mixed"])
def test_group_pack_round_trip_and_padding(g, mode):
    weight = conv_weight(45, 7, 3, g)
    layout, mask = group_layout(45, 7, 3, mode, g)
    pack = pack_groups(weight, mask, layout, torch.randn(45), block_n=16, k_pad=32)
    assert torch.equal(pack.dense_weight(), weight * mask)
    assert (pack.row_ptr.diff() % 16 == 0).all() and (pack.col_ptr.diff() % 32 == 0).all()
    in_group = {r for grp in layout for r in grp["rows"]}
    assert sorted(pack.fill_idx.tolist()) == sorted(set(range(45)) - in_group)
    assert pack.num_tiles == sum(int(x) // 16 for x in pack.row_ptr.diff()) + -(
        -pack.fill_idx.numel() // 16
    )


def test_group_pack_from_mask_alone_and_from_regroup(g):
    mask0 = torch.rand(64, 16, 3, 3, generator=g) < 0.3
    mask, groups, _ = regroup_mask(mask0, RegroupConfig(parts=2))
    weight = conv_weight(64, 16, 3, g)
    by_layout = pack_groups(weight, mask, [x.as_dict() for x in groups])
    by_mask = pack_groups(weight, mask)
    assert torch.equal(by_layout.dense_weight(), by_mask.dense_weight())
    assert torch.equal(by_mask.dense_weight(), weight * mask)


def test_schedule_puts_widest_groups_first_then_fill(g):
    weight = conv_weight(10, 4, 1, g)
    layout = [
        {"rows": [0], "cols": [0]},
        {"rows": [1, 2], "cols": [0, 1, 2, 3]},
        {"rows": [3], "cols": [1, 2]},
    ]
    pack = pack_groups(weight, None, layout, block_n=16, k_pad=16)
    # all three groups pad to 16 columns; ties keep group order; then one fill tile
    assert pack.tile_group.tolist() == [0, 1, 2, -1]
    wide = [{"rows": [0], "cols": [0]}, {"rows": [1], "cols": list(range(20))}]
    pack = pack_groups(conv_weight(2, 20, 1, g), None, wide, block_n=16, k_pad=16)
    assert pack.tile_group.tolist() == [1, 0]


def test_group_pack_validation_messages(g):
    weight = conv_weight(8, 2, 3, g)
    with pytest.raises(
        FormatError, match="conv9: rows shared by two groups: row 3 is in groups 0 and 1"
    ):
        shared = [{"rows": [1, 3], "cols": [0]}, {"rows": [3], "cols": [1]}]
        pack_groups(weight, None, shared, name="conv9")
    with pytest.raises(
        FormatError, match=r"group 0 has indices out of range.*rows '8'.*columns '18'"
    ):
        pack_groups(weight, None, [{"rows": [8], "cols": [18]}])
    with pytest.raises(FormatError, match="lists a column twice"):
        pack_groups(weight, None, [{"rows": [0], "cols": [1, 1]}])
    mask = torch.zeros(8, 2, 3, 3, dtype=torch.bool)
    mask[2, 1, 0, 2] = True  # column (ky=0, kx=2, c=1) = 5 of row 2, which no group owns
    with pytest.raises(
        FormatError, match=r"not the claimed group structure.*row 2, column 5 = \(ky=0, kx=2, c=1\)"
    ):
        pack_groups(weight, mask, [{"rows": [0], "cols": [5]}])


def test_zeros_inside_a_group_are_zero_weights(g):
    weight = conv_weight(4, 2, 1, g)
    mask = torch.zeros(4, 2, 1, 1, dtype=torch.bool)
    mask[0, 0] = True  # group claims rows 0,1 × cols 0,1 but the mask keeps one entry
    pack = pack_groups(weight, mask, [{"rows": [0, 1], "cols": [0, 1]}])
    assert torch.equal(pack.dense_weight(), weight * mask)


@pytest.mark.parametrize("cls", [ChannelPlan, GroupPack])
def test_state_round_trip_and_version(g, cls):
    weight = conv_weight(12, 5, 3, g)
    if cls is ChannelPlan:
        packed = pack_channels(weight, channel_mask(12, 5, 3, "both", g), torch.randn(12))
    else:
        layout, mask = group_layout(12, 5, 3, "mixed", g)
        packed = pack_groups(weight, mask, layout, torch.randn(12))
    tensors, meta = packed.state()
    back = cls.from_state(tensors, meta)
    assert torch.equal(back.dense_weight(), packed.dense_weight())
    newer = cls.VERSION + 1
    meta["format_version"] = newer
    with pytest.raises(FormatError, match=f"format_version {newer} is not readable"):
        cls.from_state(tensors, meta)
    # The one place a version lives: an instance at any other version cannot be built,
    # so the launchers' isinstance check settles it.
    fields = {f.name: getattr(packed, f.name) for f in dataclasses.fields(packed)}
    with pytest.raises(FormatError, match=f"format_version {newer}: these kernels read"):
        cls(**dict(fields, format_version=newer))


def test_launchers_take_only_the_format_types(g):
    """Kernels and the torch path refuse a look-alike instead of trusting its fields."""
    from types import SimpleNamespace

    plan = pack_channels(conv_weight(8, 4, 3, g), channel_mask(8, 4, 3, "both", g))
    fake = SimpleNamespace(**{f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)})
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(KernelInputError, match="expected a ChannelPlan, got SimpleNamespace"):
        ops.channel_conv(x, fake)
    assert ops.channel_conv(x, plan).shape == (1, 8, 4, 4)


def test_to_moves_weights_only(g):
    plan = pack_channels(conv_weight(8, 4, 3, g), channel_mask(8, 4, 3, "both", g), torch.randn(8))
    half = plan.to(dtype=torch.float16)
    assert half.weight.dtype == torch.float16 and half.bias.dtype == torch.float32
    assert half.out_idx.dtype == torch.int32 and plan.weight.dtype == torch.float32


def test_group_columns_are_ky_kx_c(g):
    weight = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    layout = [{"rows": [0, 1], "cols": list(range(12))}]
    pack = pack_groups(weight, None, layout, block_n=16, k_pad=16)
    tile = pack.values[: 16 * 16].view(16, 16)[:2, :12]
    assert torch.equal(tile, gemm_view(weight))


def test_group_pack_records_its_widest_group_on_the_host():
    """max_cols must not need col_ptr back from the device (a sync; breaks graph capture)."""
    from sparse_ops.nn import GroupSparseConv2d

    g = torch.Generator().manual_seed(5)
    weight = torch.randn(40, 12, 3, 3, generator=g)
    layout, mask = group_layout(40, 12, 3, "mixed", g)
    pack = pack_groups(weight, mask, layout, None, padding=1)
    ptr = pack.col_ptr.long()
    assert pack.groups_meta["max_cols"] == int((ptr[1:] - ptr[:-1]).max())
    unit = GroupSparseConv2d(pack)
    assert unit.max_cols["main"] == pack.max_cols
    assert unit.pack().groups_meta["max_cols"] == pack.max_cols
    # A leftover pack of one-column groups keeps its own width through save and load.
    rows = [{"rows": [r], "cols": [r % 12]} for r in range(0, 40, 3)]
    leftover_mask = torch.zeros(40, 12, 3, 3, dtype=torch.bool)
    leftover_mask[torch.arange(0, 40, 3), torch.arange(0, 40, 3) % 12, 0, 0] = True
    leftover = pack_groups(weight, leftover_mask, rows, None, padding=1)
    unit = GroupSparseConv2d(pack, leftover=leftover)
    tensors, config = unit.state()
    loaded = GroupSparseConv2d.from_state(tensors, json.loads(json.dumps(config)))
    assert leftover.max_cols < pack.max_cols  # padded widths: 32 vs 96 here
    assert loaded.max_cols == unit.max_cols == {"main": pack.max_cols, "left": leftover.max_cols}
    assert loaded.pack("left").max_cols == leftover.max_cols


def test_hand_built_plans_and_packs_are_checked_where_they_are_made():
    """What the kernels trust (index ranges, tile sizes) is checked on construction, for
    CPU tensors: a wrong index would be an out-of-bounds read on the GPU."""
    g = torch.Generator().manual_seed(3)
    weight = conv_weight(8, 6, 3, g)
    mask = channel_mask(8, 6, 3, "both", g)
    plan = pack_channels(weight, mask, None)
    fields_ = dict(vars(plan))
    bad_in = fields_["in_idx"].clone()
    bad_in[-1] = 9
    with pytest.raises(FormatError, match=r"in_idx: values must lie in \[0, 6\), found .*9"):
        ChannelPlan(**{**fields_, "in_idx": bad_in})
    twice = fields_["out_idx"].clone()
    twice[-1] = twice[0]
    with pytest.raises(FormatError, match="name each of the 8 output channels once"):
        ChannelPlan(**{**fields_, "out_idx": twice})
    ChannelPlan(**{**fields_, "in_idx": bad_in}, validate=False)  # the hot path's opt-out

    layout, gmask = group_layout(40, 12, 3, "mixed", g)
    pack = pack_groups(conv_weight(40, 12, 3, g), gmask, layout, None)
    parts = dict(vars(pack))
    with pytest.raises(FormatError, match="values do not hold the rows × columns tiles"):
        GroupPack(**{**parts, "values": parts["values"][:10]})
    col_idx = parts["col_idx"].clone()
    col_idx[0] = 12 * 9
    with pytest.raises(FormatError, match=r"col_idx: values must lie in \[-1, 108\)"):
        GroupPack(**{**parts, "col_idx": col_idx})
    tile_row = parts["tile_row"].clone()
    tile_row[0] += 1
    with pytest.raises(FormatError, match="blocks and the fill blocks exactly once"):
        GroupPack(**{**parts, "tile_row": tile_row})


# ---------------------------------------------------------------- GroupPack version 2


def _run_layout(cin: int, k: int, runs: list[tuple[int, int]]):
    """Columns for (tap, first channel) runs of 8."""
    return sorted(tap * cin + c0 + e for tap, c0 in runs for e in range(8))


@pytest.mark.parametrize("cin", [5, 16])
def test_column_codes_decode_col_idx(g, cin):
    weight = conv_weight(12, cin, 3, g)
    layout, mask = group_layout(12, cin, 3, "mixed", g)
    pack = pack_groups(weight, mask, layout, k_pad=16)
    code, idx = pack.col_code.long(), pack.col_idx.long()
    real = idx >= 0
    assert pack.col_code.dtype == torch.int32 and code.numel() == idx.numel()
    tap = idx[real] // cin
    torch.testing.assert_close(code[real] & 0xFFFF, idx[real] % cin)
    torch.testing.assert_close((code[real] >> 16) & 0xFF, tap % 3)
    torch.testing.assert_close(code[real] >> 24, tap // 3)
    # Padding columns name a real channel of a tap no pixel has (kx = 15): masked.
    padding = code[~real]
    assert bool(((padding & 0xFFFF) < min(8, cin)).all() and ((padding >> 16) == 15).all())


def test_column_runs_detected_and_checked(g):
    cin, k = 16, 3
    weight = conv_weight(40, cin, k, g)
    runs = [
        {"rows": list(range(0, 30)), "cols": _run_layout(cin, k, [(0, 8), (4, 0), (8, 8)])},
        {"rows": [31, 35], "cols": _run_layout(cin, k, [(2, 0)])},
    ]  # narrower than k_pad
    pack = pack_groups(weight, None, runs)
    assert pack.col_run == 8
    assert pack_groups(weight, None, runs, col_run=1).col_run == 1
    torch.testing.assert_close(pack.dense_weight(), weight * pack_mask(pack, weight))
    # A run of 8 that straddles two taps (channels 12..15 of tap 0, 0..3 of tap 1), and
    # one that is consecutive but not aligned (channels 4..11): not runs.
    for cols in ([12 + e for e in range(8)], [4 + e for e in range(8)]):
        layout = [{"rows": [0, 1], "cols": cols}]
        assert pack_groups(weight, None, layout).col_run == 1
        with pytest.raises(FormatError, match="not runs of 8"):
            pack_groups(weight, None, layout, col_run=8)
    # Cin not a multiple of 8: runs cannot tile a tap's channels.
    odd = conv_weight(8, 12, 1, g)
    assert pack_groups(odd, None, [{"rows": [0], "cols": list(range(8))}]).col_run == 1


def pack_mask(pack, weight):
    return (pack.dense_weight() != 0) | (weight == 0)


def test_version_1_state_is_migrated(g):
    weight = conv_weight(20, 16, 3, g)
    layout = [{"rows": list(range(10)), "cols": _run_layout(16, 3, [(1, 8), (5, 0)])}]
    pack = pack_groups(weight, None, layout, torch.randn(20))
    tensors, meta = pack.state()
    del tensors["col_code"]  # what a version-1 writer stored
    meta.pop("col_run")
    meta["format_version"] = 1
    back = GroupPack.from_state(tensors, meta)
    assert back.format_version == 2 and back.col_run == 8
    assert torch.equal(back.col_code, pack.col_code)
    assert torch.equal(back.dense_weight(), pack.dense_weight())


def test_tampered_column_tables_refused(g):
    weight = conv_weight(20, 16, 3, g)
    layout, mask = group_layout(20, 16, 3, "mixed", g)
    pack = pack_groups(weight, mask, layout)
    tensors, meta = pack.state()
    bad = dict(tensors, col_code=tensors["col_code"].clone())
    bad["col_code"][0] += 1 << 24  # a column that now reads another tap
    with pytest.raises(FormatError, match="col_code"):
        GroupPack.from_state(bad, meta)
    with pytest.raises(FormatError, match="col_run=8: columns are not runs"):
        GroupPack.from_state(tensors, dict(meta, col_run=8))
    with pytest.raises(FormatError, match="col_run must be 1 or 8"):
        GroupPack.from_state(tensors, dict(meta, col_run=4))
    # k_pad larger than the padding the column blocks really have: the kernel would walk
    # past a group's values.
    too_big = 2 * int((pack.col_ptr[1:] - pack.col_ptr[:-1]).max())
    with pytest.raises(FormatError, match=f"multiples of block_n=32 and k_pad={too_big}"):
        GroupPack.from_state(tensors, dict(meta, k_pad=too_big))
    with pytest.raises(FormatError, match="multiples of block_n=64"):
        GroupPack.from_state(tensors, dict(meta, block_n=64))
    # An output channel neither computed nor filled would never be written.
    rows = tensors["row_idx"].clone()
    rows[int(torch.nonzero(rows >= 0)[0])] = -1
    with pytest.raises(FormatError, match="exactly once"):
        GroupPack.from_state(dict(tensors, row_idx=rows), meta)


def test_crafted_schedules_and_pointers_refused(g):
    """Packs that would make the kernel read before an index array, skip output channels
    or claim offsets that are not block multiples (found by an adversarial review)."""
    import dataclasses

    weight = conv_weight(40, 16, 3, g)
    layout, mask = group_layout(40, 16, 3, "mixed", g)
    pack = pack_groups(weight, mask, layout, block_n=16, k_pad=16)
    assert pack.fill_idx.numel() and pack.num_groups

    def refused(match, **changes):
        with pytest.raises(FormatError, match=match):
            dataclasses.replace(pack, **changes)

    fill_tile = pack.tile_group < 0
    refused(
        "exactly once", tile_group=pack.tile_group[~fill_tile], tile_row=pack.tile_row[~fill_tile]
    )
    refused("exactly once", tile_group=pack.tile_group[:0], tile_row=pack.tile_row[:0])
    far = pack.tile_row.clone()
    far[fill_tile.nonzero()[0]] = -64
    refused("exactly once", tile_row=far)
    twice_group, twice_row = pack.tile_group.clone(), pack.tile_row.clone()
    twice_group[-1], twice_row[-1] = twice_group[0], twice_row[0]
    refused("exactly once", tile_group=twice_group, tile_row=twice_row)
    for name in ("row_ptr", "col_ptr"):
        refused("offsets from 0", **{name: getattr(pack, name) - 16})
    refused(
        "offsets from 0", val_ptr=pack.val_ptr + 4, values=torch.cat([torch.zeros(4), pack.values])
    )
    refused("must be ≥ 1", k_pad=0)
    refused("exceed what a column code holds", in_channels=70000)


def test_padding_columns_never_read_the_input(g):
    """A padding column's code has a tap bit no pixel has, so an Inf in the channels it
    names does not reach a group that never uses them (0 × Inf would be NaN)."""
    from sparse_ops_kernels import group_conv, launch

    weight = conv_weight(16, 16, 3, g)
    layout = [
        {"rows": list(range(16)), "cols": [tap * 16 + c for tap in range(9) for c in range(8, 12)]}
    ]
    pack = pack_groups(weight, None, layout, padding=1, k_pad=16)
    assert bool((pack.col_idx < 0).any())
    x = torch.randn(1, 16, 5, 5, generator=g)
    x[0, :8] = float("inf")  # channels no column of the group reads
    y = launch.run(group_conv.group_conv_launch(x, pack), None, group_conv.INTERPRETED)
    assert bool(torch.isfinite(y).all())


def test_packing_errors_are_sparse_ops_errors_and_format_errors(g):
    """The packer's refusals and the kernels' own format checks it runs both arrive as a
    PackingError: callers may catch SparseOpsError (the library's) or FormatError."""
    from sparse_ops.errors import PackingError, SparseOpsError

    weight = conv_weight(4, 3, 3, g)
    shared = [{"rows": [0, 1], "cols": [0, 1]}, {"rows": [1], "cols": [2]}]
    with pytest.raises(PackingError, match="rows shared by two groups") as caught:
        pack_groups(weight, None, shared)
    assert isinstance(caught.value, SparseOpsError) and isinstance(caught.value, FormatError)
    wide = torch.zeros(1, 1 << 16, 1, 1)  # more input channels than a column code holds
    with pytest.raises(PackingError, match="exceed what a column code holds"):
        pack_groups(wide)
