"""The ``sparse-ops`` command: output, JSON shape, and exit status 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from origin_formats import open_lth_level, structure_lth_run
from torch import nn

from sparse_ops import models
from sparse_ops.cli import main


@pytest.fixture(scope="module")
def slth_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("slth_cli")
    torch.manual_seed(3)
    ckpt = structure_lth_run("res20s", 4, directory)
    return directory / "4checkpoint.pth.tar", ckpt


def _expected_sparsity(ckpt) -> float:
    masks = [v for k, v in ckpt["state_dict"].items() if k.endswith("weight_mask")]
    return 1 - sum(float(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def test_inspect_prints_global_sparsity(slth_checkpoint, capsys):
    path, ckpt = slth_checkpoint
    assert main(["inspect", str(path), "--arch", "res20s"]) == 0
    out = capsys.readouterr().out
    expected = _expected_sparsity(ckpt)
    assert abs(expected - 0.5904) < 1e-3  # 4 rounds of 20%
    assert f"sparsity {100 * expected:.2f}%" in out
    assert "over 18 masked layers" in out
    assert "layer3.2.conv2.weight" in out and "64×64×3×3" in out
    assert "unpruned conv/linear weights: conv1.weight, fc.weight" in out
    assert "arch     res20s" in out


def test_inspect_json(slth_checkpoint, capsys):
    path, ckpt = slth_checkpoint
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["global_density"] == pytest.approx(1 - _expected_sparsity(ckpt))
    assert len(report["layers"]) == 18
    layer = report["layers"][0]
    assert {"name", "shape", "density", "structure"} <= set(layer)
    assert layer["shape"] == [16, 16, 3, 3] and layer["structure"] == "unstructured"
    assert report["source_format"] == "structure-lth"


def test_inspect_open_lth_directory(tmp_path, capsys):
    main_dir = open_lth_level("cifar_resnet_20", 2, tmp_path)
    assert main(["inspect", str(main_dir), "--arch", "cifar_resnet_20", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source_format"] == "open-lth-level"
    assert report["global_density"] == pytest.approx(0.64, abs=1e-3)
    assert report["unpruned_layers"] == []


def test_inspect_dense_checkpoint(tmp_path, capsys):
    torch.save(models.create("res20s").state_dict(), tmp_path / "dense.pth")
    assert main(["inspect", str(tmp_path / "dense.pth")]) == 0
    assert "no masked layers: the checkpoint is dense" in capsys.readouterr().out


def test_models_table_and_json(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "res20s" in out and "269,722" in out and "cifar_vgg_16" in out
    assert main(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    by_name = {m["name"]: m for m in listing["models"]}
    assert set(by_name) == set(models.names())
    assert by_name["res56s"]["params"] == 853_018
    assert by_name["resnet50"]["params"] == 25_557_032
    assert "cifar_resnet_{N}" in listing["patterns"]


def _words(command: str) -> list[str]:
    return command.split()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["inspect", "{missing}"], "no such file or directory"),
        (["inspect", "{garbage}"], "unrecognised file format"),
        (["inspect", "{ckpt}", "--arch", "res20"], "unknown architecture 'res20'; did you mean"),
        (["inspect", "{ckpt}", "--arch", "res56s"], "ticket does not fit res56s"),
        (
            _words("restructure {ckpt} --method refill --criterion saliency -o {garbage}.t"),
            "--criterion saliency ranks channels by activations: pass --data",
        ),
        (
            _words("convert {ckpt} --arch res20s --on-unstructured dense -o {garbage}/x.st"),
            "garbage.pt is a file, not a directory",
        ),
        (
            _words("convert {ckpt} --arch res20s --on-unstructured dense -o {tmp}"),
            "is a directory; give a file name",
        ),
        (["inspect", "{converted}"], "a converted module, not a ticket"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, fragment, slth_checkpoint, tmp_path, capsys):
    path, _ = slth_checkpoint
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    subs = {
        "{missing}": str(tmp_path / "missing.pt"),
        "{garbage}": str(garbage),
        "{ckpt}": str(path),
        "{tmp}": str(tmp_path),
        "{converted}": str(tmp_path / "converted.safetensors"),
    }
    if "{converted}" in argv:
        from sparse_ops import Ticket, convert, save_converted

        dense = convert(models.create("res20s").eval(), Ticket({}, None, "res20s"))
        save_converted(dense, subs["{converted}"])
    argv = [subs.get(a, a).replace("{garbage}", str(garbage)) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith("sparse-ops: error: ") and fragment in err
    assert "\n" not in err and "Traceback" not in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["inspect"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_demo_quick_runs_the_whole_pipeline_and_checks_itself(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--quick", "--device", "cpu", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] is True
    assert set(summary["imp"]) == {"refill", "regroup"}
    for method, check in summary["conversion"].items():
        assert check["same_predictions"] and check["max_abs_diff"] < 1e-3, method
        assert check["accuracy_converted"] == check["accuracy_masked"]
        assert check["flops_ratio"] < 1.0
    assert "channel" in summary["conversion"]["refill"]["representations"]
    assert "group" in summary["conversion"]["regroup"]["representations"]
    for rows in summary["latency"].values():
        assert {r["provider"] for r in rows} == {"dense", "folded", "masked", "narrow", "ours"}
        assert all(r["status"] == "ok" and r["samples_ms"] for r in rows)
    for name in (
        "summary.json",
        "results.md",
        "accuracy.png",
        "latency.png",
        "res20s_refill.safetensors",
        "res20s_regroup_converted.safetensors",
    ):
        assert (out / name).is_file(), name
    results = (out / "results.md").read_text()
    assert "ours vs dense" in results and "regroup sparsity" in results
    for method, rounds in summary["imp"].items():  # the sparsest round within 1 point
        win = summary["winning"][method]
        best = max(
            (r for r in rounds if r["accuracy"] >= rounds[0]["accuracy"] - 1.0),
            key=lambda r: r["sparsity"],
        )
        assert win == {k: best[k] for k in ("round", "sparsity", "accuracy")}, method
        assert f"- {method}: round {win['round']}, " in results


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "sparse_ops", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith("sparse-ops ")


def test_output_folder_that_cannot_be_created(capsys):
    assert main(["demo", "--out", "/dev/null/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparse-ops: error: /dev/null/x") and "\n" not in err


def test_broken_pipe_is_quiet():
    result = subprocess.run(
        f"{sys.executable} -m sparse_ops models | head -1",
        shell=True,
        capture_output=True,
        text=True,
    )
    assert result.stdout.startswith("name") and "Traceback" not in result.stderr


# ---------------------------------------------------------------- prune / restructure


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prune")
    argv = [
        "prune",
        "--arch",
        "res20s",
        "--data",
        "synthetic",
        "--image-size",
        "8",
        "--rounds",
        "2",
        "--epochs",
        "1",
        "--post",
        "regroup",
        "--out",
        str(out),
        "--json",
    ]
    return out, argv


def test_prune_json_rounds_and_tickets(pruned_run, capsys):
    out, argv = pruned_run
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["density"] == 1.0
    assert all({"round", "density", "accuracy", "imp_density"} <= set(r) for r in rounds)
    assert rounds[1]["imp_density"] == pytest.approx(0.8, abs=1e-3)
    assert summary["post"] == "regroup" and summary["final"]["round"] == 2
    from sparse_ops import load_ticket

    ticket = load_ticket(out / "round2.safetensors")
    assert ticket.arch == "res20s" and ticket.meta["method"] == "regroup"
    assert ticket.density == pytest.approx(rounds[2]["density"])
    assert (out / "summary.json").is_file()


def test_restructure_refill_plus_json(pruned_run, tmp_path, capsys):
    out, _ = pruned_run
    if not (out / "round1.safetensors").exists():
        pytest.skip("needs the prune run")
    target = tmp_path / "refilled.safetensors"
    argv = [
        "restructure",
        str(out / "round1.safetensors"),
        "--method",
        "refill+",
        "--extra",
        "0.2",
        "--criterion",
        "remain",
        "-o",
        str(target),
        "--json",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "refill+" and summary["params"]["extra"] == 0.2
    assert {layer["status"] for layer in summary["layers"]} <= {"refilled", "empty"}
    assert target.is_file()


def test_restructure_regroup_table(tmp_path, capsys):
    from sparse_ops import Ticket

    masks = {
        f"layer3.{i}.conv{j}.weight": torch.rand(64, 64 if i or j == 2 else 32, 3, 3) < 0.3
        for i in range(3)
        for j in (1, 2)
    }
    src = Ticket(masks).save(tmp_path / "in.safetensors")
    assert (
        main(
            [
                "restructure",
                str(src),
                "--arch",
                "res20s",
                "--method",
                "regroup",
                "--parts",
                "2",
                "-o",
                str(tmp_path / "g.safetensors"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "regrouped" in out and "layer3.2.conv2.weight" in out and "regroup: density" in out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["prune", "--arch", "res20s", "--rate", "1.2", "--out", "{tmp}"], "rate must be in"),
        (["prune", "--arch", "res20s", "--rate", "0", "--out", "{tmp}"], "rate must be in"),
        (
            ["prune", "--arch", "res20s", "--post", "refill", "--t1", "2", "--out", "{tmp}"],
            "options not used by refill: --t1",
        ),
        (
            ["prune", "--arch", "res20s", "--parts", "4", "--out", "{tmp}"],
            "--parts need a post-processing method",
        ),
        (
            [
                "prune",
                "--arch",
                "res20s",
                "--data",
                "cifar10",
                "--data-dir",
                "{tmp}",
                "--out",
                "{tmp}",
            ],
            "missing data_batch_1.bin",
        ),
        (["prune", "--arch", "res21s", "--out", "{tmp}"], "unknown architecture 'res21s'"),
        (
            ["prune", "--arch", "res20s", "--post", "regroup", "--t2", "3", "--out", "{tmp}"],
            "t2 must be in (0, 1] or None",
        ),
    ],
)
def test_prune_bad_input_exits_2(argv, fragment, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and err.count("\n") == 0


def test_restructure_ticket_that_does_not_fit(tmp_path, capsys):
    from sparse_ops import Ticket

    src = Ticket({"layer1.0.conv1.weight": torch.ones(16, 16, 3, 3)}).save(
        tmp_path / "t.safetensors"
    )
    assert (
        main(
            [
                "restructure",
                str(src),
                "--arch",
                "res56s",
                "--method",
                "refill",
                "--criterion",
                "remain",
                "-o",
                str(tmp_path / "o.safetensors"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    bad = Ticket({"layer1.0.conv1.weight": torch.ones(16, 8, 3, 3)}).save(
        tmp_path / "b.safetensors"
    )
    assert (
        main(
            [
                "restructure",
                str(bad),
                "--arch",
                "res20s",
                "--method",
                "refill",
                "-o",
                str(tmp_path / "o2.safetensors"),
            ]
        )
        == 2
    )
    assert "does not fit res20s" in capsys.readouterr().err


def test_convert_command_writes_a_module_equal_to_the_masked_network(
    slth_checkpoint, tmp_path, capsys
):
    from sparse_ops import load_converted, load_ticket, masked_model, structure

    path, _ = slth_checkpoint
    refilled = structure.refill(load_ticket(path, arch="res20s"))
    ticket_path = refilled.save(tmp_path / "refill.safetensors")
    out = tmp_path / "fast.safetensors"
    argv = ["convert", str(ticket_path), "--mode", "channel", "-o", str(out), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["arch"] == "res20s" and summary["mode"] == "channel"
    assert summary["max_abs_diff"] <= 1e-4 * max(1.0, summary["max_abs_output"])
    assert summary["report"]["flops_ratio"] < 1.0
    fast = load_converted(out)
    model = models.create("res20s").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), masked_model(model, refilled)(x), rtol=1e-4, atol=1e-4)

    assert main(["convert", str(ticket_path), "--mode", "channel", "-o", str(out), "--report"]) == 0
    text = capsys.readouterr().out
    assert "layer1.0.conv1" in text and "% of dense FLOPs" in text


def test_convert_command_lists_unstructured_layers(slth_checkpoint, tmp_path, capsys):
    path, _ = slth_checkpoint
    assert main(["convert", str(path), "--arch", "res20s", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparse-ops: error: ") and "unstructured" in err
    assert "layer1.0.conv1" in err and "\n" not in err


def test_a_folder_named_like_a_command_package_is_named_in_the_error(tmp_path, monkeypatch):
    from sparse_ops.cli.arguments import import_advice as _import_advice

    # What `sparse-ops bench --out bench/...` run in a user's folder used to leave behind:
    # a folder without __init__.py, which imports as an empty namespace package.
    (tmp_path / "cmdpkg" / "results").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    advice = _import_advice("cmdpkg")
    assert str(tmp_path / "cmdpkg") in advice and "hides the installed 'cmdpkg'" in advice
    assert "reinstall" in _import_advice("no_such_package_here")


@pytest.mark.parametrize(
    ("drop", "words"),
    [
        (4.72, "4.72 points below dense"),
        (-4.72, "4.72 points above dense"),
        (0.001, "same as dense"),
    ],
)
def test_prune_summary_says_which_side_of_dense(drop, words):
    from sparse_ops.jobs import _versus_dense

    assert _versus_dense(drop) == words


def test_convert_target_prices_auto_mode_for_that_device(slth_checkpoint, tmp_path, capsys):
    from sparse_ops import load_ticket, structure
    from sparse_ops.structure import RegroupConfig

    path, _ = slth_checkpoint
    regrouped = structure.regroup(load_ticket(path, arch="res20s"), RegroupConfig(parts=1))
    ticket_path = regrouped.save(tmp_path / "regroup.safetensors")
    kinds = {}
    for target in ("cuda", "cpu"):
        argv = [
            "convert",
            str(ticket_path),
            "--target",
            target,
            "-o",
            str(tmp_path / f"{target}.safetensors"),
            "--json",
        ]
        assert main(argv) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["target"] == target
        kinds[target] = {row["representation"] for row in summary["report"]["layers"]}
    # Group units pay on the GPU's kernel; on the CPU they lose to dense oneDNN convs.
    assert "group" in kinds["cuda"] and "group" not in kinds["cpu"]


def test_warnings_print_as_one_line(slth_checkpoint, tmp_path, capsys):
    path, _ = slth_checkpoint
    out = tmp_path / "fast.pth"
    argv = ["convert", str(path), "--arch", "res20s", "--on-unstructured", "dense", "-o", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err.strip()
    assert err == (
        f"sparse-ops: warning: {out}: written as safetensors; a .pth name suggests a "
        "torch.save file, which torch.load cannot read this as (sparse-ops reads it "
        "by content)"
    )


def test_prune_ranks_refill_channels_by_activations_on_a_training_batch(tmp_path, capsys):
    argv = [
        "prune",
        "--arch",
        "res20s",
        "--data",
        "synthetic",
        "--image-size",
        "8",
        "--rounds",
        "1",
        "--epochs",
        "1",
        "--post",
        "refill",
        "--criterion",
        "feature_l1",
        "--out",
        str(tmp_path),
        "--json",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["post_options"] == {"criterion": "feature_l1"}
    from sparse_ops import load_ticket

    final = load_ticket(tmp_path / "round1.safetensors")
    assert final.meta["method"] == "refill" and final.sparsity > 0


def test_convert_command_runs_a_vgg16_bn_ticket_with_a_fully_pruned_conv(tmp_path, capsys):
    """Layer collapse: every channel of features.10 is pruned, so the max pool after it
    sees constant channels only. The converter keeps one (its forward used to fail on a
    zero-channel tensor, and the command exited 1 with a traceback)."""
    from sparse_ops import Ticket, load_converted, masked_model

    model = models.create("vgg16_bn").eval()
    generator = torch.Generator().manual_seed(0)
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            rows = torch.rand(module.out_channels, generator=generator) < 0.6
            masks[f"{name}.weight"] = rows.view(-1, 1, 1, 1).expand_as(module.weight).clone()
    masks["features.10.weight"] = torch.zeros_like(masks["features.10.weight"])
    ticket_path = Ticket(masks, arch="vgg16_bn").save(tmp_path / "collapsed.safetensors")
    out = tmp_path / "fast.safetensors"
    argv = [
        "convert",
        str(ticket_path),
        "--mode",
        "channel",
        "--target",
        "cpu",
        "-o",
        str(out),
        "--json",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["max_abs_diff"] <= 1e-4 * max(1.0, summary["max_abs_output"])
    x = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        expected = masked_model(model, Ticket(masks))(x)
        torch.testing.assert_close(load_converted(out)(x), expected, rtol=1e-4, atol=1e-4)
