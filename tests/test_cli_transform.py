"""``sparse-ops transform``: elastic stretch/squeeze from the command line."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_ops import Ticket, load_ticket, models
from sparse_ops.cli import main


def _ticket(arch: str, seed: int = 0) -> Ticket:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    weights = models.create(arch).state_dict()
    masks = {
        k: torch.rand(v.shape, generator=g) < 0.3
        for k, v in weights.items()
        if k.endswith("conv1.weight") or k.endswith("conv2.weight")
    }
    return Ticket(masks, weights, arch, {"method": "refill"})


@pytest.fixture()
def res32s_file(tmp_path):
    return _ticket("res32s").save(tmp_path / "res32s.safetensors")


def test_transform_json_defaults_from_to_the_tickets_arch(res32s_file, tmp_path, capsys):
    out = tmp_path / "res56s.safetensors"
    assert main(["transform", str(res32s_file), "--to", "res56s", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source_arch"] == "res32s" and report["target_arch"] == "res56s"
    assert report["strategy"] == "interpolate"
    assert report["mapping"] == ["0:0;1:1,2;2:3,4;3:5,6;4:7,8"] * 3
    assert report["stages"][0]["sources"] == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert report["output"] == str(out) and report["random_extra"] is False
    source, result = load_ticket(res32s_file), load_ticket(out)
    assert result.arch == "res56s"
    for key, src_key in [
        ("layer2.6.conv1.weight", "layer2.3.conv1.weight"),
        ("layer3.8.bn2.running_var", "layer3.4.bn2.running_var"),
    ]:
        assert torch.equal(result.weights[key], source.weights[src_key])


def test_transform_text_output_for_a_squeeze(tmp_path, capsys):
    src = _ticket("cifar_resnet_56").save(tmp_path / "c56.safetensors")
    out = tmp_path / "c32.safetensors"
    argv = [
        "transform",
        str(src),
        "--from",
        "cifar_resnet_56",
        "--to",
        "cifar_resnet_32",
        "--mapping",
        "drop-interleaved",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "elastic cifar_resnet_56 → cifar_resnet_32 (drop-interleaved)" in text
    assert "0:0;1:1;3:2;5:3;7:4" in text and "squeeze" in text
    assert "blocks.6.conv1.weight" in text  # per-layer table: target 6 = stage 1, block 1
    assert f"written to {out}" in text
    assert load_ticket(out).arch == "cifar_resnet_32"


def test_transform_random_extra_is_seeded(res32s_file, tmp_path, capsys):
    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}.safetensors"
        argv = [
            "transform",
            str(res32s_file),
            "--to",
            "res56s",
            "--random-extra",
            "--seed",
            "5",
            "-o",
            str(out),
            "--json",
        ]
        assert main(argv) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["random_extra"] is True and report["seed"] == 5
        outs.append(load_ticket(out))
    assert all(torch.equal(outs[0].masks[k], outs[1].masks[k]) for k in outs[0].masks)
    source = load_ticket(res32s_file)
    assert not torch.equal(
        outs[0].masks["layer1.2.conv1.weight"], source.masks["layer1.1.conv1.weight"]
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--to", "res56s", "--mapping", "0:0;1:1,2;2"], "cannot parse block mapping"),
        (["--to", "res56s", "--mapping", "0:0;1:1,2;2:3,4"], "blocks 5, 6, 7, 8 not covered"),
        (["--to", "res56s", "--seed", "3"], "--seed only applies with --random-extra"),
        (["--to", "cifar_resnet_56"], "different families"),
        (["--from", "res20s", "--to", "res56s"], "does not fit res20s"),
        (["--to", "res_56"], "unknown architecture 'res_56'"),
    ],
)
def test_transform_bad_input_exits_2(res32s_file, tmp_path, capsys, extra, message):
    out = tmp_path / "never.safetensors"
    assert main(["transform", str(res32s_file), *extra, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparse-ops: error:") and message in err
    assert not out.exists()


def test_transform_needs_from_without_an_arch(tmp_path, capsys):
    ticket = _ticket("res20s")
    path = Ticket(ticket.masks, ticket.weights).save(tmp_path / "anon.safetensors")
    out = tmp_path / "o.safetensors"
    assert main(["transform", str(path), "--to", "res32s", "-o", str(out)]) == 2
    assert "pass --from" in capsys.readouterr().err
    assert main(["transform", str(path), "--from", "res20s", "--to", "res32s", "-o", str(out)]) == 0
    assert load_ticket(out).arch == "res32s"
