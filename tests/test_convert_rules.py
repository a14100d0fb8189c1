"""The converter's op rules: one table for conversion and saving, custom-module rules,
and what a saved graph's module paths may be."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_ops import Ticket
from sparse_ops.convert import (
    ConvertError,
    SaveError,
    convert,
    graph_reader,
    graph_writer,
    load_converted,
    masked_model,
    register_module_rule,
    rules,
    save_converted,
    unregister_module_rule,
)


class Swish(nn.Module):
    """A custom elementwise activation the converter cannot know about."""

    def forward(self, x):
        return x * torch.sigmoid(x)


class Net(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 11, 3, padding=1)
        self.act = act
        self.conv2 = nn.Conv2d(11, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.conv2(self.act(self.conv1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _ticket(model: Net) -> Ticket:
    keep = torch.ones(11, dtype=torch.bool)
    keep[::3] = False  # rows 0, 3, 6, 9 of conv1 pruned: constant channels after it
    mask = keep.view(-1, 1, 1, 1).expand_as(model.conv1.weight).clone()
    return Ticket({"conv1.weight": mask})


def _width_into_conv2(module) -> int:
    return int(module.conv2.plan.in_channels)


def test_saved_graph_allowlists_are_the_rules_tables():
    # Both sides of a saved file read the very tables the rules build.
    for side in (graph_writer, graph_reader):
        assert side.FUNCTIONS is rules.FUNCTIONS and side.METHODS is rules.METHODS
        assert side.TORCH_MODULES is rules.TORCH_MODULES
        assert side.FUNCTION_KWARGS is rules.FUNCTION_KWARGS
        assert side.METHOD_KWARGS is rules.METHOD_KWARGS
    assert rules.FUNCTION_KWARGS.keys() == rules.FUNCTIONS.keys()
    assert rules.METHOD_KWARGS.keys() == rules.METHODS
    # Every op a rule converts can be saved: no rule names an op the table lacks.
    for rule in rules.RULES:
        assert set(rule.functions) <= set(rules.FUNCTIONS), rule.kind
        assert set(rule.methods) <= rules.METHODS, rule.kind
        assert set(rule.modules) <= set(rules.TORCH_MODULES), rule.kind


@pytest.mark.parametrize(("rule", "width"), [(None, 7), ("opaque", 11), ("unary", 7)])
def test_a_registered_module_is_kept_whole_and_follows_its_rule(rule, width):
    """Unregistered, torch.fx traces into Swish (x · sigmoid(x): rules it knows, so the
    constant channels narrow away); registered, it stays one module: opaque keeps every
    channel, unary narrows."""
    torch.manual_seed(0)
    model = Net(Swish()).eval()
    ticket = _ticket(model)
    x = torch.randn(2, 3, 9, 9)
    if rule is not None:
        register_module_rule(Swish, rule)
    try:
        fast = convert(model, ticket, device="cpu")
    finally:
        unregister_module_rule(Swish)
    torch.testing.assert_close(fast(x), masked_model(model, ticket)(x), rtol=1e-5, atol=1e-5)
    assert (type(getattr(fast, "act", None)) is Swish) == (rule is not None)
    assert _width_into_conv2(fast) == width  # 4 constant channels became a bias map, or not


def test_a_converted_custom_module_cannot_be_saved(tmp_path):
    register_module_rule(Swish, "opaque")  # kept whole: a module of a type no file names
    try:
        fast = convert(Net(Swish()).eval(), Ticket({}), device="cpu")
    finally:
        unregister_module_rule(Swish)
    assert type(fast.act) is Swish
    with pytest.raises(SaveError, match="act.*Swish"):
        save_converted(fast, tmp_path / "f.safetensors")


class Untraceable(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace into it."""

    def forward(self, x):
        return x if bool(x.sum() > 0) else -x


def test_a_module_fx_cannot_trace_converts_once_registered_opaque():
    model = Net(Untraceable()).eval()
    ticket = _ticket(model)
    _, report = convert(model, ticket, device="cpu", return_report=True)
    assert not report.traced  # fell back to replacing convs in place
    register_module_rule(Untraceable, "opaque")
    try:
        fast, report = convert(model, ticket, device="cpu", return_report=True)
    finally:
        unregister_module_rule(Untraceable)
    assert report.traced
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(fast(x), masked_model(model, ticket)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("module_type", "rule", "words"),
    [
        (int, "unary", "nn.Module subclass"),
        (Swish, "elementwise", "must be one of"),
        (Swish, 3, "a name or a Rule"),
    ],
)
def test_register_module_rule_refuses_bad_arguments(module_type, rule, words):
    with pytest.raises(ConvertError, match=words):
        register_module_rule(module_type, rule)


class HyphenNames(Net):
    """torchvision's RegNet names blocks like ``block1-0``: legal for nn.Module, not for
    the saved graph's paths."""

    def __init__(self):
        super().__init__(nn.ReLU())
        self.add_module("block-0", self.conv2)
        del self.conv2

    def forward(self, x):
        x = getattr(self, "block-0")(self.act(self.conv1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_module_paths_the_loader_refuses_are_renamed_when_saving(tmp_path):
    torch.manual_seed(0)
    model = HyphenNames().eval()
    keep = torch.ones(11, dtype=torch.bool)
    keep[::3] = False
    ticket = Ticket({"conv1.weight": keep.view(-1, 1, 1, 1).expand(11, 3, 3, 3).clone()})
    fast = convert(model, ticket, device="cpu")
    path = save_converted(fast, tmp_path / "f.safetensors")
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(load_converted(path)(x), fast(x), rtol=0, atol=0)
    torch.testing.assert_close(fast(x), masked_model(model, ticket)(x), rtol=1e-5, atol=1e-5)


def test_a_conv_called_twice_is_refused_by_name():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(5, 5, 3, padding=1)

        def forward(self, x):
            return self.conv(self.conv(x))

    with pytest.raises(ConvertError, match="called more than once.*conv"):
        convert(Twice().eval(), Ticket({}), input_size=(5, 8, 8), device="cpu")
