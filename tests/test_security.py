"""Untrusted files: loading never runs code, memory stays bounded, every bad file gets a
SparseOpsError naming the file and the field (docs/SECURITY.md)."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from model_cases import trained_like
from safetensors.torch import load_file, save_file
from test_convert import FAST_REGROUP, _ticket

from sparse_ops import Ticket, checkpoint_io, load_ticket
from sparse_ops.convert import SaveError, convert, load_converted, save_converted
from sparse_ops.errors import SparseOpsError, TicketFormatError, printable

ROOT = Path(__file__).resolve().parents[1]
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))

# res20s: channel units with bias maps, Relayout, getattr(shape), Linear (converted for
# the CPU: its narrowest layouts need a Relayout at each option-A shortcut, where the GPU's
# aligned ones are full and keep F.pad); its random ticket regrouped: group units with
# leftover packs; mobilenet: depthwise TorchConv2d units.
SOURCES = {
    "channel": ("res20s", "refill", "error", "cpu"),
    "group": ("res20s", "random", "regroup", None),
    "depthwise": ("mobilenet", "refill", "error", None),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name → (path, reference output of the module that was saved)."""
    folder = tmp_path_factory.mktemp("converted")
    files = {}
    for name, (arch, kind, policy, device) in SOURCES.items():
        torch.manual_seed(0)
        model = trained_like(arch)
        fast = convert(
            model,
            _ticket(model, arch, kind),
            on_unstructured=policy,
            regroup=FAST_REGROUP,
            input_size=(3, 32, 32),
            device=device,
        )
        path = save_converted(fast, folder / f"{name}.safetensors")
        with torch.no_grad():
            files[name] = (path, fast(X))
    return files


def _parts(path: Path):
    tensors = load_file(str(path))
    _, metadata = checkpoint_io.read_safetensors(path)
    return tensors, metadata, json.loads(metadata["graph"]), json.loads(metadata["modules"])


def _write(path: Path, tensors, metadata, graph=None, modules=None) -> Path:
    metadata = dict(metadata)
    if graph is not None:
        metadata["graph"] = json.dumps(graph)
    if modules is not None:
        metadata["modules"] = json.dumps(modules)
    save_file(tensors, str(path), metadata=metadata)
    return path


# ---------------------------------------------------------------- crafted graphs
#
# Each payload, had fx pasted it into the source it generates, would create MARKER (at
# load time or on the first forward). All must be refused at load, and nothing may run.


def _dotless(text: str) -> str:
    """An expression for ``text`` without dots: module paths are split at dots."""
    return "+".join(f"chr({ord(c)})" for c in text)


def _payloads(marker: Path) -> list[tuple[str, object]]:
    touch = f'open({_dotless(str(marker))},"w")'
    return [
        ("placeholder target", lambda g, m: g[0].update(target=f"x={touch}")),
        ("placeholder target call", lambda g, m: g[0].update(target=f"x=({touch})")),
        ("placeholder shadowing torch", lambda g, m: g[0].update(target="torch")),
        ("placeholder named self", lambda g, m: g[0].update(target="self")),
        ("node name", lambda g, m: g[1].update(name=f"a=({touch})")),
        ("module kwarg key", lambda g, m: g[1].update(kwargs={"dict": {f"z={touch},w": None}})),
        (
            "function kwarg key",
            lambda g, m: _on_function(
                g, "F.", lambda e: e.update(kwargs={"dict": {f"z={touch},w": None}})
            ),
        ),
        (
            "module target",
            lambda g, m: _rename_module(g, m, f'conv1")({touch})or getattr(self,"conv1'),
        ),
        ("module target keyword", lambda g, m: _rename_module(g, m, "conv1.import")),
        ("module target dunder", lambda g, m: _rename_module(g, m, "__class__")),
        ("module target shadowing forward", lambda g, m: _rename_module(g, m, "forward")),
        (
            "get_attr target",
            lambda g, m: _insert_get_attr(g, m, f'a")or({touch})or getattr(self,"b'),
        ),
        ("get_attr target dunder", lambda g, m: _insert_get_attr(g, m, "fc.__class__")),
        ("getattr __class__", lambda g, m: _getattr_chain(g, ["__class__"])),
        (
            "getattr chain to globals",
            lambda g, m: _getattr_chain(g, ["__class__", "__init__", "__globals__"]),
        ),
        ("getattr non-identifier", lambda g, m: _getattr_chain(g, [f"x;{touch}"])),
        (
            "getattr three args",
            lambda g, m: _on_getattr(g, lambda e: e["args"]["tuple"].append(None)),
        ),
        (
            "function os.system",
            lambda g, m: _on_function(g, lambda e: e.update(target="os.system")),
        ),
        (
            "function builtins.eval",
            lambda g, m: _on_function(
                g, lambda e: e.update(target="builtins.eval", args={"tuple": [touch]})
            ),
        ),
        (
            "function builtins.exec",
            lambda g, m: _on_function(g, lambda e: e.update(target="builtins.exec")),
        ),
        (
            "function as a list",
            lambda g, m: _on_function(g, lambda e: e.update(target=["operator", "add"])),
        ),
        (
            "method __reduce_ex__",
            lambda g, m: g[-2].update(op="call_method", target="__reduce_ex__"),
        ),
        (
            "method with a dotted name",
            lambda g, m: g[-2].update(op="call_method", target="numpy.tofile"),
        ),
        (
            "dtype payload",
            lambda g, m: _on_function(
                g, lambda e: e["args"]["tuple"].append({"dtype": "__class__"})
            ),
        ),
        ("module type", lambda g, m: m["fc"].update(type="os.system")),
        ("module type path", lambda g, m: m["fc"].update(type="torch.nn.modules.Module")),
        ("op kind", lambda g, m: g[1].update(op="call_module_code")),
        ("placeholder default node", lambda g, m: g[0].update(args={"tuple": [{"node": "x"}]})),
        ("output not last", lambda g, m: g.insert(1, copy.deepcopy(g[-1]))),
    ]


def _insert_get_attr(graph, modules, target):
    graph.insert(
        1,
        {
            "op": "get_attr",
            "name": "t",
            "target": target,
            "args": {"tuple": []},
            "kwargs": {"dict": {}},
        },
    )
    modules["<attrs>"] = target  # the tensor the node reads is added to the file too


def _on_function(graph, prefix, change=None):
    """Apply ``change`` to the first call of a function whose name starts with ``prefix``
    (fx prints operator calls as ``a + b``, dropping keywords: those need ``F.``)."""
    if change is None:
        prefix, change = "", prefix
    change(next(e for e in graph if e["op"] == "call_function" and e["target"].startswith(prefix)))


def _on_getattr(graph, change):
    change(next(e for e in graph if e["target"] == "builtins.getattr"))


def _getattr_chain(graph, attributes):
    previous = graph[0]["name"]
    for i, attribute in enumerate(attributes):
        graph.insert(
            1 + i,
            {
                "op": "call_function",
                "name": f"chain{i}",
                "target": "builtins.getattr",
                "args": {"tuple": [{"node": previous}, attribute]},
                "kwargs": {"dict": {}},
            },
        )
        previous = f"chain{i}"


def _rename_module(graph, modules, new):
    old = graph[1]["target"]
    modules[new] = modules.pop(old)
    graph[1]["target"] = new
    modules["<rename>"] = (old, new)  # its tensors move too


def _apply(case, marker, tensors, graph, modules):
    dict(_payloads(marker))[case](graph, modules)
    if "<attrs>" in modules:
        tensors[f"attrs/{modules.pop('<attrs>')}"] = torch.zeros(1)
    if "<rename>" in modules:
        old, new = modules.pop("<rename>")
        for key in [k for k in tensors if k.startswith(f"modules/{old}/")]:
            tensors[f"modules/{new}/" + key[len(f"modules/{old}/") :]] = tensors.pop(key)


CRAFTED = [name for name, _ in _payloads(Path("/m"))]


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_graphs_are_refused_and_run_nothing(case, converted, tmp_path):
    marker = tmp_path / "marker"
    path, reference = converted["channel"]
    load_converted(path)  # imports whatever loading imports, before the snapshot
    tensors, metadata, graph, modules = _parts(path)
    _apply(case, marker, tensors, graph, modules)
    crafted = _write(tmp_path / "crafted.safetensors", tensors, metadata, graph, modules)
    environ, sys_path, modules_before = dict(os.environ), list(sys.path), set(sys.modules)
    with pytest.raises(SaveError, match=r"crafted\.safetensors: .+") as info:
        load_converted(crafted)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    assert dict(os.environ) == environ and sys.path == sys_path
    assert set(sys.modules) == modules_before
    # the untouched file still loads and computes what was saved
    with torch.no_grad():
        torch.testing.assert_close(load_converted(path)(X), reference, rtol=0, atol=0)


def test_an_honest_file_loads_with_names_fx_chose(converted):
    path, reference = converted["channel"]
    module = load_converted(path)
    assert next(iter(module.graph.nodes)).op == "placeholder"
    assert "def forward(self, x)" in module.code
    with torch.no_grad():
        assert torch.equal(module(X), reference)


# ---------------------------------------------------------------- tampered files

BAD_VALUES = [
    None,
    -1,
    0,
    1 << 40,
    "x",
    [],
    [1],
    [1, 2, 3],
    [-1, -1],
    [1 << 40, 1],
    1.5,
    {"a": 1},
    True,
]
UNIT_TYPES = {
    "channel": ["ChannelPrunedConv2d", "Relayout", "Linear"],
    "group": ["GroupSparseConv2d"],
    "depthwise": ["TorchConv2d"],
}
TYPE_CASES = [(f, t) for f, types in UNIT_TYPES.items() for t in types]


def _check_refused_or_right(path: Path, reference: torch.Tensor, label: str) -> str | None:
    """None if ``path`` is refused with a SparseOpsError or computes ``reference``."""
    try:
        module = load_converted(path)
    except SparseOpsError as exc:
        text = str(exc)
        return None if text.startswith(str(path)) and "\n" not in text else f"{label}: {text!r}"
    except Exception as exc:  # what this test exists to find
        return f"{label}: raw {type(exc).__name__}: {exc}"
    try:
        with torch.no_grad():
            out = module(X)
    except SparseOpsError:
        return None
    except Exception as exc:
        return f"{label}: loads, then forward raises raw {type(exc).__name__}: {exc}"
    if not torch.equal(out, reference):
        return f"{label}: loads and computes something else"
    return None


def _first_of(modules: dict, kind: str) -> str:
    return next(k for k, v in modules.items() if v["type"] == kind)


@pytest.mark.parametrize(("source", "kind"), TYPE_CASES)
def test_tampered_config_values(source, kind, converted, tmp_path):
    path, reference = converted[source]
    tensors, metadata, _, modules = _parts(path)
    target = _first_of(modules, kind)
    config = modules[target]["config"]
    encoded = "dict" in config  # torch modules' configs are wrapped like graph arguments
    keys = list(config["dict"] if encoded else config)
    failures, cases = [], 0
    for key in keys:
        for value in ["<delete>", *BAD_VALUES]:
            changed = copy.deepcopy(modules)
            fields = changed[target]["config"]["dict"] if encoded else changed[target]["config"]
            if value == "<delete>":
                del fields[key]
            else:
                fields[key] = value
            file = _write(tmp_path / "t.safetensors", tensors, metadata, modules=changed)
            cases += 1
            failure = _check_refused_or_right(file, reference, f"{target}.{key} = {value!r}")
            if failure:
                failures.append(failure)
    assert cases == len(keys) * (len(BAD_VALUES) + 1) and keys
    assert not failures, "\n".join(failures)


def _tensor_mutations(t: torch.Tensor):
    yield "deleted", None
    yield "empty", t.new_empty((0,) * t.dim())
    yield "one more element", torch.cat([t.flatten(), t.flatten()[:1]]) if t.numel() else t
    yield "one more dimension", t.unsqueeze(0)
    yield (
        "as int32" if t.dtype.is_floating_point else "as float32",
        (t.to(torch.int32) if t.dtype.is_floating_point else t.to(torch.float32)),
    )
    if not t.dtype.is_floating_point and t.numel():
        for label, value in [("huge", 1 << 30), ("negative", -5), ("past the end", None)]:
            bad = t.clone()
            bad.flatten()[-1] = int(t.max()) + 1000 if value is None else value
            yield f"{label} index", bad
        yield "as int64", t.to(torch.int64)
    if t.dtype.is_floating_point and t.dim() >= 1 and t.shape[0] > 1:
        yield "first row dropped", t[1:].clone()


@pytest.mark.parametrize(("source", "kind"), TYPE_CASES)
def test_tampered_tensors(source, kind, converted, tmp_path):
    path, reference = converted[source]
    tensors, metadata, _, modules = _parts(path)
    target = _first_of(modules, kind)
    prefix = f"modules/{target}/"
    failures, cases = [], 0
    for key in [k for k in tensors if k.startswith(prefix)]:
        for label, value in _tensor_mutations(tensors[key]):
            changed = dict(tensors)
            if value is None:
                del changed[key]
            else:
                changed[key] = value.contiguous()
            file = _write(tmp_path / "t.safetensors", changed, metadata)
            cases += 1
            failure = _check_refused_or_right(file, reference, f"{key} {label}")
            if failure:
                failures.append(failure)
    assert cases >= 5
    assert not failures, "\n".join(failures)


def _graph_mutations(graph):
    yield "a middle node deleted", graph[:3] + graph[4:]
    yield "output deleted", graph[:-1]
    yield "empty graph", []
    yield "not a list", {"op": "output"}
    yield "a node that is a list", [[1, 2], *graph[1:]]
    yield (
        "a node without args",
        [graph[0], {k: v for k, v in graph[1].items() if k != "args"}, *graph[2:]],
    )
    yield (
        "a reference to a later node",
        [graph[0], dict(graph[1], args={"tuple": [{"node": graph[-2]["name"]}]}), *graph[2:]],
    )
    yield (
        "two encodings in one",
        [graph[0], dict(graph[1], args={"tuple": [{"node": "x", "float": "nan"}]}), *graph[2:]],
    )
    yield "an unknown encoding", [graph[0], dict(graph[1], args={"set": [1]}), *graph[2:]]
    yield (
        "a bad slice",
        [
            dict(e, args={"tuple": [{"node": e["args"]["tuple"][0]["node"]}, {"slice": [1, "a"]}]})
            if e["target"] == "operator.getitem"
            else e
            for e in graph
        ],
    )
    yield "a repeated name", [graph[0], dict(graph[1], name="x"), *graph[2:]]
    yield "an unknown kwarg", [graph[0], dict(graph[1], kwargs={"dict": {"bogus": 1}}), *graph[2:]]
    yield "deep nesting", [graph[0], dict(graph[1], args=_nested(200)), *graph[2:]]
    yield (
        "huge int",
        [
            e
            if e["target"] != "flatten"
            else dict(e, args={"tuple": [e["args"]["tuple"][0], 1 << 62]})
            for e in graph
        ],
    )
    yield "a module call to a tensor", [graph[0], dict(graph[1], target="nothing"), *graph[2:]]
    yield (
        "getattr of weight",
        [
            dict(e, args={"tuple": [e["args"]["tuple"][0], "weight"]})
            if e["target"] == "builtins.getattr"
            else e
            for e in graph
        ],
    )


def _nested(depth):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def test_tampered_graph_and_metadata(converted, tmp_path):
    path, reference = converted["channel"]
    tensors, metadata, graph, modules = _parts(path)
    failures = []
    cases = [
        (f"graph: {label}", dict(metadata, graph=json.dumps(g)))
        for label, g in _graph_mutations(graph)
    ]
    for key in ("graph", "modules", "format_version", "format"):
        cases.append((f"{key} deleted", {k: v for k, v in metadata.items() if k != key}))
        cases.append((f"{key} not JSON", dict(metadata, **{key: "{"})))
        cases.append((f"{key} a JSON list", dict(metadata, **{key: "[]"})))
    cases.append(("graph nested 100000 deep", dict(metadata, graph="[" * 100000 + "]" * 100000)))
    cases.append(("modules not objects", dict(metadata, modules=json.dumps({"fc": 1}))))
    cases.append(
        (
            "module without a type",
            dict(
                metadata,
                modules=json.dumps({k: {"config": v["config"]} for k, v in modules.items()}),
            ),
        )
    )
    cases.append(
        (
            "a module missing",
            dict(metadata, modules=json.dumps({k: v for k, v in modules.items() if k != "fc"})),
        )
    )
    for label, changed in cases:
        file = _write(tmp_path / "t.safetensors", tensors, changed)
        failure = _check_refused_or_right(file, reference, label)
        if failure:
            failures.append(failure)
    assert len(cases) > 25
    assert not failures, "\n".join(failures)


def test_relayout_index_past_the_input_is_refused_not_gathered(converted, tmp_path):
    path, _ = converted["channel"]
    tensors, metadata, _, modules = _parts(path)
    key = f"modules/{_first_of(modules, 'Relayout')}/index"
    tensors[key] = tensors[key].clone()
    tensors[key][0] = 999
    module = load_converted(_write(tmp_path / "r.safetensors", tensors, metadata))
    with torch.no_grad(), pytest.raises(SparseOpsError, match="reads channel 999"):
        module(X)


# ---------------------------------------------------------------- resource bounds

_MEMORY_PROBE = textwrap.dedent("""
    import json, os, resource, sys
    import torch
    from sparse_ops import load_converted, load_ticket
    from sparse_ops.errors import SparseOpsError
    loader = load_converted if sys.argv[2] == "converted" else load_ticket
    try:
        loader(sys.argv[3])  # an honest file of the same kind: imports, lazy inits
    except SparseOpsError:
        pass
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        loader(sys.argv[1])
        outcome = "loaded"
    except SparseOpsError as exc:
        outcome = "refused: " + str(exc)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"outcome": outcome, "grew": peak - before}))
""")


def _peak_growth(path: Path, kind: str, honest: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(path), kind, str(honest)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _bomb_budget(path: Path) -> int:
    return 2 * path.stat().st_size + (200 << 20)


def _converted_bombs(converted, tmp_path):
    path, _ = converted["channel"]
    tensors, metadata, _, modules = _parts(path)
    unit = next(k for k, v in modules.items() if f"modules/{k}/bias_map" in tensors)
    # input_hw sized the bias map computed at load: 7 KB of JSON could ask for gigabytes
    big = copy.deepcopy(modules)
    big[unit]["config"]["input_hw"] = [16384, 16384]
    yield "input_hw", _write(tmp_path / "hw.safetensors", tensors, metadata, modules=big)
    no_map = {k: v for k, v in tensors.items() if k != f"modules/{unit}/bias_map"}
    yield (
        "input_hw without bias_map",
        _write(tmp_path / "hw2.safetensors", no_map, metadata, modules=big),
    )
    huge = copy.deepcopy(modules)
    huge["fc"]["config"]["dict"].update(in_features=1 << 20, out_features=1 << 20)
    yield "Linear sizes", _write(tmp_path / "fc.safetensors", tensors, metadata, modules=huge)


def test_converted_bombs_stay_within_memory_budget(converted, tmp_path):
    honest, _ = converted["channel"]
    for label, bomb in _converted_bombs(converted, tmp_path):
        result = _peak_growth(bomb, "converted", honest)
        assert result["grew"] <= _bomb_budget(bomb), (label, result)
        assert result["outcome"].startswith("refused"), (label, result)


def _zip_bomb(path: Path, inflated: int) -> Path:
    """A torch.save archive whose one tensor entry is ``inflated`` deflated zero bytes."""
    honest = path.with_suffix(".honest.pth")
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3)}, honest)
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(honest) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                with out.open(info.filename, "w", force_zip64=True) as w:
                    for _ in range(inflated // len(chunk)):
                        w.write(chunk)
            else:
                out.writestr(info.filename, src.read(info))
    return path


def test_zip_bomb_is_refused_before_inflating(tmp_path):
    bomb = _zip_bomb(tmp_path / "bomb.pth", 512 << 20)
    assert bomb.stat().st_size < 2 << 20
    honest = tmp_path / "honest.pth"
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3)}, honest)
    result = _peak_growth(bomb, "ticket", honest)
    assert result["outcome"].startswith("refused") and "uncompressed" in result["outcome"]
    assert result["grew"] <= _bomb_budget(bomb), result


def test_legacy_file_declaring_more_than_it_holds_is_refused_before_allocating(tmp_path):
    full = tmp_path / "full.pth"
    torch.save({"conv.weight": torch.empty(32 << 20)}, full, _use_new_zipfile_serialization=False)
    bomb = tmp_path / "legacy.pth"
    bomb.write_bytes(full.read_bytes()[:4096])  # the pickles, without the 128 MB of data
    full.unlink()
    honest = tmp_path / "honest.pth"
    torch.save(
        {"conv.weight": torch.zeros(4, 3, 3, 3)}, honest, _use_new_zipfile_serialization=False
    )
    result = _peak_growth(bomb, "ticket", honest)
    assert (
        result["outcome"].startswith("refused")
        and "storages declare 134,217,728 bytes" in (result["outcome"])
    )
    assert result["grew"] <= _bomb_budget(bomb), result


def test_a_damaged_byte_fails_the_crc_check(tmp_path):
    weight = torch.arange(64, dtype=torch.float32).view(4, 16) * (torch.arange(16) % 3 > 0)
    path = tmp_path / "state.pth"
    torch.save({"fc.weight": weight}, path)
    assert torch.equal(load_ticket(path).weights["fc.weight"], weight)
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    with open(path, "r+b") as f:  # the entry's data follows its local header
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        f.seek(info.header_offset + 30 + name_len + extra_len + 8)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(TicketFormatError, match=r"state\.pth: zip entry .*data/0.* CRC"):
        load_ticket(path)


# ---------------------------------------------------------------- special files


def _specials(tmp_path: Path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    yield "FIFO", fifo
    yield "device", Path("/dev/zero")


@pytest.mark.parametrize(
    "loader",
    [
        load_ticket,
        load_converted,
        checkpoint_io.sniff,
        checkpoint_io.load_torch,
        checkpoint_io.read_safetensors,
    ],
)
def test_special_files_are_refused_before_open(loader, tmp_path):
    for kind, path in _specials(tmp_path):
        with pytest.raises(SparseOpsError, match=f"{kind}, not a checkpoint file"):
            loader(path)
    if loader is not load_ticket:  # a folder is an open_lth level for load_ticket
        with pytest.raises(SparseOpsError, match="a directory, not a checkpoint file"):
            loader(tmp_path)


def _cli(*argv, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "sparse_ops", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_cli_inspect_of_a_fifo_exits_2_with_one_line(tmp_path):
    fifo = tmp_path / "ticket.pth"
    os.mkfifo(fifo)
    result = _cli("inspect", str(fifo), timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "a FIFO, not a checkpoint file" in result.stderr


def test_names_from_files_are_printed_escaped(tmp_path, capsys):
    from sparse_ops.cli import main

    arch = "evil\x1b[2J\nfake: line\u202e"
    masks = {"conv.weight": torch.rand(4, 3, 3, 3) > 0.5}
    path = Ticket(masks, None, arch).save(tmp_path / "t.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out
    assert "evil\\x1b[2J\\nfake: line\\u202e" in out
    odd = tmp_path / "bad\nname\x07.pth"
    odd.write_bytes(b"not a checkpoint")
    assert main(["inspect", str(odd)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x07" not in err and "bad\\nname\\x07.pth" in err


def test_printable_escapes_only_what_a_terminal_would_act_on():
    assert printable("layer1.0.conv1 × 3 → é") == "layer1.0.conv1 × 3 → é"
    assert printable("a\nb\tc\x1b\x7f\u200b") == "a\\nb\\tc\\x1b\\x7f\\u200b"


# ---------------------------------------------------------------- writing


_SLOW_WRITER = textwrap.dedent("""
    import sys, time, torch
    import safetensors.torch
    from sparse_ops import checkpoint_io
    real = safetensors.torch.save_file
    def slow(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        print("written", flush=True)
        time.sleep(120)
    safetensors.torch.save_file = slow
    checkpoint_io.write_safetensors(sys.argv[1], {"w": torch.zeros(1000)}, {})
""")


def _start_slow_write(target: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, str(target)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert process.stdout.readline().strip() == "written"
    temp = target.with_name(f".{target.name}.sparse-ops-tmp-{process.pid}")
    assert temp.is_file()
    return process


def test_sigterm_mid_write_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out.safetensors"
    process = _start_slow_write(target)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == -signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_killed_writers_temp_file_is_named_and_removed_by_the_next_write(tmp_path):
    target = tmp_path / "out.safetensors"
    process = _start_slow_write(target)
    process.kill()
    process.wait(timeout=60)
    stale = f".out.safetensors.sparse-ops-tmp-{process.pid}"
    assert [p.name for p in tmp_path.iterdir()] == [stale]
    live = tmp_path / f".out.safetensors.sparse-ops-tmp-{os.getppid()}"  # a running writer
    live.write_bytes(b"")
    checkpoint_io.write_safetensors(target, {"w": torch.ones(3)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "out.safetensors"])
    torch.testing.assert_close(load_file(str(target))["w"], torch.ones(3))


def test_text_outputs_are_written_atomically(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    checkpoint_io.write_text(target, "old\n")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(SparseOpsError, match="summary.json: cannot write"):
        checkpoint_io.write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    assert stat.S_IMODE(target.stat().st_mode) & 0o044  # not left private like a temp file


def test_every_writer_uses_the_shared_atomic_helper():
    """No module writes an output file by itself: everything goes through atomic_output."""
    # output_files is the helper itself; checkpoint_io's error messages quote torch.save(...)
    helpers = ("checkpoint_io.py", "output_files.py")
    offenders = []
    for folder in ("sparse_ops", "bench"):
        for file in (ROOT / folder).rglob("*.py"):
            text = file.read_text()
            for needle in (
                r"(?<!checkpoint_io)\.write_text\(",
                r"\.savefig\((?!tmp)",
                r"json\.dump\((?!obj, sys\.stdout)",
                r"torch\.save\((?!obj, tmp)",
            ):
                if re.search(needle, text) and file.name not in helpers:
                    offenders.append(f"{file.relative_to(ROOT)}: {needle}")
    assert not offenders, offenders
