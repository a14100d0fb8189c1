"""Review of convert(tune=...): the timing cache's keys and entries, the cached network
verdict, and packs kept between calls after load_state_dict."""

from __future__ import annotations

import json

import torch
from test_convert_tune import FakeTimes, _convert, _model, _ticket

from sparse_ops.convert import TuneOptions
from sparse_ops.convert import tune as tune_module
from sparse_ops.nn import GroupSparseConv2d
from sparse_ops.structure import RegroupConfig


def _options(tmp_path) -> TuneOptions:
    return TuneOptions(
        warmup=1,
        min_repeats=1,
        max_repeats=1,
        site_budget_s=0,
        network_repeats=1,
        cache=tmp_path / "cache.json",
    )


def test_network_cache_key_tells_apart_networks_with_the_same_choices(monkeypatch, tmp_path):
    """Two conversions whose every site keeps the same label but whose units differ
    (another regroup configuration here; two tickets alike up to their blocks the same)
    must not share the whole-network timing: the second network is slower and must be
    checked, not handed the first one's verdict."""
    model = _model()
    ticket = _ticket(model, "random")
    times = {"tuned": 1.0, "folded": 2.0, "narrow": 2.0}
    fake = FakeTimes(
        lambda label, unit: 0.5 if label == "regroup" else 1.0, lambda name, module: times[name]
    )
    monkeypatch.setattr(tune_module, "time_interleaved", fake)
    _, first = _convert(model, ticket, _options(tmp_path), regroup=RegroupConfig(parts=1))
    times["tuned"] = 9.0
    _, second = _convert(model, ticket, _options(tmp_path), regroup=RegroupConfig(parts=1, t1=3.0))
    # Each site's fastest label (its choice before the network check) is the same in both.
    fastest = [
        {
            n: min(t["times_ms"], key=t["times_ms"].get)
            for n, t in r.notes["tuning"]["sites"].items()
        }
        for r in (first, second)
    ]
    assert fastest[0] == fastest[1]
    network = second.notes["tuning"]["network"]
    assert not network["cached"]
    assert network["fallbacks"]  # measured 9 ms against 2: layers went back


def test_a_cached_network_verdict_keeps_its_warning(monkeypatch, tmp_path):
    model = _model()
    ticket = _ticket(model, "regroup")
    fake = FakeTimes(
        lambda label, unit: 0.5 if label == "group" else 1.0,
        lambda name, module: 10.0 if name == "tuned" else 1.0,
    )
    monkeypatch.setattr(tune_module, "time_interleaved", fake)
    _, first = _convert(model, ticket, _options(tmp_path))
    _, second = _convert(model, ticket, _options(tmp_path))
    assert second.notes["tuning"]["network"]["cached"]
    assert second.notes["tuning"]["network"]["slower_than_baseline"]
    assert "WARNING" in first.render() and "WARNING" in second.render()


def test_a_malformed_cache_entry_is_only_slower(monkeypatch, tmp_path):
    """The cache is a file anyone may edit (or an older writer may have left): entries
    that are not numbers are timed again, not a crash."""
    model = _model()
    ticket = _ticket(model, "regroup")
    fake = FakeTimes(lambda label, unit: 0.5 if label == "group" else 1.0)
    monkeypatch.setattr(tune_module, "time_interleaved", fake)
    _convert(model, ticket, _options(tmp_path))
    path = tmp_path / "cache.json"
    data = json.loads(path.read_text())
    for key, value in data["entries"].items():
        if "times_ms" in value:  # the network's entry
            value["times_ms"] = {name: "slow" for name in value["times_ms"]}
            value["fallbacks"] = ["not", "a", "dict"]
        else:
            data["entries"][key] = {label: None for label in value}
    path.write_text(json.dumps(data))
    _, report = _convert(model, ticket, _options(tmp_path))
    record = report.notes["tuning"]
    assert record["cache_hits"] == 0 and not record["network"]["cached"]
    assert "tuned on" in report.render()


def test_leftover_pack_follows_load_state_dict():
    """A regrouped unit keeps its packs between calls; load_state_dict (in-place copies)
    must reach both, the leftover pack (no bias) included."""
    model = _model()
    ticket = _ticket(model, "random")
    fast = __import__("sparse_ops").convert(
        model, ticket, device="cpu", on_unstructured="regroup", regroup=RegroupConfig(parts=1)
    )
    unit = next(m for m in fast.modules() if isinstance(m, GroupSparseConv2d) and m.has_leftover)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unit.in_channels, 8, 8, generator=g)
    with torch.no_grad():
        unit(x)  # packs built and kept
        state = {k: v.clone() for k, v in unit.state_dict().items()}
        for key in ("left_values", "main_values"):
            state[key] = state[key] * 2
        unit.load_state_dict(state)
        fresh = GroupSparseConv2d(unit.pack("main"), relu=unit.relu, leftover=unit.pack("left"))
        torch.testing.assert_close(unit(x), fresh(x), rtol=1e-5, atol=1e-5)
