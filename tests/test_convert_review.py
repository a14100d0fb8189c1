"""Adversarial review of the rule-based converter (issue 15): each test is one defect.

Every model is tiny (≤ 12 channels, 2×3×8×8 inputs), converted for the CPU cost model
unless the defect needs the default one, and compared with ``masked_model`` to
``rtol=1e-5`` with ``atol=1e-5·max|ref|``. Masks drop output rows 0 and 2 of every
conv, so those channels are per-channel constants (the conv's bias) the converter
removes from activations.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_ops import Ticket, models
from sparse_ops.convert import (
    ConvertError,
    SaveError,
    convert,
    load_converted,
    masked_model,
    register_module_rule,
    save_converted,
    unregister_module_rule,
)

SIZE = (3, 8, 8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ticket(model: nn.Module) -> Ticket:
    """Rows 0 and 2 of every conv pruned: those output channels are constant."""
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            mask = torch.ones_like(m.weight, dtype=torch.bool)
            mask[[0, 2]] = False
            masks[f"{name}.weight"] = mask
    return Ticket(masks)


def _input() -> torch.Tensor:
    return torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(3))


def _build(cls) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def _assert_exact(got: torch.Tensor, ref: torch.Tensor) -> None:
    atol = 1e-5 * max(float(ref.abs().max()), 1e-30)
    torch.testing.assert_close(got.float(), ref, rtol=1e-5, atol=atol)


def _check(cls, device="cpu"):
    model = _build(cls)
    ticket = _ticket(model)
    fast = convert(model, ticket, mode="channel", device=device, input_size=SIZE)
    x = _input()
    with torch.no_grad():
        _assert_exact(fast(x), masked_model(model, ticket)(x))
    return fast


def conv(cin, cout):
    return nn.Conv2d(cin, cout, 3, 1, 1)


# ---------------------------------------------------------------- in-place ops


class InplaceReluStatement(nn.Module):
    """``a.relu_()`` as a statement: ``a`` itself is mutated, and c2 reads ``a``."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv(3, 6), conv(6, 4)

    def forward(self, x):
        a = self.c1(x)
        a.relu_()
        return self.c2(a)


class InplaceAddStatement(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv(3, 6), conv(6, 4)

    def forward(self, x):
        a = self.c1(x)
        a.add_(1.0)
        return self.c2(a)


class FunctionalInplaceStatement(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv(3, 6), conv(6, 4)

    def forward(self, x):
        a = self.c1(x)
        F.relu(a, inplace=True)
        return self.c2(a)


class IaddThroughAlias(nn.Module):
    """``b = a; b += 1`` mutates ``a`` too (``operator.iadd`` on a tensor)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = conv(3, 6), conv(6, 4), conv(6, 4)

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = a
        b += 1
        return self.c2(a) + self.c3(b)


@pytest.mark.parametrize(
    "cls",
    [InplaceReluStatement, InplaceAddStatement, FunctionalInplaceStatement, IaddThroughAlias],
    ids=lambda c: c.__name__,
)
def test_inplace_op_on_a_tensor_read_later(cls):
    """The constant channels of ``a`` were computed as if the in-place op had not run,
    and folded into c2's bias map with their pre-mutation values. ``b = a; b += 1`` is
    refused: torch.fx itself records it as ``b = a + 1``, so the trace is not the model."""
    if cls is IaddThroughAlias:
        with pytest.raises(ConvertError, match="trace computes something else"):
            _check(cls)
        return
    _check(cls)


class InplaceResidualAdd(nn.Module):
    """``a.add_(c2(x))`` is fused into c2's unit as a residual add: the unit writes a new
    tensor, so ``a`` (read by c3 afterwards) is no longer mutated — every channel is
    wrong, not just the constant ones."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = conv(3, 6), conv(3, 6), conv(6, 4)

    def forward(self, x):
        a = F.relu(self.c1(x))
        a.add_(self.c2(x))
        return self.c3(a)


def test_inplace_residual_add_fused_into_a_conv_unit():
    _check(InplaceResidualAdd)


# ---------------------------------------------------------------- keyword arguments


class LinearByKeyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.fc = conv(3, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(input=self.c1(x).mean((2, 3)))


def test_linear_called_with_a_keyword_argument():
    """IndexError in units.linear_unit (``node.args[0]``) instead of converting."""
    _check(LinearByKeyword)


# ---------------------------------------------------------------- module names


class LinearTwiceThenModuleNamedFc2(nn.Module):
    """The second call of ``fc`` is emitted as a fresh module ``fc_2``; the model's own
    ``fc_2`` is then copied under its own path, replacing it in the output graph."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv(3, 6), conv(3, 6)
        self.fc = nn.Linear(6, 4)
        self.fc_2 = nn.Tanh()

    def forward(self, x):
        a, b = self.c1(x).mean((2, 3)), self.c2(x).mean((2, 3))
        return self.fc_2(self.fc(a) + self.fc(b))


class ModuleNamedLikeARelayout(nn.Module):
    """The cat's Relayout is named ``relayout_cat``: so is a module of the model."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv(3, 6), conv(3, 6)
        self.relayout_cat = nn.Tanh()

    def forward(self, x):
        return self.relayout_cat(torch.cat([self.c1(x), self.c2(x)], 1))


@pytest.mark.parametrize(
    ("cls", "device"),
    [(LinearTwiceThenModuleNamedFc2, "cpu"), (ModuleNamedLikeARelayout, None)],
    ids=["linear_twice", "relayout"],
)
def test_emitted_module_names_do_not_collide_with_the_models(cls, device):
    _check(cls, device)


# ---------------------------------------------------------------- custom module rules


class SoftMish(nn.Module):
    """Elementwise, no parameters: registered as "unary"."""

    def forward(self, x):
        return x * torch.tanh(F.softplus(x))


class ThroughCustomUnary(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.act, self.c2 = conv(3, 6), SoftMish(), conv(6, 4)

    def forward(self, x):
        return self.c2(self.act(self.c1(x)))


def test_register_module_rule_takes_effect():
    """fx traces through modules defined outside torch.nn (the default Tracer's leaf
    rule), so a registered module never appears as a call_module node and its rule is
    never consulted: here c1's constant channels are not narrowed across the activation
    and the converted module holds no SoftMish (docs: "A converted module holding a
    custom module runs, but cannot be saved")."""
    register_module_rule(SoftMish, "unary")
    try:
        model = _build(ThroughCustomUnary)
        ticket = _ticket(model)
        fast, report = convert(
            model, ticket, mode="channel", device="cpu", input_size=SIZE, return_report=True
        )
        x = _input()
        with torch.no_grad():
            _assert_exact(fast(x), masked_model(model, ticket)(x))
        assert any(isinstance(m, SoftMish) for m in fast.modules()), fast.code
        assert report.notes["narrowed_activations"] >= 2, report.notes
    finally:
        unregister_module_rule(SoftMish)


# ---------------------------------------------------------------- save / load


class MeanByAxis(nn.Module):
    """``axis=`` is torch's alias of ``dim=`` for reductions."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv(3, 6), conv(6, 4)

    def forward(self, x):
        a = self.c1(x)
        return self.c2(a * a.mean(axis=(2, 3), keepdim=True))


class SoftmaxStacklevel(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv(3, 6), conv(6, 4)

    def forward(self, x):
        return self.c2(F.softmax(self.c1(x), dim=1, _stacklevel=5))


@pytest.mark.parametrize("cls", [MeanByAxis, SoftmaxStacklevel], ids=lambda c: c.__name__)
def test_what_saves_also_loads(cls, tmp_path):
    """save_converted writes keyword arguments the loader then refuses ("keyword
    arguments 'axis' are not parameters of the op"): refusing at save time would be
    consistent, writing a file that cannot be loaded is not."""
    fast = _check(cls)
    try:
        path = save_converted(fast, tmp_path / "m.safetensors")
    except SaveError:
        return
    back = load_converted(path)
    x = _input()
    with torch.no_grad():
        assert torch.equal(back(x), fast(x))


def test_a_module_converted_under_inference_mode_runs():
    """Its buffers are inference tensors, which keep no version counter: the units'
    cached plans must not ask for one."""
    model = models.create("res20s").eval()
    with torch.inference_mode():
        fast = convert(model, Ticket({}, None, "res20s"), device="cpu")
        inside = fast(torch.ones(1, 3, 32, 32))
    with torch.no_grad():
        outside = fast(torch.ones(1, 3, 32, 32))
        torch.testing.assert_close(outside, model(torch.ones(1, 3, 32, 32)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)


def test_masked_model_is_the_oracle_it_claims_to_be():
    """masked_model, every converter test's reference: an eval copy computing W ⊙ M with
    the ticket's weights (if any) loaded and prune re-parametrisations folded; the model
    itself untouched."""
    import torch.nn.utils.prune as prune

    from sparse_ops import imp

    torch.manual_seed(0)
    model = models.create("res20s").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    names = imp.prunable(model)
    masks = {n: torch.rand(model.get_parameter(n).shape, generator=g) < 0.5 for n in names}
    weights = {k: v + 1.0 if v.is_floating_point() else v for k, v in before.items()}
    ref = masked_model(model, Ticket(masks, weights, "res20s"))
    assert not ref.training and model.training  # a copy, in eval mode
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    for name in names:
        expected = weights[name] * masks[name]
        torch.testing.assert_close(ref.get_parameter(name), expected, rtol=0, atol=0)
    # Without ticket weights: the model's own, masked.
    own = masked_model(model, Ticket(masks, None, "res20s"))
    first = names[0]
    torch.testing.assert_close(own.get_parameter(first), before[first] * masks[first])
    # torch.nn.utils.prune hooks on the model are folded (weight_orig × weight_mask).
    hooked = copy.deepcopy(model)
    prune.custom_from_mask(
        hooked.get_submodule(first.removesuffix(".weight")), "weight", masks[first]
    )
    folded = masked_model(hooked)
    assert not prune.is_pruned(folded)
    torch.testing.assert_close(folded.get_parameter(first), before[first] * masks[first])
    # A ticket that does not fit is a ConvertError naming the layer.
    wrong = {first: torch.ones(1, 1, 1, 1, dtype=torch.bool)}
    with pytest.raises(ConvertError, match="does not fit"):
        masked_model(model, Ticket(wrong, None, "res20s"))
