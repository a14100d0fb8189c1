"""The Ticket type: validation, statistics, our file format, fitting and applying."""

from __future__ import annotations

import json
import struct

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn
from torch.nn.utils import prune

from sparse_ops import (
    FORMAT_VERSION,
    Ticket,
    TicketFormatError,
    TicketMismatchError,
    UnknownArchitectureError,
    load_ticket,
    models,
)


def _random_ticket(arch: str = "res20s", density: float = 0.3, rewind: bool = True) -> Ticket:
    model = models.create(arch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {
        k: torch.rand(v.shape) < density
        for k, v in state.items()
        if k.endswith(("conv1.weight", "conv2.weight")) and k != "conv1.weight"
    }
    rewind_state = {k: v + 1 for k, v in state.items()} if rewind else None
    return Ticket(masks, state, arch, {"method": "test"}, rewind=rewind_state)


def _assert_same(a: Ticket, b: Ticket) -> None:
    for section in ("masks", "weights", "rewind"):
        sa, sb = getattr(a, section), getattr(b, section)
        assert (sa is None) == (sb is None), section
        if sa is not None:
            assert sa.keys() == sb.keys(), section
            for k in sa:
                assert sa[k].dtype == sb[k].dtype, (section, k)
                assert torch.equal(sa[k], sb[k]), (section, k)
    assert a.arch == b.arch


# ---------------------------------------------------------------- construction


def test_masks_become_bool_and_density_is_global():
    masks = {"a.weight": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "b.weight": torch.ones(2, 2)}
    t = Ticket(masks)
    assert all(m.dtype == torch.bool for m in t.masks.values())
    assert t.density == pytest.approx(5 / 8) and t.sparsity == pytest.approx(3 / 8)
    assert Ticket({}).density == 1.0


def test_mask_values_other_than_binary_rejected():
    with pytest.raises(TicketMismatchError, match=r"'conv\.weight'.*other than 0/1.*0\.5"):
        Ticket({"conv.weight": torch.tensor([[0.0, 0.5]])})
    with pytest.raises(TicketMismatchError, match="'c.weight'"):
        Ticket({"c.weight": torch.tensor([[0, 2]])})


def test_mask_shape_must_be_conv_or_linear():
    with pytest.raises(TicketMismatchError, match=r"'bn\.weight'.*\(8,\)"):
        Ticket({"bn.weight": torch.ones(8)})


def test_mask_weight_shape_mismatch_names_both_shapes():
    with pytest.raises(TicketMismatchError, match=r"'fc\.weight'.*\(4, 3\).*\(4, 5\)"):
        Ticket({"fc.weight": torch.ones(4, 3)}, {"fc.weight": torch.ones(4, 5)})


def test_mask_without_weight():
    with pytest.raises(
        TicketMismatchError, match="'fc.weight' has no weight in the ticket's rewind"
    ):
        Ticket({"fc.weight": torch.ones(4, 3)}, rewind={"other": torch.ones(1)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_weights_rejected(bad):
    w = torch.ones(4, 3)
    w[1, 2] = bad
    with pytest.raises(
        TicketMismatchError, match=r"weights tensor 'fc\.weight' \(4, 3\).*1 NaN/Inf"
    ):
        Ticket({"fc.weight": torch.ones(4, 3)}, {"fc.weight": w})


def test_masked_weights():
    w = torch.arange(6.0).reshape(2, 3) + 1
    t = Ticket({"fc.weight": torch.tensor([[1, 0, 1], [0, 0, 1]])}, {"fc.weight": w, "x": w})
    masked = t.masked_weights()
    assert torch.equal(masked["fc.weight"], torch.tensor([[1.0, 0, 3], [0, 0, 6]]))
    assert torch.equal(masked["x"], w)
    with pytest.raises(TicketMismatchError, match="no rewind"):
        t.masked_weights("rewind")


# ---------------------------------------------------------------- our format


def test_save_load_round_trip(tmp_path):
    t = _random_ticket()
    t.meta["groups"] = {"layer1.0.conv1.weight": [{"rows": [0, 1], "cols": [3, 4]}]}
    path = t.save(tmp_path / "t.safetensors")
    back = load_ticket(path)
    _assert_same(t, back)
    assert back.meta["groups"] == t.meta["groups"]
    assert back.meta["method"] == "test"
    assert back.meta["source_format"] == "sparse-ops"
    # int64 0-d buffers (num_batches_tracked) survive
    assert back.weights["bn1.num_batches_tracked"].shape == ()


def test_round_trip_masks_only(tmp_path):
    t = Ticket({"fc.weight": torch.rand(3, 4) < 0.5})
    back = load_ticket(t.save(tmp_path / "m.safetensors"))
    _assert_same(t, back)
    assert back.weights is None and back.rewind is None


def test_saved_ticket_keeps_origin_format(tmp_path):
    t = _random_ticket()
    t.meta["source_format"] = "structure-lth"
    back = load_ticket(t.save(tmp_path / "t.safetensors"))
    assert back.meta["origin_format"] == "structure-lth"


def test_file_holds_no_pickle(tmp_path):
    path = _random_ticket().save(tmp_path / "t.safetensors")
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "sparse-ops-ticket"
    assert header["__metadata__"]["format_version"] == str(FORMAT_VERSION)
    assert all(k.split("/")[0] in ("masks", "weights", "rewind") for k in header if k[0] != "_")


def _rewrite_metadata(path, **changes):
    from safetensors.torch import load_file, save_file

    from sparse_ops.checkpoint_io import read_safetensors

    _, metadata = read_safetensors(path)
    save_file(load_file(str(path)), str(path), metadata={**metadata, **changes})


def test_newer_format_version_rejected(tmp_path):
    path = _random_ticket().save(tmp_path / "t.safetensors")
    _rewrite_metadata(path, format_version=str(FORMAT_VERSION + 1))
    with pytest.raises(TicketFormatError, match="newer sparse-ops.*format_version 2"):
        load_ticket(path)


def test_corrupt_meta_json_rejected(tmp_path):
    path = _random_ticket().save(tmp_path / "t.safetensors")
    _rewrite_metadata(path, meta="{not json")
    with pytest.raises(TicketFormatError, match="corrupt meta JSON"):
        load_ticket(path)


def test_unserialisable_meta_rejected(tmp_path):
    t = _random_ticket()
    t.meta["bad"] = object()
    with pytest.raises(TicketFormatError, match="not JSON-serialisable"):
        t.save(tmp_path / "t.safetensors")
    assert not (tmp_path / "t.safetensors").exists()


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    shapes=st.lists(
        st.one_of(
            st.tuples(st.integers(1, 6), st.integers(1, 6)),
            st.tuples(
                st.integers(1, 5),
                st.integers(1, 5),
                st.sampled_from([1, 3]),
                st.sampled_from([1, 3]),
            ),
        ),
        min_size=0,
        max_size=4,
    ),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
)
def test_round_trip_property(tmp_path, shapes, dtype):
    masks = {f"l{i}.weight": torch.rand(s) < 0.5 for i, s in enumerate(shapes)}
    weights = {f"l{i}.weight": torch.randn(s).to(dtype) for i, s in enumerate(shapes)}
    weights["step"] = torch.tensor(7)
    t = Ticket(masks, weights, meta={"n": len(shapes)})
    back = load_ticket(t.save(tmp_path / "p.safetensors"))
    _assert_same(t, back)


# ---------------------------------------------------------------- fitting


def test_check_fits_lists_missing_and_unexpected_keys():
    t = _random_ticket()
    weights = dict(t.weights)
    del weights["layer1.0.bn1.weight"]
    weights["extra.weight"] = torch.ones(1)
    bad = Ticket(t.masks, weights, rewind=None)
    with pytest.raises(TicketMismatchError) as err:
        bad.check_fits("res20s")
    msg = str(err.value)
    assert "missing: 'layer1.0.bn1.weight'" in msg and "not in res20s: 'extra.weight'" in msg
    assert "\n" not in msg


def test_check_fits_mask_not_a_conv():
    t = Ticket({"layer1.0.bn1.weight": torch.ones(16, 16)})
    with pytest.raises(TicketMismatchError, match="not conv/linear weights of res20s"):
        t.check_fits("res20s")


def test_check_fits_shape_mismatch_names_layer():
    t = Ticket({"layer2.0.conv1.weight": torch.ones(32, 16, 1, 1)})
    with pytest.raises(TicketMismatchError, match=r"layer2\.0\.conv1\.weight \(32, 16, 1, 1\) vs"):
        t.check_fits("res20s")


def test_optional_keys_may_be_absent():
    t = _random_ticket(rewind=False)
    weights = {
        k: v
        for k, v in t.weights.items()
        if not k.endswith("num_batches_tracked") and not k.startswith("normalize.")
    }
    Ticket(t.masks, weights).check_fits("res20s")


def test_num_classes_inferred_from_classifier():
    model = models.create("res20s", num_classes=100)
    t = Ticket({}, model.state_dict())
    assert t.with_arch("res20s").arch == "res20s"
    with pytest.raises(TicketMismatchError, match="fc.weight"):
        Ticket({}, model.state_dict()).check_fits(models.create("res20s", num_classes=10))


def test_with_arch_unknown_name():
    with pytest.raises(UnknownArchitectureError, match="did you mean res20s"):
        _random_ticket().with_arch("res20")


def test_with_arch_moves_model_prefix_both_ways():
    net = models.create("imagenet_resnet_18")
    masks = {"model.layer1.0.conv1.weight": torch.rand(64, 64, 3, 3) < 0.5}
    t = Ticket(masks, net.state_dict())
    plain = t.with_arch("resnet18")
    assert "layer1.0.conv1.weight" in plain.masks and "conv1.weight" in plain.weights
    assert plain.meta["key_prefix_change"] == "removed 'model.'"
    again = plain.with_arch("imagenet_resnet_18")
    assert "model.layer1.0.conv1.weight" in again.masks


# ---------------------------------------------------------------- applying


def test_apply_with_hooks_matches_masked_weights():
    t = _random_ticket()
    model = t.apply(models.create("res20s"), "weights")
    name = "layer2.1.conv2"
    conv = model.get_submodule(name)
    assert prune.is_pruned(conv)
    expected = t.weights[f"{name}.weight"] * t.masks[f"{name}.weight"]
    torch.testing.assert_close(conv.weight, expected)
    # and a pruned model reads back as the same ticket
    back = Ticket.from_module(model, arch="res20s")
    assert back.masks.keys() == t.masks.keys()
    assert all(torch.equal(back.masks[k], t.masks[k]) for k in t.masks)


def test_apply_rewind_without_hooks():
    t = _random_ticket()
    model = t.apply(models.create("res20s"), "rewind", hooks=False)
    assert not prune.is_pruned(model)
    w = model.state_dict()["layer3.0.conv1.weight"]
    torch.testing.assert_close(
        w, t.rewind["layer3.0.conv1.weight"] * t.masks["layer3.0.conv1.weight"]
    )
    torch.testing.assert_close(model.state_dict()["fc.bias"], t.rewind["fc.bias"])


def test_apply_refuses_already_pruned_model():
    t = _random_ticket()
    model = models.create("res20s")
    prune.l1_unstructured(model.layer1[0].conv1, "weight", amount=0.5)
    with pytest.raises(TicketMismatchError, match=r"pruning hooks \(on 'layer1\.0\.conv1'\)"):
        t.apply(model)


def test_apply_checks_fit():
    t = _random_ticket()
    with pytest.raises(TicketMismatchError, match="does not fit"):
        t.apply(models.create("res56s"))


def test_masked_model_forward_matches_manual_masking():
    t = _random_ticket()
    hooked = t.apply(models.create("res20s"), "weights").eval()
    manual = models.create("res20s")
    manual.load_state_dict(t.masked_weights())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hooked(x), manual.eval()(x))


def test_summary_is_json_ready():
    summary = _random_ticket().summary()
    json.dumps(summary)
    assert summary["masked_params"] >= summary["kept_params"] > 0
    assert {"name", "shape", "density", "structure"} <= set(summary["layers"][0])


def test_repr_mentions_arch_and_density():
    r = repr(_random_ticket())
    assert "arch=res20s" in r and "density" in r and "weights+rewind" in r


def test_from_module_without_hooks_reads_zeros():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[0].weight[0] = 0
    t = Ticket.from_module(model)
    assert t.meta["source_format"] == "module-zeros"
    assert list(t.masks) == ["0.weight"]
    assert not t.masks["0.weight"][0].any() and t.masks["0.weight"][1:].all()


def test_stored_arch_is_checked_on_load(tmp_path):
    path = _random_ticket().save(tmp_path / "wrong_arch.safetensors")
    _rewrite_metadata(path, arch="res56s")  # wrong on purpose: the weights are res20s's
    with pytest.raises(
        TicketMismatchError, match="wrong_arch.safetensors: ticket does not fit res56s"
    ):
        load_ticket(path)
    assert load_ticket(path, arch="res20s").arch == "res20s"


def test_custom_arch_name_is_kept_unchecked(tmp_path):
    t = Ticket({"fc.weight": torch.ones(2, 2)}, arch="my_own_net")
    assert load_ticket(t.save(tmp_path / "own.safetensors")).arch == "my_own_net"


# ---------------------------------------------------------------- found in review


def test_save_refuses_a_ticket_that_could_not_be_loaded_back(tmp_path):
    t = _random_ticket()
    partial = {k: v for k, v in t.weights.items() if not k.startswith("layer3")}
    masks = {k: v for k, v in t.masks.items() if not k.startswith("layer3")}
    with pytest.raises(TicketMismatchError, match="does not fit res20s"):
        Ticket(masks, partial, "res20s").save(tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists()


def test_sections_missing_from_metadata_are_inferred(tmp_path):
    from safetensors.torch import load_file, save_file

    from sparse_ops.checkpoint_io import read_safetensors

    path = _random_ticket().save(tmp_path / "t.safetensors")
    _, metadata = read_safetensors(path)
    del metadata["sections"]
    save_file(load_file(str(path)), str(path), metadata=metadata)
    back = load_ticket(path)
    assert back.weights is not None and back.rewind is not None


def test_empty_weights_round_trip(tmp_path):
    t = Ticket({}, {})
    assert load_ticket(t.save(tmp_path / "e.safetensors")).weights == {}


@pytest.mark.parametrize("meta", ["[1]", "null", '"x"'])
def test_meta_must_be_an_object(tmp_path, meta):
    path = _random_ticket().save(tmp_path / "t.safetensors")
    _rewrite_metadata(path, meta=meta)
    with pytest.raises(TicketFormatError, match="meta must be a JSON object"):
        load_ticket(path)


@pytest.mark.parametrize("version", ["0", "-1", "x"])
def test_bad_format_version(tmp_path, version):
    path = _random_ticket().save(tmp_path / "t.safetensors")
    _rewrite_metadata(path, format_version=version)
    with pytest.raises(TicketFormatError, match="bad format_version"):
        load_ticket(path)


def test_with_arch_does_not_mutate():
    t = Ticket({"fc.weight": torch.ones(10, 64)})
    fitted = t.with_arch("res20s")
    assert fitted is not t and t.arch is None and fitted.arch == "res20s"


def test_inspect_ticket_with_custom_arch(tmp_path):
    from sparse_ops.inspection import inspect_report

    path = Ticket({"fc.weight": torch.ones(2, 2)}, arch="my_own_net").save(
        tmp_path / "o.safetensors"
    )
    assert inspect_report(path)["arch"] == "my_own_net"


def test_arch_must_be_a_name():
    with pytest.raises(TicketMismatchError, match="arch must be a name"):
        Ticket({}, arch=5)


def test_save_to_a_directory(tmp_path):
    with pytest.raises(TicketFormatError, match="is a directory"):
        Ticket({}).save(tmp_path)


def test_sparse_and_meta_masks():
    dense = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert Ticket({"a.weight": dense.to_sparse()}).density == 0.5
    with pytest.raises(TicketMismatchError, match="meta device"):
        Ticket({"a.weight": torch.ones(2, 2, device="meta")})


def test_saved_meta_drops_source_and_records_sparsity(tmp_path):
    t = _random_ticket()
    t.meta["source"] = "/somewhere/else.pth"
    back = load_ticket(t.save(tmp_path / "t.safetensors"))
    assert back.meta["source"] == str(tmp_path / "t.safetensors")
    assert back.meta["sparsity"] == pytest.approx(t.sparsity)


def _tiny_ticket() -> Ticket:
    return Ticket({"fc.weight": torch.tensor([[True, False], [False, True]])})


def test_save_refuses_paths_that_cannot_hold_a_file(tmp_path):
    import os

    from sparse_ops.errors import OutputPathError

    blocker = tmp_path / "results.md"
    blocker.write_text("a file")
    with pytest.raises(OutputPathError, match=r"results.md is a file, not a directory"):
        _tiny_ticket().save(blocker / "sub" / "t.safetensors")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputPathError, match="not a regular file"):
        _tiny_ticket().save(fifo)
    assert not fifo.is_file()  # left as it was
    if os.path.isdir("/proc/self"):  # a folder no one, root included, can create files in
        with pytest.raises(OutputPathError, match=r"/proc/t.safetensors: cannot write"):
            _tiny_ticket().save("/proc/t.safetensors")
    assert not list(tmp_path.glob("**/.t.safetensors.tmp-*"))


def test_saved_files_follow_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = _tiny_ticket().save(tmp_path / "t.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_converted_module_file_is_not_read_as_a_ticket(tmp_path):
    from sparse_ops import convert, save_converted

    ticket = Ticket({}, None, "res20s")
    path = save_converted(convert(models.create("res20s").eval(), ticket), tmp_path / "c.st")
    with pytest.raises(TicketFormatError, match="a converted module, not a ticket.*load_converted"):
        load_ticket(path)


def test_saving_under_a_torch_file_name_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"t.pth: written as safetensors"):
        path = _tiny_ticket().save(tmp_path / "t.pth")
    assert load_ticket(path).masks.keys() == {"fc.weight"}  # read by content
