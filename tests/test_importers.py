"""Importing checkpoints exactly as each origin code writes them, and every bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from origin_formats import (
    PrunedModelLike,
    open_lth_level,
    structure_lth_resume,
    structure_lth_run,
    structure_lth_targets,
)
from torch import nn
from torch.nn.utils import prune

from sparse_ops import Ticket, TicketFormatError, TicketMismatchError, imp, load_ticket, models
from sparse_ops.exporters import save_open_lth_level, save_structure_lth, to_prune_state

# ---------------------------------------------------------------- Structure-LTH


@pytest.fixture(scope="module")
def slth_res20s(tmp_path_factory):
    directory = tmp_path_factory.mktemp("slth")
    torch.manual_seed(1)
    ckpt = structure_lth_run("res20s", 4, directory)
    return directory, ckpt


def test_structure_lth_checkpoint_keeps_trained_and_rewind(slth_res20s):
    directory, ckpt = slth_res20s
    t = load_ticket(directory / "4checkpoint.pth.tar", arch="res20s")
    assert t.meta["source_format"] == "structure-lth"
    assert t.meta["state"] == 4 and t.meta["best_sa"] == 91.25
    sd = ckpt["state_dict"]
    # masks are exactly their weight_mask buffers; stem and fc are not pruned
    pruned = sorted(k[: -len("_mask")] for k in sd if k.endswith("weight_mask"))
    assert sorted(t.masks) == pruned and "conv1.weight" not in t.masks
    for name in pruned:
        assert torch.equal(t.masks[name], sd[name + "_mask"].bool())
        assert torch.equal(t.weights[name], sd[name + "_orig"])  # unmasked values kept
        assert torch.equal(t.rewind[name], ckpt["init_weight"][name])
    assert t.density == pytest.approx(0.8**4, abs=1e-4)
    assert torch.equal(t.weights["fc.weight"], sd["fc.weight"])


def test_structure_lth_round_zero_is_dense(slth_res20s):
    directory, _ = slth_res20s
    t = load_ticket(directory / "0checkpoint.pth.tar", arch="res20s")
    assert t.masks == {} and t.density == 1.0
    assert t.rewind is not None


def test_structure_lth_vgg_stem_is_pruned(tmp_path):
    # Exclusion by the literal name 'conv1' misses VGG's stem features.0.
    ckpt = structure_lth_run("vgg16_bn", 1, tmp_path)
    t = load_ticket(tmp_path / "1checkpoint.pth.tar", arch="vgg16_bn")
    assert "features.0.weight" in t.masks
    assert len(t.masks) == 13
    assert torch.equal(t.weights["features.0.bias"], ckpt["state_dict"]["features.0.bias"])


def test_structure_lth_res18_downsample_pruned(tmp_path):
    structure_lth_run("res18", 1, tmp_path)
    t = load_ticket(tmp_path / "1checkpoint.pth.tar", arch="res18")
    assert "layer2.0.downsample.0.weight" in t.masks
    assert t.density == pytest.approx(0.8, abs=1e-4)


def test_structure_lth_with_numpy_scalars_loads(slth_res20s, tmp_path):
    _, ckpt = slth_res20s
    ckpt = dict(ckpt, best_sa=np.float64(91.5), result={"ta": np.array([1.0, 2.0])})
    torch.save(ckpt, tmp_path / "np.pth.tar")
    t = load_ticket(tmp_path / "np.pth.tar")
    assert t.meta["source_format"] == "structure-lth"


def test_dataparallel_prefix_stripped(slth_res20s, tmp_path):
    _, ckpt = slth_res20s
    wrapped = dict(ckpt, state_dict={"module." + k: v for k, v in ckpt["state_dict"].items()})
    torch.save(wrapped, tmp_path / "dp.pth.tar")
    t = load_ticket(tmp_path / "dp.pth.tar", arch="res20s")
    assert t.meta["stripped_prefix"] == "module."
    assert "layer1.0.conv1.weight" in t.masks


def test_legacy_torch_serialisation(slth_res20s, tmp_path):
    _, ckpt = slth_res20s
    torch.save(ckpt["state_dict"], tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    t = load_ticket(tmp_path / "legacy.pth", arch="res20s")
    assert t.meta["source_format"] == "torch-prune"
    assert t.density == pytest.approx(0.8**4, abs=1e-4)


# ---------------------------------------------------------------- torch.nn.utils.prune


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 17, 3), nn.ReLU(), nn.Conv2d(17, 33, 1))
        self.head = nn.Linear(33, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _user_pruned() -> UserNet:
    net = UserNet()
    prune.l1_unstructured(net.features[0], "weight", amount=0.3)
    prune.random_unstructured(net.features[2], "weight", amount=0.5)
    prune.ln_structured(net.head, "weight", amount=0.4, n=2, dim=0)
    return net


def test_user_prune_state_dict_file(tmp_path):
    net = _user_pruned()
    torch.save(net.state_dict(), tmp_path / "user.pt")
    t = load_ticket(tmp_path / "user.pt")
    assert t.meta["source_format"] == "torch-prune"
    assert set(t.masks) == {"features.0.weight", "features.2.weight", "head.weight"}
    assert torch.equal(t.masks["head.weight"], net.head.weight_mask.bool())
    assert t.stats()["head.weight"].structure == "channel"
    t.check_fits(UserNet())


def test_live_module_with_prune_hooks():
    net = _user_pruned()
    t = load_ticket(net)
    assert t.meta["source_format"] == "module-prune"
    assert torch.equal(t.weights["features.2.weight"], net.features[2].weight_orig.detach())
    x = torch.randn(2, 3, 9, 9)
    clean = UserNet()
    clean.load_state_dict(t.masked_weights())
    torch.testing.assert_close(clean(x), net(x))


def test_prune_pair_without_mask_rejected():
    state = {"c.weight_orig": torch.ones(2, 2), "c.bias": torch.ones(2)}
    state["d.weight_orig"] = torch.ones(2, 2)
    state["d.weight_mask"] = torch.ones(2, 2)
    with pytest.raises(TicketFormatError, match="'c.weight_orig' has no matching 'c.weight_mask'"):
        load_ticket(state)


def test_buffers_ending_in_mask_are_not_prune_pairs():
    state = {
        "attn_mask": torch.ones(2, 2),
        "d.weight_orig": torch.ones(2, 2),
        "d.weight_mask": torch.ones(2, 2),
    }
    t = load_ticket(state)
    assert list(t.masks) == ["d.weight"] and "attn_mask" in t.weights


def test_bias_and_conv1d_masks_are_folded_into_weights():
    conv1d = nn.Conv1d(2, 3, 3)
    lin = nn.Linear(4, 3)
    model = nn.Sequential(conv1d, nn.Flatten(), lin)
    prune.l1_unstructured(lin, "weight", amount=0.5)
    prune.l1_unstructured(lin, "bias", amount=0.34)
    prune.l1_unstructured(conv1d, "weight", amount=0.5)
    t = load_ticket(model)
    assert list(t.masks) == ["2.weight"]
    assert sorted(t.meta["folded_masks"]) == ["0.weight", "2.bias"]
    torch.testing.assert_close(t.weights["2.bias"], lin.bias.detach())
    torch.testing.assert_close(t.weights["0.weight"], conv1d.weight.detach())


# ---------------------------------------------------------------- open_lth / E-LTH


@pytest.fixture(scope="module")
def open_lth_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("open_lth") / "lottery_abc" / "replicate_1"
    torch.manual_seed(2)
    main = open_lth_level("cifar_resnet_20", 3, root)
    return root, main


def test_open_lth_level_directory(open_lth_run):
    _, main = open_lth_run
    mask = torch.load(main / "mask.pth", weights_only=True)
    t = load_ticket(main, arch="cifar_resnet_20")
    assert t.meta["source_format"] == "open-lth-level"
    assert set(t.masks) == set(mask)  # every conv and fc, stem included
    assert "conv.weight" in t.masks and "fc.weight" in t.masks
    assert "blocks.3.shortcut.0.weight" in t.masks
    for k in mask:
        assert torch.equal(t.masks[k], mask[k].bool())
    rewind = torch.load(main / "model_ep0_it0.pth", weights_only=True)
    trained = torch.load(main / "model_ep160_it0.pth", weights_only=True)
    assert all(torch.equal(t.rewind[k], rewind[k]) for k in rewind)
    assert all(torch.equal(t.weights[k], trained[k]) for k in trained)
    assert t.meta["rewind_file"] == "model_ep0_it0.pth"
    assert t.meta["weights_file"] == "model_ep160_it0.pth"
    report = t.meta["sparsity_report"]
    assert t.density == pytest.approx(report["unpruned"] / report["total"])
    assert t.density == pytest.approx(report["sparsity_ratio"])


def test_open_lth_level_dir_without_main_and_mask_file(open_lth_run):
    root, main = open_lth_run
    a = load_ticket(root / "level_3")
    b = load_ticket(main / "mask.pth")
    assert a.masks.keys() == b.masks.keys()
    assert b.meta["source_format"] == "open-lth-level"


def test_open_lth_replicate_dir_asks_for_a_level(open_lth_run):
    root, _ = open_lth_run
    with pytest.raises(TicketFormatError, match=r"replicate directory \(levels: level_3\)"):
        load_ticket(root)


def test_open_lth_checkpoint(open_lth_run):
    _, main = open_lth_run
    t = load_ticket(main / "checkpoint.pth", arch="cifar_resnet_20")
    level = load_ticket(main, arch="cifar_resnet_20")
    assert t.meta["source_format"] == "open-lth-checkpoint"
    assert t.meta["ep"] == 160
    assert t.masks.keys() == level.masks.keys()
    assert all(torch.equal(t.masks[k], level.masks[k]) for k in t.masks)
    assert all(torch.equal(t.weights[k], level.weights[k]) for k in level.weights)


def test_open_lth_checkpoint_key_naming():
    # The naming rule itself: PrunedModel's buffers are mask_<a___b___weight>.
    net = models.create("cifar_resnet_20")
    mask = {"blocks.3.shortcut.0.weight": torch.ones(32, 16, 1, 1, dtype=torch.int32)}
    sd = PrunedModelLike(net, mask).state_dict()
    assert "mask_blocks___3___shortcut___0___weight" in sd and "model.conv.weight" in sd
    t = load_ticket({"ep": 1, "it": 0, "model_state_dict": sd, "logger": ""})
    assert list(t.masks) == ["blocks.3.shortcut.0.weight"]
    t.check_fits("cifar_resnet_20")


def test_open_lth_checkpoint_from_dataparallel(open_lth_run):
    _, main = open_lth_run
    ckpt = torch.load(main / "checkpoint.pth", weights_only=True)
    ckpt["model_state_dict"] = {"module." + k: v for k, v in ckpt["model_state_dict"].items()}
    t = load_ticket(ckpt, arch="cifar_resnet_20")
    assert "fc.weight" in t.masks


def test_open_lth_vgg_ignoring_fc(tmp_path):
    main = open_lth_level("cifar_vgg_11", 2, tmp_path, ignore=("fc.weight",))
    t = load_ticket(main, arch="cifar_vgg_11")
    assert bool(t.masks["fc.weight"].all())  # present in mask.pth, all ones
    assert t.stats()["fc.weight"].structure == "dense"
    assert t.stats()["layers.10.conv.weight"].density < 1


def test_open_lth_imagenet_resnet_under_model_prefix(tmp_path):
    main = open_lth_level("imagenet_resnet_18", 1, tmp_path, num_classes=1000)
    t = load_ticket(main)
    assert "model.conv1.weight" in t.masks
    exact = load_ticket(main, arch="imagenet_resnet_18")
    assert exact.masks.keys() == t.masks.keys()
    tv = load_ticket(main, arch="resnet18")  # torchvision names
    assert "conv1.weight" in tv.masks and "layer4.1.conv2.weight" in tv.masks
    assert tv.arch == "resnet18"


def test_open_lth_single_model_file_is_the_start_point(tmp_path, open_lth_run):
    _, main = open_lth_run
    d = tmp_path / "level"
    d.mkdir()
    (d / "mask.pth").write_bytes((main / "mask.pth").read_bytes())
    (d / "model_ep0_it0.pth").write_bytes((main / "model_ep0_it0.pth").read_bytes())
    t = load_ticket(d)
    assert t.weights is None and t.rewind is not None


# ---------------------------------------------------------------- zeros, mask dicts


def test_plain_state_dict_zeros_define_mask(tmp_path, slth_res20s):
    _, ckpt = slth_res20s
    ref = load_ticket(ckpt)
    torch.save(ref.masked_weights(), tmp_path / "zeros.pth")
    t = load_ticket(tmp_path / "zeros.pth", arch="res20s")
    assert t.meta["source_format"] == "zeros"
    assert t.masks.keys() == ref.masks.keys()
    assert all(torch.equal(t.masks[k], ref.masks[k]) for k in t.masks)
    assert "conv1.weight" in t.meta["unpruned_layers"] and "fc.weight" in t.meta["unpruned_layers"]


def test_safetensors_state_dict_zeros(tmp_path):
    from safetensors.torch import save_file

    net = UserNet()
    with torch.no_grad():
        net.features[2].weight[:5] = 0
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "w.safetensors")
    t = load_ticket(tmp_path / "w.safetensors")
    assert t.meta["source_format"] == "zeros"
    assert list(t.masks) == ["features.2.weight"]
    assert t.stats()["features.2.weight"].empty_out == 5


def test_bare_mask_dict(tmp_path):
    torch.save({"a.weight": torch.tensor([[1, 0], [0, 1]], dtype=torch.int32)}, tmp_path / "m.pth")
    t = load_ticket(tmp_path / "m.pth")
    assert t.meta["source_format"] == "mask-dict" and t.weights is None
    assert t.density == 0.5


# ---------------------------------------------------------------- exporters


def test_to_prune_state_matches_torch_prune(slth_res20s):
    _, ckpt = slth_res20s
    t = load_ticket(ckpt)
    exported = to_prune_state(t)
    assert exported.keys() == ckpt["state_dict"].keys()
    assert all(torch.equal(exported[k], ckpt["state_dict"][k]) for k in exported)


def test_structure_lth_export_round_trip(tmp_path, slth_res20s):
    _, ckpt = slth_res20s
    t = load_ticket(ckpt, arch="res20s")
    back = load_ticket(save_structure_lth(t, tmp_path / "x.pth.tar", state=4), arch="res20s")
    for section in ("masks", "weights", "rewind"):
        a, b = getattr(t, section), getattr(back, section)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and it loads into a model the way their scripts do (prune keys in state_dict)
    model = models.create("res20s")
    for module, name in structure_lth_targets(model):
        prune.identity(module, name)
    model.load_state_dict(torch.load(tmp_path / "x.pth.tar", weights_only=True)["state_dict"])


def _our_imp_ticket(arch: str, state: int = 2, meta: dict | None = None) -> Ticket:
    """A ticket the way our IMP leaves it: stem and Linear unmasked, the rest pruned."""
    torch.manual_seed(3)
    model = models.create(arch)
    rewind = imp.capture_state(model)
    trained = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in rewind.items()
    }
    names = imp.prunable(model)
    masks = imp.magnitude_masks(trained, imp.current_masks(model, names), 0.5)
    return Ticket(masks, trained, arch, dict(meta or {}, round=state), rewind=rewind)


@pytest.mark.parametrize(("arch", "stem"), [("res20s", "conv1"), ("vgg16_bn", "features.0")])
def test_structure_lth_export_resumes_in_their_loader(tmp_path, arch, stem):
    ticket = _our_imp_ticket(arch)
    assert f"{stem}.weight" not in ticket.masks  # our IMP excludes the stem
    path = save_structure_lth(ticket, tmp_path / "2checkpoint.pth.tar", epoch=7)
    got = structure_lth_resume(path, arch)  # KeyError / load_state_dict error if incomplete
    assert got["state"] == 2 and got["epoch"] == 7
    expected = {
        n
        for n, m in models.create(arch).named_modules()
        if isinstance(m, nn.Conv2d) and n != "conv1"
    }
    assert set(got["masks"]) == {f"{n}.weight" for n in expected}
    for name, mask in got["masks"].items():
        want = ticket.masks.get(name, torch.ones(mask.shape, dtype=torch.bool))
        assert torch.equal(mask.bool(), want), name
    # the schedule sits at the checkpoint's epoch, with the default recipe's lr
    assert got["scheduler"].last_epoch == 7
    assert got["optimizer"].param_groups[0]["lr"] == pytest.approx(0.1)
    assert got["optimizer"].state_dict()["state"] == {}
    # rewound to init_weight
    for key, value in got["model"].state_dict().items():
        torch.testing.assert_close(value, ticket.rewind[key], rtol=0, atol=0)
    # and back here: the all-ones masks added for their loader are not ticket masks
    back = load_ticket(path, arch=arch)
    assert back.masks.keys() == ticket.masks.keys()
    assert all(torch.equal(back.masks[k], ticket.masks[k]) for k in ticket.masks)
    assert back.density == pytest.approx(ticket.density)


@pytest.mark.parametrize(("epoch", "lr"), [(0, 0.05), (5, 0.005), (9, 0.0005)])
def test_structure_lth_export_takes_our_recipe(tmp_path, epoch, lr):
    train = {
        "lr": 0.05,
        "momentum": 0.8,
        "weight_decay": 5e-4,
        "epochs": 10,
        "milestones": [0.5, 0.75],
        "gamma": 0.1,
    }
    ticket = _our_imp_ticket("res20s", meta={"train": train})
    path = save_structure_lth(ticket, tmp_path / "c.pth.tar", epoch=epoch)
    group = structure_lth_resume(path, "res20s")["optimizer"].param_groups[0]
    assert group["lr"] == pytest.approx(lr)
    assert (group["momentum"], group["weight_decay"]) == (0.8, 5e-4)


@pytest.mark.parametrize("layer", ["conv1.weight", "fc.weight"])
def test_structure_lth_export_refuses_masks_their_loader_drops(tmp_path, layer):
    ticket = _our_imp_ticket("res20s")
    mask = torch.ones_like(ticket.weights[layer], dtype=torch.bool)
    mask.view(-1)[0] = False
    ticket.masks[layer] = mask
    with pytest.raises(TicketMismatchError, match=f"masks '{layer}'"):
        save_structure_lth(ticket, tmp_path / "x.pth.tar")


def test_open_lth_export_matches_open_lth_layout(tmp_path, open_lth_run):
    _, main = open_lth_run
    t = load_ticket(main, arch="cifar_resnet_20")
    out = save_open_lth_level(t, tmp_path / "level_3" / "main")
    for name in ("mask.pth", "model_ep0_it0.pth", "model_ep160_it0.pth"):
        ours = torch.load(out / name, weights_only=True)
        theirs = torch.load(main / name, weights_only=True)
        assert ours.keys() == theirs.keys(), name
        for k in ours:
            assert ours[k].dtype == theirs[k].dtype, (name, k)
            assert torch.equal(ours[k], theirs[k]), (name, k)


def test_open_lth_export_fills_unpruned_layers(tmp_path, slth_res20s):
    _, ckpt = slth_res20s
    t = load_ticket(ckpt, arch="res20s")
    out = save_open_lth_level(t, tmp_path / "lvl")
    mask = torch.load(out / "mask.pth", weights_only=True)
    assert mask["conv1.weight"].dtype == torch.int32 and bool(mask["conv1.weight"].all())
    assert "fc.weight" in mask and len(mask) == len(t.masks) + 2


def test_open_lth_export_needs_a_start_point(tmp_path):
    t = Ticket({"fc.weight": torch.ones(2, 2)}, {"fc.weight": torch.ones(2, 2)})
    with pytest.raises(TicketMismatchError, match="no rewind weights.*start='weights'"):
        save_open_lth_level(t, tmp_path / "x")
    out = save_open_lth_level(t, tmp_path / "y", start="weights")
    assert load_ticket(out).rewind is not None


# ---------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(TicketFormatError, match="no such file or directory"):
        load_ticket(tmp_path / "nope.pth")


def test_unknown_format_lists_recognised(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"hello, this is not a checkpoint at all")
    with pytest.raises(
        TicketFormatError, match="unrecognised file format.*Structure-LTH.*open_lth"
    ):
        load_ticket(tmp_path / "x.bin")


def test_empty_file(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(TicketFormatError, match="unrecognised file format"):
        load_ticket(tmp_path / "empty.pth")


def test_truncated_torch_file(tmp_path, slth_res20s):
    directory, _ = slth_res20s
    raw = (directory / "4checkpoint.pth.tar").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TicketFormatError, match="cut.pth: truncated or corrupt torch file"):
        load_ticket(tmp_path / "cut.pth")


def test_truncated_safetensors(tmp_path):
    path = Ticket({"fc.weight": torch.ones(40, 40)}, {"fc.weight": torch.ones(40, 40)}).save(
        tmp_path / "t.safetensors"
    )
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(TicketFormatError, match="truncated or corrupt safetensors"):
        load_ticket(path)


class Payload:
    """A class whose unpickling would run code."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_needing_code_refused(tmp_path, capsys):
    torch.save({"state_dict": {"a.weight": torch.ones(2, 2)}, "evil": Payload()}, tmp_path / "e.pt")
    with pytest.raises(TicketFormatError, match="refusing to load.*builtins.print"):
        load_ticket(tmp_path / "e.pt")
    assert "must never run" not in capsys.readouterr().out


def test_custom_class_refused_naming_it(tmp_path):
    torch.save({"model": UserNet()}, tmp_path / "whole_model.pt")
    with pytest.raises(TicketFormatError, match=r"refusing to load.*test_importers\.UserNet"):
        load_ticket(tmp_path / "whole_model.pt")


def test_plain_pickle_refused(tmp_path):
    with open(tmp_path / "p.pkl", "wb") as f:
        pickle.dump({"a.weight": [[1.0]]}, f)
    with pytest.raises(TicketFormatError, match="plain Python pickle"):
        load_ticket(tmp_path / "p.pkl")


def test_unrecognised_dict_lists_its_keys(tmp_path):
    torch.save({"net": {"w": torch.ones(1)}, "acc": 0.5}, tmp_path / "odd.pt")
    with pytest.raises(
        TicketFormatError, match="unrecognised checkpoint dict with keys 'net', 'acc'"
    ):
        load_ticket(tmp_path / "odd.pt")


def test_non_dict_checkpoint(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(TicketFormatError, match="holds a list"):
        load_ticket(tmp_path / "list.pt")


def test_not_a_ticket_directory(tmp_path):
    with pytest.raises(TicketFormatError, match="not a ticket directory"):
        load_ticket(tmp_path)


def test_non_binary_mask_in_prune_checkpoint(tmp_path):
    state = {"c.weight_orig": torch.ones(2, 2), "c.weight_mask": torch.tensor([[1.0, 0.3], [0, 1]])}
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(TicketMismatchError, match=r"m\.pt: mask 'c\.weight'.*other than 0/1"):
        load_ticket(tmp_path / "m.pt")


def test_nan_weights_in_checkpoint(tmp_path, slth_res20s):
    _, ckpt = slth_res20s
    sd = dict(ckpt["state_dict"])
    sd["layer1.0.conv1.weight_orig"] = sd["layer1.0.conv1.weight_orig"].clone()
    sd["layer1.0.conv1.weight_orig"][0, 0, 0, 0] = float("nan")
    torch.save(dict(ckpt, state_dict=sd), tmp_path / "nan.pth.tar")
    with pytest.raises(
        TicketMismatchError, match="nan.pth.tar: weights tensor 'layer1.0.conv1.weight'"
    ):
        load_ticket(tmp_path / "nan.pth.tar")


def test_wrong_architecture_lists_keys(slth_res20s):
    directory, _ = slth_res20s
    with pytest.raises(TicketMismatchError) as err:
        load_ticket(directory / "4checkpoint.pth.tar", arch="res56s")
    msg = str(err.value)
    assert "4checkpoint.pth.tar: ticket does not fit res56s" in msg
    assert "missing: 'layer1.3.conv1.weight'" in msg


def test_open_lth_ticket_against_structure_lth_arch(open_lth_run):
    _, main = open_lth_run
    with pytest.raises(
        TicketMismatchError, match="not conv/linear weights of res20s: 'conv.weight'"
    ):
        load_ticket(main, arch="res20s")


def test_corrupt_sparsity_report(tmp_path, open_lth_run):
    _, main = open_lth_run
    d = tmp_path / "lvl"
    d.mkdir()
    (d / "mask.pth").write_bytes((main / "mask.pth").read_bytes())
    (d / "sparsity_report.json").write_text("{oops")
    with pytest.raises(TicketFormatError, match="sparsity_report.json: not valid JSON"):
        load_ticket(d)


# ---------------------------------------------------------------- found in review


def test_structure_lth_mask_file_reads_as_masks(tmp_path):
    # extract_mask(model.state_dict()) keeps the *_mask keys only
    m = (torch.rand(16, 16, 3, 3) < 0.5).float()
    torch.save({"layer1.0.conv1.weight_mask": m}, tmp_path / "mask.pt")
    t = load_ticket(tmp_path / "mask.pt")
    assert t.meta["source_format"] == "mask-dict"
    assert torch.equal(t.masks["layer1.0.conv1.weight"], m.bool())


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32])
def test_non_binary_mask_file_is_reported(tmp_path, dtype):
    bad = (torch.rand(16, 16, 3, 3) < 0.5).to(dtype)
    bad[3, 2, 1, 0] = 2 if dtype == torch.int32 else 0.5
    torch.save({"c.weight": bad}, tmp_path / "mask.pth")
    with pytest.raises(TicketMismatchError, match="'c.weight'.*other than 0/1"):
        load_ticket(tmp_path / "mask.pth")


@pytest.mark.parametrize("obj", [{"state_dict": {}}, {"model_state_dict": {}}, {}])
def test_empty_containers_are_refused(obj):
    with pytest.raises(TicketFormatError):
        load_ticket(obj)


def test_empty_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({}, tmp_path / "empty.safetensors")
    with pytest.raises(TicketFormatError, match="holds no tensors"):
        load_ticket(tmp_path / "empty.safetensors")


def test_truncated_zip_prefix(tmp_path, slth_res20s):
    directory, _ = slth_res20s
    raw = (directory / "4checkpoint.pth.tar").read_bytes()
    (tmp_path / "c.pt").write_bytes(raw[:5000])
    with pytest.raises(TicketFormatError, match="truncated or corrupt"):
        load_ticket(tmp_path / "c.pt")


def test_damaged_legacy_file(tmp_path):
    torch.save(
        {"a.weight": torch.randn(8, 8)}, tmp_path / "l.pt", _use_new_zipfile_serialization=False
    )
    raw = (tmp_path / "l.pt").read_bytes()
    (tmp_path / "l.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TicketFormatError, match="l.pt"):
        load_ticket(tmp_path / "l.pt")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_legacy_files_of_every_pickle_protocol(tmp_path, protocol):
    sd = {"a.weight": torch.tensor([[0.0, 1.5], [2.0, 0.0]])}
    path = tmp_path / f"p{protocol}.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    if protocol <= 3:
        t = load_ticket(path)
        assert t.meta["source_format"] == "zeros" and t.density == 0.5
    else:  # torch's weights-only unpickler does not speak protocol 4's FRAME opcode
        with pytest.raises(TicketFormatError, match="pickle_protocol ≥ 4.*re-save"):
            load_ticket(path)


def test_unreadable_file(tmp_path):
    with pytest.raises(TicketFormatError, match="cannot read"):
        load_ticket("/proc/self/mem")


def test_torchscript_archive(tmp_path):
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "ts.pt")
    with pytest.raises(TicketFormatError, match="TorchScript archive"):
        load_ticket(tmp_path / "ts.pt")


def test_object_array_is_refused_naming_object(tmp_path):
    torch.save(
        {"state_dict": {"a.weight": torch.ones(1, 1)}, "junk": np.array([object()], dtype=object)},
        tmp_path / "o.pt",
    )
    with pytest.raises(TicketFormatError, match="it pickles builtins.object,"):
        load_ticket(tmp_path / "o.pt")


def test_numpy_integer_epoch_kept(slth_res20s):
    _, ckpt = slth_res20s
    t = load_ticket(dict(ckpt, epoch=np.int64(77)))
    assert t.meta["epoch"] == 77 and isinstance(t.meta["epoch"], int)


def test_other_training_code_with_mask_token_is_not_open_lth():
    sd = {"mask_token": torch.zeros(1, 4), "encoder.weight": torch.tensor([[0.0, 1.0]])}
    t = load_ticket({"model_state_dict": sd})
    assert list(t.masks) == ["encoder.weight"] and "mask_token" in t.weights


def test_replicate_dir_lists_levels_numerically(tmp_path):
    for level in (2, 10, 9):
        (tmp_path / f"level_{level}" / "main").mkdir(parents=True)
    with pytest.raises(
        TicketFormatError,
        match=r"levels: level_2, level_9, level_10\); pass one level, e.g. .*level_10",
    ):
        load_ticket(tmp_path)


def test_fp8_weights_are_checked(tmp_path):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    w = torch.tensor([[0.0, 1.0], [2.0, 0.5]]).to(torch.float8_e4m3fn)
    t = load_ticket({"fc.weight": w})
    assert t.density == 0.75


def test_weight_norm_model_can_be_checked():
    """A parametrized weight (weight_norm) is still the maskable ``0.weight``: a mask of
    its shape fits, one of another shape or name is refused, naming it."""
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 2)))
    Ticket({"0.weight": torch.ones(2, 3)}).check_fits(model)  # must not raise
    with pytest.raises(TicketMismatchError, match=r"0\.weight \(3, 2\) vs \(2, 3\)"):
        Ticket({"0.weight": torch.ones(3, 2)}).check_fits(model)
    with pytest.raises(TicketMismatchError, match=r"not conv/linear weights.*'0\.other'"):
        Ticket({"0.other": torch.ones(2, 3)}).check_fits(model)


def test_open_lth_export_of_an_empty_ticket(tmp_path):
    with pytest.raises(TicketMismatchError, match="nothing to export"):
        save_open_lth_level(Ticket({}), tmp_path / "x")


def test_structure_lth_export_keeps_meta_numbers(tmp_path, slth_res20s):
    _, ckpt = slth_res20s
    t = load_ticket(ckpt)
    saved = torch.load(save_structure_lth(t, tmp_path / "s.pth.tar"), weights_only=True)
    assert saved["epoch"] == ckpt["epoch"] and saved["best_sa"] == ckpt["best_sa"]
    assert saved["state"] == ckpt["state"]
    mask = saved["state_dict"]["layer1.0.conv1.weight_mask"]
    assert mask.dtype == ckpt["state_dict"]["layer1.0.conv1.weight_orig"].dtype
