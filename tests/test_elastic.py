"""Elastic tickets (E-LTH): mappings, block-by-block copies, families, reports, errors.

Tickets are built from randomly initialised models with random masks and randomised
BN statistics, so every block's tensors differ and a wrong copy cannot pass. The
expected source of each target key is written out from key names here, independently
of how sparse_ops.structure.elastic derives the stages.
"""

from __future__ import annotations

import json

import pytest
import torch

from sparse_ops import SparseOpsError, Ticket, TicketMismatchError, load_ticket, models
from sparse_ops.errors import BlockMappingError, ElasticError
from sparse_ops.structure import (
    STRATEGIES,
    StageMapping,
    arch_layout,
    named_mapping,
    parse_mapping,
    resolve_mapping,
    transform,
)
from sparse_ops.structure.elastic import parse_stage_mapping

INTERPOLATE_32_56 = "0:0;1:1,2;2:3,4;3:5,6;4:7,8"
APPEND_32_56 = "0:0;1:1,5;2:2,6;3:3,7;4:4,8"
DROP_LAST_56_32 = "0:0;1:1;2:2;3:3;4:4"
DROP_INTERLEAVED_56_32 = "0:0;1:1;3:2;5:3;7:4"
SECTIONS = ("masks", "weights", "rewind")


def _state(arch: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    """An initialised model's state with BN parameters and statistics made distinct."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    state = {k: v.clone() for k, v in models.create(arch).state_dict().items()}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.randint(1, 10_000, (), generator=g)
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=g) + 0.5
        elif key.endswith(("running_mean", "bn1.bias", "bn2.bias", "bn.bias")):
            state[key] = 0.1 * torch.randn(value.shape, generator=g)
        elif value.dim() == 1 and key.endswith("weight"):  # BN scale
            state[key] = 1 + 0.1 * torch.randn(value.shape, generator=g)
    return state


def _ticket(arch: str, *, seed: int = 0, density: float = 0.3, meta: dict | None = None) -> Ticket:
    """Random masks on every conv/linear weight (stem and classifier too), weights + rewind."""
    g = torch.Generator().manual_seed(seed)
    weights, rewind = _state(arch, g), _state(arch, g)
    masks = {
        k: torch.rand(v.shape, generator=g) < density
        for k, v in weights.items()
        if k.endswith("weight") and v.dim() in (2, 4)
    }
    return Ticket(masks, weights, arch, meta or {"method": "refill"}, rewind=rewind)


def _snapshot(ticket: Ticket) -> dict[str, dict[str, torch.Tensor]]:
    return {s: {k: v.clone() for k, v in getattr(ticket, s).items()} for s in SECTIONS}


def _assert_same(a: Ticket, b: Ticket) -> None:
    for section in SECTIONS:
        sa, sb = getattr(a, section), getattr(b, section)
        assert (sa is None) == (sb is None), section
        if sa is not None:
            assert sa.keys() == sb.keys(), section
            for key in sa:
                assert sa[key].dtype == sb[key].dtype, (section, key)
                assert torch.equal(sa[key], sb[key]), (section, key)
    assert a.arch == b.arch


# ------------------------------------------------------ expected copies from key names


def _block(arch: str, stage: int, block: int, per_stage: int) -> str:
    if arch.startswith("res"):  # Structure-LTH: layer{1,2,3}.{j}
        return f"layer{stage + 1}.{block}"
    return f"blocks.{stage * per_stage + block}"  # open_lth: one global block index


def _cifar_pairs(src: str, dst: str, sources: list[int]) -> dict[str, str]:
    """``{target key: source key}`` for a CIFAR ResNet with ``sources[t]`` per stage."""
    n_src = arch_depth_blocks(src)
    n_dst = len(sources)
    pairs = {}
    for key in models.state_shapes(dst):
        pairs[key] = key  # stem, classifier
        for s in range(3):
            for t in range(n_dst):
                prefix = _block(dst, s, t, n_dst) + "."
                if key.startswith(prefix):
                    pairs[key] = _block(src, s, sources[t], n_src) + "." + key[len(prefix) :]
    return pairs


def arch_depth_blocks(arch: str) -> int:
    depth = int("".join(c for c in arch if c.isdigit()))
    return (depth - 2) // 6


def _assert_copied(src: Ticket, dst: Ticket, pairs: dict[str, str]) -> None:
    """Every target tensor equals (and does not share memory with) its intended source."""
    for section in SECTIONS:
        s_state, d_state = getattr(src, section), getattr(dst, section)
        expected = {k: v for k, v in pairs.items() if v in s_state}
        assert set(d_state) == set(expected), section
        for d_key, s_key in expected.items():
            assert torch.equal(d_state[d_key], s_state[s_key]), (section, d_key, s_key)
            assert d_state[d_key].data_ptr() != s_state[s_key].data_ptr(), (section, d_key)


# ---------------------------------------------------------------- strategies


def test_named_strategies_give_the_reference_examples():
    assert str(named_mapping("interpolate", 5, 9)) == INTERPOLATE_32_56
    assert str(named_mapping("append", 5, 9)) == APPEND_32_56
    assert str(named_mapping("drop-last", 9, 5)) == DROP_LAST_56_32
    assert str(named_mapping("drop-interleaved", 9, 5)) == DROP_INTERLEAVED_56_32
    assert str(named_mapping("drop-first", 9, 5)) == "0:0;5:1;6:2;7:3;8:4"


def test_interpolate_generalises_by_spreading_extra_copies_evenly():
    assert str(named_mapping("interpolate", 3, 9)) == "0:0;1:1,2,3,4;2:5,6,7,8"  # 20 → 56
    assert str(named_mapping("interpolate", 3, 5)) == "0:0;1:1,2;2:3,4"  # 20 → 32
    assert str(named_mapping("interpolate", 4, 6)) == "0:0;1:1,2;2:3,4;3:5"  # 3 → 5 later
    assert str(named_mapping("interpolate", 5, 7)) == "0:0;1:1,2;2:3;3:4,5;4:6"  # 4 → 6
    assert str(named_mapping("append", 3, 9)) == "0:0;1:1,3,5,7;2:2,4,6,8"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_is_valid_for_every_depth_pair_and_identity_at_equal_depth(strategy):
    for n_src in range(1, 13):
        for n_dst in range(1, 13):
            stretch = strategy in ("interpolate", "append")
            if n_src == n_dst:
                identity = ";".join(f"{i}:{i}" for i in range(n_src))
                assert str(named_mapping(strategy, n_src, n_dst)) == identity
                continue
            if stretch != (n_dst > n_src) or (n_src == 1 and n_dst > 1):
                with pytest.raises(BlockMappingError):
                    named_mapping(strategy, n_src, n_dst)
                continue
            mapping = named_mapping(strategy, n_src, n_dst)
            assert mapping.problems(n_src, n_dst) == [], (strategy, n_src, n_dst)
            pairs = mapping.as_dict()
            if strategy == "interpolate":  # in-place runs whose sizes differ by ≤ 1
                counts = [len(pairs[i]) for i in range(1, n_src)]
                assert max(counts) - min(counts) <= 1
                flat = [t for i in range(n_src) for t in pairs[i]]
                assert flat == list(range(n_dst))
            if not stretch:  # squeezes keep source order
                assert list(pairs) == sorted(pairs)


def test_strategy_in_the_wrong_direction_says_which_to_use():
    with pytest.raises(BlockMappingError, match="interpolate stretches.*drop-last"):
        named_mapping("interpolate", 9, 5)
    with pytest.raises(BlockMappingError, match="drop-interleaved squeezes.*interpolate"):
        named_mapping("drop-interleaved", 5, 9)
    with pytest.raises(BlockMappingError, match="unknown mapping strategy 'stretch'"):
        named_mapping("stretch", 5, 9)


# ---------------------------------------------------------------- parsing


def test_parse_round_trips_and_splits_stages():
    assert str(parse_stage_mapping(INTERPOLATE_32_56)) == INTERPOLATE_32_56
    assert str(parse_stage_mapping(" 0 : 0 ; 1 : 1 , 2 ")) == "0:0;1:1,2"
    stages = parse_mapping("0:0;1:1,2|0:0;1:1,2,3")
    assert [str(s) for s in stages] == ["0:0;1:1,2", "0:0;1:1,2,3"]
    assert parse_stage_mapping("0:0;1:1,2").as_dict() == {0: [0], 1: [1, 2]}
    assert StageMapping.from_dict({0: 0, 1: [1, 2]}) == parse_stage_mapping("0:0;1:1,2")


def test_inverse_undoes_a_stretch():
    assert str(parse_stage_mapping(INTERPOLATE_32_56).inverse()) == DROP_INTERLEAVED_56_32
    assert str(parse_stage_mapping(APPEND_32_56).inverse()) == DROP_LAST_56_32


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0:0;1", "entry '1' is not 'src:tgt"),
        ("0:0;x:1", "entry 'x:1'"),
        ("", "cannot parse block mapping ''"),
        ("0:0;;1:1", "entry ''"),
        ("0:0;1:1,", "entry '1:1,'"),
        ("interpolat", "named strategy .*interpolate"),
        ("0:0;1:1;1:2", "lists source block 1 twice"),
        ("0:0;1:1,1", "lists a target twice"),
        ("0:0;1:-1", "ints ≥ 0"),
    ],
)
def test_unparsable_mappings(text, match):
    with pytest.raises(BlockMappingError, match=match):
        parse_mapping(text)


def test_parse_error_names_the_stage():
    with pytest.raises(BlockMappingError, match="stage 1: cannot parse .*'0:0;1;2'"):
        parse_mapping("0:0;1:1|0:0;1;2")


# ---------------------------------------------------------------- mapping checks


@pytest.mark.parametrize(
    ("mapping", "match"),
    [
        ("0:0;1:1;2:2", "stage 0: target blocks 3, 4, 5, 6, 7, 8 not covered"),
        ("0:0;1:1,2;2:3,4;3:5,6;5:7,8", "source block 5 out of range .*0–4"),
        ("0:0;1:1,2;2:3,4;3:5,6;4:7,9", "target block 9 out of range .*0–8"),
        ("0:0,1;1:2;2:3,4;3:5,6;4:7,8", "block 0 .* may map only to block 0, not to blocks 0, 1"),
        ("0:0;1:0,1,2;2:3,4;3:5,6;4:7,8", "only block 0 may map to target block 0, not block 1"),
        ("1:0,1,2;2:3,4;3:5,6;4:7,8", "block 0 .* must map to block 0"),
        ("0:0;1:1,2;2:2,3,4;3:5,6;4:7,8", "target block 2 is covered by several .*1, 2"),
    ],
)
def test_bad_mappings_name_stage_and_blocks(mapping, match):
    with pytest.raises(BlockMappingError, match=match):
        resolve_mapping(mapping, (5, 5, 5), (9, 9, 9))


def test_every_stage_and_every_uncovered_block_is_reported():
    with pytest.raises(BlockMappingError) as err:
        resolve_mapping("0:0;1:1|0:0;1:1,2|0:0;2:1", (3, 3, 3), (5, 5, 5))
    message = str(err.value)
    assert "stage 0: target blocks 2, 3, 4 not covered" in message
    assert "stage 1: target blocks 3, 4 not covered" in message
    assert "stage 2: target blocks 2, 3, 4 not covered" in message


def test_wrong_number_of_stage_mappings():
    with pytest.raises(BlockMappingError, match="2 per-stage mappings for 3 stages"):
        resolve_mapping("interpolate|interpolate", (5, 5, 5), (9, 9, 9))


def test_one_mapping_for_stages_of_different_depths_hints_at_per_stage():
    with pytest.raises(BlockMappingError, match="stages differ in depth, 2, 2, 2, 2 → 3, 4, 6, 3"):
        resolve_mapping("0:0;1:1,2", (2, 2, 2, 2), (3, 4, 6, 3))


def test_resolve_accepts_names_strings_and_dicts_per_stage():
    stages = resolve_mapping(
        ["interpolate", {0: [0], 1: [2, 1]}, "0:0;1:1;2:2"], (2, 2, 3), (3, 3, 3)
    )
    assert [str(s) for s in stages] == ["0:0;1:1,2", "0:0;1:2,1", "0:0;1:1;2:2"]
    assert stages[1].extras() == {1}  # the first listed target is the primary copy


# ---------------------------------------------------------------- layouts


def test_layouts_come_from_the_models():
    assert arch_layout("res56s").counts == (9, 9, 9)
    assert arch_layout("cifar_resnet_32").stages[1][:2] == ("blocks.5", "blocks.6")
    assert arch_layout("resnet34").counts == (3, 4, 6, 3)
    assert arch_layout("resnet50").block_types[0] == ("Bottleneck",) * 3
    assert arch_layout("imagenet_resnet_18").root == "model."
    vgg = arch_layout("cifar_vgg_16")
    assert vgg.counts == (2, 2, 3, 3, 3)
    assert vgg.stages[2] == ("layers.6", "layers.7", "layers.8")  # layers.5 is a pool
    assert arch_layout("vgg16_bn").stages == ()  # flat conv/BN/ReLU list: no blocks


# ---------------------------------------------------------------- CIFAR ResNets


@pytest.mark.parametrize(
    ("src", "dst"), [("res32s", "res56s"), ("cifar_resnet_32", "cifar_resnet_56")]
)
def test_interpolate_32_to_56_copies_each_block_from_its_source(src, dst):
    ticket = _ticket(src)
    before = _snapshot(ticket)
    out = transform(ticket, src, dst, "interpolate")
    assert out.arch == dst
    _assert_copied(ticket, out, _cifar_pairs(src, dst, [0, 1, 1, 2, 2, 3, 3, 4, 4]))
    # BN statistics travel with their block (spelled out for one block)
    b_dst, b_src = _block(dst, 1, 6, 9), _block(src, 1, 3, 5)
    for stat in ("running_mean", "running_var", "num_batches_tracked"):
        for section in ("weights", "rewind"):
            got, src_state = getattr(out, section), getattr(ticket, section)
            assert torch.equal(got[f"{b_dst}.bn2.{stat}"], src_state[f"{b_src}.bn2.{stat}"])
    # the source ticket is untouched
    for section, state in before.items():
        assert all(torch.equal(v, getattr(ticket, section)[k]) for k, v in state.items())


def test_interpolate_keeps_layer_and_stage_density_of_the_repeated_blocks():
    ticket = _ticket("res32s")
    out, report = transform(ticket, "res32s", "res56s", return_report=True)
    for layer in report.layers:
        assert layer.nnz_after == layer.nnz_before  # sparsity is not renormalised
    for s in range(3):

        def later(masks, prefix):
            inside = [m for k, m in masks.items() if k.startswith(prefix) and ".0." not in k]
            return sum(int(m.sum()) for m in inside), sum(m.numel() for m in inside)

        nnz_src, n_src = later(ticket.masks, f"layer{s + 1}.")
        nnz_dst, n_dst = later(out.masks, f"layer{s + 1}.")
        assert (nnz_dst, n_dst) == (2 * nnz_src, 2 * n_src)  # every later block twice
    for key in ("conv1.weight", "fc.weight", "layer2.0.conv1.weight", "layer3.0.conv2.weight"):
        assert torch.equal(out.masks[key], ticket.masks[key])
        assert torch.equal(out.weights[key], ticket.weights[key])


@pytest.mark.parametrize(
    ("mapping", "sources"),
    [
        ("drop-interleaved", [0, 1, 3, 5, 7]),
        (DROP_INTERLEAVED_56_32, [0, 1, 3, 5, 7]),
        ("drop-last", [0, 1, 2, 3, 4]),
        (DROP_LAST_56_32, [0, 1, 2, 3, 4]),
        ("drop-first", [0, 5, 6, 7, 8]),
    ],
)
def test_squeeze_56_to_32(mapping, sources):
    ticket = _ticket("res56s")
    out = transform(ticket, "res56s", "res32s", mapping)
    _assert_copied(ticket, out, _cifar_pairs("res56s", "res32s", sources))


@pytest.mark.parametrize("mapping", ["append", APPEND_32_56])
def test_append_32_to_56(mapping):
    ticket = _ticket("cifar_resnet_32")
    out = transform(ticket, None, "cifar_resnet_56", mapping)
    pairs = _cifar_pairs("cifar_resnet_32", "cifar_resnet_56", [0, 1, 2, 3, 4, 1, 2, 3, 4])
    _assert_copied(ticket, out, pairs)


def test_stretch_then_inverse_squeeze_returns_the_original_exactly():
    ticket = _ticket("res32s")
    for stretch in ("interpolate", "append"):
        deep = transform(ticket, "res32s", "res56s", stretch)
        inverse = str(named_mapping(stretch, 5, 9).inverse())
        back = transform(deep, "res56s", "res32s", inverse)
        _assert_same(back, ticket)
        assert [r["mapping"][0] for r in back.meta["elastic"]] == [
            str(named_mapping(stretch, 5, 9)),
            inverse,
        ]
    # the named inverses
    back = transform(transform(ticket, None, "res56s"), None, "res32s", "drop-interleaved")
    _assert_same(back, ticket)


def test_random_extra_shuffles_only_the_extra_copies():
    ticket = _ticket("res32s")
    before = _snapshot(ticket)
    out, report = transform(
        ticket, "res32s", "res56s", random_extra=True, seed=7, return_report=True
    )
    pairs = _cifar_pairs("res32s", "res56s", [0, 1, 1, 2, 2, 3, 3, 4, 4])
    extra_blocks = {f"layer{s}.{b}." for s in (1, 2, 3) for b in (2, 4, 6, 8)}
    shuffled = 0
    for key, src_key in pairs.items():
        if key in out.masks:
            src_mask = ticket.masks[src_key]
            if any(key.startswith(b) for b in extra_blocks):
                assert int(out.masks[key].sum()) == int(src_mask.sum())  # exact count
                assert not torch.equal(out.masks[key], src_mask)
                shuffled += 1
            else:
                assert torch.equal(out.masks[key], src_mask)
        for section in ("weights", "rewind"):  # weights of the copy stay copied
            assert torch.equal(getattr(out, section)[key], getattr(ticket, section)[src_key])
    assert shuffled == 3 * 4 * 2
    assert sum(layer.role == "extra copy, shuffled" for layer in report.layers) == shuffled
    for section, state in before.items():
        assert all(torch.equal(v, getattr(ticket, section)[k]) for k, v in state.items())
    again = transform(ticket, "res32s", "res56s", random_extra=True, seed=7)
    other = transform(ticket, "res32s", "res56s", random_extra=True, seed=8)
    assert all(torch.equal(again.masks[k], m) for k, m in out.masks.items())
    assert any(not torch.equal(other.masks[k], m) for k, m in out.masks.items())
    meta = out.meta["elastic"][-1]
    assert meta["random_extra"] is True and meta["seed"] == 7


def test_transformed_ticket_fits_runs_and_survives_save_and_load(tmp_path):
    ticket = _ticket("cifar_resnet_20")
    out = transform(ticket, "cifar_resnet_20", "cifar_resnet_44")
    out.check_fits("cifar_resnet_44")
    model = out.create_model()
    out.apply(model, "weights")
    with torch.no_grad():
        logits = model.eval()(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10) and bool(torch.isfinite(logits).all())
    loaded = load_ticket(out.save(tmp_path / "t44.safetensors"))
    _assert_same(loaded, out)
    assert loaded.meta["elastic"][0]["mapping"] == ["0:0;1:1,2,3;2:4,5,6"] * 3
    assert loaded.meta["method"] == "refill"


def test_meta_keeps_structure_and_moves_source_measurements():
    groups = {"layer1.1.conv1.weight": [{"rows": [0, 1], "cols": [2, 3]}]}
    meta = {"method": "regroup", "groups": groups, "accuracy": 91.5, "density": 0.3, "round": 4}
    ticket = _ticket("res20s", meta=meta)
    out = transform(ticket, "res20s", "res32s")
    assert out.meta["method"] == "regroup" and out.meta["round"] == 4
    assert "accuracy" not in out.meta and "density" not in out.meta
    record = out.meta["elastic"][0]
    assert record["source_meta"] == {"accuracy": 91.5, "density": 0.3}
    assert record["source_arch"] == "res20s" and record["target_arch"] == "res32s"
    assert record["strategy"] == "interpolate" and record["mapping"] == ["0:0;1:1,2;2:3,4"] * 3
    assert set(out.meta["groups"]) == {"layer1.1.conv1.weight", "layer1.2.conv1.weight"}
    assert out.meta["structure_report"]["method"] == "elastic"
    json.dumps(out.meta)
    shuffled = transform(ticket, "res20s", "res32s", random_extra=True)
    assert set(shuffled.meta["groups"]) == {"layer1.1.conv1.weight"}  # the copy's mask moved


def test_masks_only_ticket():
    ticket = _ticket("res20s")
    masks_only = Ticket(ticket.masks, arch="res20s")
    out = transform(masks_only, "res20s", "res44s")
    assert out.weights is None and out.rewind is None
    assert torch.equal(out.masks["layer3.6.conv2.weight"], ticket.masks["layer3.2.conv2.weight"])


def test_report_per_stage_and_layer():
    ticket = _ticket("res32s")
    _, report = transform(ticket, "res32s", "res56s", return_report=True)
    assert [s.sources for s in report.stages] == [(0, 1, 1, 2, 2, 3, 3, 4, 4)] * 3
    assert report.stages[0].extras == (2, 4, 6, 8) and report.stages[0].kind == "stretch"
    assert report.mapping == "|".join([INTERPOLATE_32_56] * 3)
    layer = next(c for c in report.layers if c.name == "layer2.4.conv1.weight")
    assert (layer.source, layer.stage, layer.block, layer.source_block) == (
        "layer2.2.conv1.weight",
        1,
        4,
        2,
    )
    assert layer.role == "extra copy"
    d = json.loads(json.dumps(report.to_dict()))
    assert d["stages"][1]["sources"] == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert d["density_before"] == pytest.approx(ticket.density)
    text = report.render()
    assert "source of each block" in text and "0 1 1 2 2 3 3 4 4" in text
    assert "layer2.4.conv1.weight" in text and "extra copy" in text


# ---------------------------------------------------------------- ImageNet ResNets, VGG


@pytest.fixture(scope="module")
def resnet18_ticket() -> Ticket:
    return _ticket("resnet18", seed=1)


def test_imagenet_resnet18_to_34_per_stage(resnet18_ticket):
    ticket = resnet18_ticket
    out, report = transform(ticket, "resnet18", "resnet34", return_report=True)
    assert report.mapping == "0:0;1:1,2|0:0;1:1,2,3|0:0;1:1,2,3,4,5|0:0;1:1,2"
    explicit = transform(ticket, "resnet18", "resnet34", report.mapping)
    _assert_same(explicit, out)
    for section in SECTIONS:
        state, src = getattr(out, section), getattr(ticket, section)
        keys = ["layer3.5.conv2.weight", "layer1.2.conv1.weight"]
        keys += ["layer2.3.bn1.weight", "layer4.2.bn2.running_var"] if section != "masks" else []
        for key in keys:
            stage_block = key.split(".")[0] + ".1." + ".".join(key.split(".")[2:])
            assert torch.equal(state[key], src[stage_block]), (section, key)
        for key in ("conv1.weight", "fc.weight", "layer4.0.downsample.0.weight"):
            assert torch.equal(state[key], src[key])
    model = out.create_model()
    out.apply(model, "rewind", hooks=False)
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 10)


def test_imagenet_naming_schemes_cross(resnet18_ticket):
    direct = transform(resnet18_ticket, "resnet18", "resnet34")
    wrapped = resnet18_ticket.with_arch("imagenet_resnet_18")  # keys under "model."
    assert "model.layer1.0.conv1.weight" in wrapped.masks
    via = transform(wrapped, "imagenet_resnet_18", "resnet34")
    assert via.arch == "resnet34"
    for section in SECTIONS:
        a, b = getattr(direct, section), getattr(via, section)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_imagenet_squeeze_and_block_type_mismatch(resnet18_ticket):
    deep = transform(resnet18_ticket, None, "resnet34", "append")
    _assert_same(transform(deep, None, "resnet18", "drop-last"), resnet18_ticket)
    with pytest.raises(ElasticError, match="BasicBlock blocks in resnet18 but Bottleneck"):
        transform(resnet18_ticket, "resnet18", "resnet50")


# cifar_vgg_13 layers: [0 1] pool [3 4] pool [6 7] pool [9 10] pool [12 13]
# cifar_vgg_16 layers: [0 1] pool [3 4] pool [6 7 8] pool [10 11 12] pool [14 15 16]
VGG_13_TO_16 = {
    0: 0,
    1: 1,
    3: 3,
    4: 4,
    6: 6,
    7: 7,
    8: 7,
    10: 9,
    11: 10,
    12: 10,
    14: 12,
    15: 13,
    16: 13,
}


def test_vgg_per_stage_interpolate():
    ticket = _ticket("cifar_vgg_13")
    out, report = transform(ticket, "cifar_vgg_13", "cifar_vgg_16", return_report=True)
    assert [s.mapping for s in report.stages] == ["0:0;1:1"] * 2 + ["0:0;1:1,2"] * 3
    pairs = {}
    for key in models.state_shapes("cifar_vgg_16"):
        if key.startswith("layers."):
            index, rest = key.split(".", 2)[1:]
            pairs[key] = f"layers.{VGG_13_TO_16[int(index)]}.{rest}"
        else:
            pairs[key] = key
    _assert_copied(ticket, out, pairs)
    model = out.create_model()
    out.apply(model, "weights")
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_vgg_explicit_per_stage_mapping_and_squeeze():
    ticket = _ticket("cifar_vgg_16", seed=2)
    out = transform(ticket, None, "cifar_vgg_11", "0:0|0:0|0:0;2:1|0:0;1:1|drop-last")
    # vgg_11 layers: [0] pool [2] pool [4 5] pool [7 8] pool [10 11]
    expected = {0: 0, 2: 3, 4: 6, 5: 8, 7: 10, 8: 11, 10: 14, 11: 15}
    for dst_index, src_index in expected.items():
        for section in SECTIONS:
            key = f"layers.{dst_index}.conv.weight"
            assert torch.equal(
                getattr(out, section)[key],
                getattr(ticket, section)[f"layers.{src_index}.conv.weight"],
            )


def test_vgg_stage_with_only_a_first_block_cannot_grow():
    with pytest.raises(BlockMappingError, match="stage 0: the source stage has only its first"):
        transform(_ticket("cifar_vgg_11"), None, "cifar_vgg_13")


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def res32s_ticket() -> Ticket:
    return _ticket("res32s", seed=3)


def test_different_families(res32s_ticket):
    with pytest.raises(ElasticError, match="different families .*cifar_resnet_a.*cifar_resnet_b"):
        transform(res32s_ticket, "res32s", "cifar_resnet_56")
    with pytest.raises(ElasticError, match="different families"):
        transform(res32s_ticket, "res32s", "wrn32")


def test_width_change():
    ticket = _ticket("cifar_resnet_20")
    with pytest.raises(ElasticError, match="width differs .*conv.weight is \\(16, 3, 3, 3\\)"):
        transform(ticket, "cifar_resnet_20", "cifar_resnet_56_32")
    # the same width spelled out is fine
    assert transform(ticket, None, "cifar_resnet_32_16").arch == "cifar_resnet_32_16"


def test_ticket_that_does_not_fit_the_source(res32s_ticket):
    with pytest.raises(TicketMismatchError, match="does not fit res20s.*found on"):
        transform(res32s_ticket, "res20s", "res56s")
    with pytest.raises(ElasticError, match="names no architecture"):
        transform(Ticket(res32s_ticket.masks), None, "res56s")


def test_architecture_without_blocks():
    ticket = _ticket("vgg16_bn")
    with pytest.raises(ElasticError, match="vgg16_bn has no stages of blocks"):
        transform(ticket, None, "vgg16_bn")


def test_bad_mapping_through_transform(res32s_ticket):
    with pytest.raises(BlockMappingError, match="cannot parse"):
        transform(res32s_ticket, None, "res56s", "0:0;1:1,2;2")
    with pytest.raises(BlockMappingError, match="target blocks 7, 8 not covered"):
        transform(res32s_ticket, None, "res56s", "0:0;1:1,2;2:3,4;3:5,6")
    with pytest.raises(BlockMappingError, match="4 per-stage mappings for 3 stages"):
        transform(res32s_ticket, None, "res56s", "|".join([INTERPOLATE_32_56] * 4))
    with pytest.raises(BlockMappingError, match="squeeze with"):
        transform(res32s_ticket, None, "res20s", "interpolate")


def test_errors_are_sparse_ops_errors():
    assert issubclass(BlockMappingError, ElasticError)
    assert issubclass(ElasticError, SparseOpsError)
