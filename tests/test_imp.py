"""IMP: magnitude rounds, exclusions, rewinding, the prune convention, post-processing."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from sparse_ops import Ticket, imp, load_ticket, models
from sparse_ops.masks import mask_stats


def test_magnitude_global_prunes_the_smallest_remaining():
    w = {"a": torch.tensor([[0.1, -5.0], [3.0, 0.2]]), "b": torch.tensor([[-0.3, 4.0, 0.05]])}
    m = {"a": torch.ones(2, 2, dtype=torch.bool), "b": torch.tensor([[True, True, False]])}
    out = imp.magnitude_masks(w, m, rate=0.5)  # 6 remaining → prune 3: 0.1, 0.2, -0.3
    assert out["a"].tolist() == [[False, True], [True, False]]
    assert out["b"].tolist() == [[False, True, False]]  # 0.05 was already pruned


def test_magnitude_ties_are_deterministic():
    w = {"a": torch.ones(3, 4), "b": torch.ones(2, 4)}
    m = {k: torch.ones_like(v, dtype=torch.bool) for k, v in w.items()}
    out = imp.magnitude_masks(w, m, rate=0.25)  # 5 of 20 equal weights: the first five
    assert out["a"].flatten().tolist()[:5] == [False] * 5
    assert out["a"].flatten()[5:].all() and out["b"].all()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_density_after_k_rounds(scope):
    torch.manual_seed(0)
    w = {"a": torch.randn(64, 32, 3, 3), "b": torch.randn(100, 50)}
    m = {k: torch.ones_like(v, dtype=torch.bool) for k, v in w.items()}
    total = sum(v.numel() for v in w.values())
    for k in range(1, 6):
        m = imp.magnitude_masks(w, m, rate=0.2, scope=scope)
        density = sum(int(v.sum()) for v in m.values()) / total
        assert density == pytest.approx(0.8**k, abs=2 / total * k)
        if scope == "layer":
            for name in w:
                assert float(m[name].float().mean()) == pytest.approx(0.8**k, abs=1e-3)


@pytest.mark.parametrize("rate", [0, 1, -0.1, 1.5, "0.2"])
def test_rate_outside_unit_interval(rate):
    with pytest.raises(imp.IMPError, match=r"rate must be in \(0, 1\)"):
        imp.magnitude_masks({"a": torch.ones(2)}, {"a": torch.ones(2, dtype=torch.bool)}, rate)


def test_stem_is_found_by_running_not_by_name():
    assert imp.find_stem(models.create("res20s")) == "conv1"
    assert imp.find_stem(models.create("vgg16_bn")) == "features.0"
    assert imp.find_stem(models.create("cifar_resnet_20")) == "conv"
    assert imp.find_stem(models.create("imagenet_resnet_18")) == "model.conv1"


def test_prunable_default_and_configured_exclusions():
    names = imp.prunable(models.create("vgg16_bn"))
    assert "features.0.weight" not in names and "classifier.weight" not in names
    assert len(names) == 12
    res = imp.prunable(models.create("res18"))
    assert "layer2.0.downsample.0.weight" in res and "conv1.weight" not in res
    keep_stem = imp.prunable(models.create("res20s"), exclude=[imp.CLASSIFIER])
    assert "conv1.weight" in keep_stem and "fc.weight" not in keep_stem
    by_name = imp.prunable(models.create("res20s"), exclude=[imp.STEM, nn.Linear, "layer3.2.conv2"])
    assert "layer3.2.conv2.weight" not in by_name

    def depthwise_or_linear(name, module):
        return not isinstance(module, nn.Conv2d) or module.groups > 1

    pred = imp.prunable(models.create("mobilenet"), exclude=[depthwise_or_linear])
    assert all(".conv2." in n or n == "conv1.weight" for n in pred)
    with pytest.raises(imp.IMPError, match="exclude names no module"):
        imp.prunable(models.create("res20s"), exclude=["nope"])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.body(torch.relu(self.stem(x))).mean((2, 3)))


def _fake_training(starts: dict):
    """A deterministic "training": record the state at the start, then move every weight."""

    def train(model, ctx):
        starts[ctx.round] = imp.capture_state(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))

    return train


def test_run_density_rewinding_and_exclusions():
    torch.manual_seed(0)
    model = Net()
    starts: dict = {}
    tickets = list(imp.run(model, 3, _fake_training(starts), lambda m: 50.0, rate=0.2))
    assert [t.meta["round"] for t in tickets] == [0, 1, 2, 3]
    assert tickets[0].density == 1.0 and tickets[0].meta["method"] == "dense"
    assert set(tickets[1].masks) == {"body.0.weight", "body.2.weight"}
    for k, t in enumerate(tickets):
        assert t.density == pytest.approx(0.8**k, abs=1e-3)
        assert t.meta["accuracy"] == 50.0
    # rounds ≥ 1 start exactly from the rewind state (captured before round 0)
    rewind = tickets[0].rewind
    for r in (1, 2, 3):
        for key, value in rewind.items():
            assert torch.equal(starts[r][key], value), (r, key)
    # excluded layers carry no mask and are never pruned
    assert not hasattr(model.stem, "weight_mask") and not hasattr(model.head, "weight_mask")
    assert bool((model.stem.weight != 0).all())
    # masks follow the torch.nn.utils.prune convention, so our loader reads them back
    assert prune.is_pruned(model)
    back = load_ticket(model)
    assert back.meta["source_format"] == "module-prune"
    assert all(torch.equal(back.masks[n], tickets[-1].masks[n]) for n in tickets[-1].masks)


def test_early_rewind_point_captured_by_train_fn():
    torch.manual_seed(0)
    model = Net()
    starts: dict = {}
    base = _fake_training(starts)

    def train(m, ctx):
        base(m, ctx)
        if ctx.round == 0:
            ctx.capture_rewind()  # "after epoch k"

    tickets = list(imp.run(model, 1, train, lambda m: 1.0))
    assert torch.equal(starts[1]["stem.weight"], tickets[0].weights["stem.weight"])
    assert torch.equal(tickets[1].rewind["stem.weight"], tickets[0].weights["stem.weight"])


def test_capture_rewind_after_round_zero_is_refused():
    def train(m, ctx):
        if ctx.round == 1:
            ctx.capture_rewind()

    with pytest.raises(imp.IMPError, match="only be captured during round 0"):
        list(imp.run(Net(), 1, train, lambda m: 1.0))


def test_run_with_refill_gives_channel_masks():
    torch.manual_seed(0)
    tickets = list(
        imp.run(
            Net(),
            2,
            _fake_training({}),
            lambda m: {"accuracy": 1.0, "loss": 2},
            post="refill",
            post_options={"criterion": "l1"},
        )
    )
    last = tickets[-1]
    assert last.meta["method"] == "refill" and last.meta["metrics"]["loss"] == 2
    for mask in last.masks.values():
        assert mask_stats(mask).structure in ("channel", "dense")


def test_run_with_regroup_records_layouts():
    torch.manual_seed(0)
    tickets = list(
        imp.run(
            Net(),
            2,
            _fake_training({}),
            lambda m: 1.0,
            post="regroup",
            post_options={"min_rows": 4},
        )
    )
    last = tickets[-1]
    assert last.meta["method"] == "regroup"
    assert set(last.meta["groups"]) == set(last.masks)
    assert last.meta["imp_density"] != last.density or last.meta["structure_report"]


def test_custom_post_and_bad_post():
    def halve_body(ticket: Ticket, model: nn.Module) -> Ticket:
        masks = dict(ticket.masks)
        masks["body.2.weight"] = torch.zeros_like(masks["body.2.weight"])
        masks["body.2.weight"][:8] = True
        return Ticket(masks, ticket.weights, meta={"method": "mine"})

    tickets = list(imp.run(Net(), 1, _fake_training({}), lambda m: 1.0, post=halve_body))
    assert tickets[1].meta["method"] == "mine"
    assert (
        tickets[1].masks["body.2.weight"][:8].all()
        and not tickets[1].masks["body.2.weight"][8:].any()
    )

    def bad(ticket, model):
        return Ticket({"x.weight": torch.ones(2, 2)})

    with pytest.raises(imp.IMPError, match="exactly the prunable layers"):
        list(imp.run(Net(), 1, _fake_training({}), lambda m: 1.0, post=bad))
    with pytest.raises(imp.IMPError, match="unknown post-processing 'fold'"):
        list(imp.run(Net(), 1, _fake_training({}), lambda m: 1.0, post="fold"))
    with pytest.raises(imp.IMPError, match="refill\\+ needs extra > 0"):
        imp.resolve_post("refill+", {"extra": 0})
    with pytest.raises(imp.IMPError, match="rounds must be"):
        list(imp.run(Net(), -1, _fake_training({}), lambda m: 1.0))


@pytest.mark.parametrize(
    ("post_options", "message"),
    [
        ({"extr": 0.1}, r"unknown refill options \['extr'\]"),
        ({"criterion": "l3"}, "criterion must be one of"),
        ({"criterion": "feature_l1"}, "ranks channels by activations"),
    ],
)
def test_bad_refill_options_fail_before_any_training(post_options, message):
    trained = []
    with pytest.raises(imp.IMPError, match=message):
        next(
            imp.run(
                Net(),
                1,
                lambda m, ctx: trained.append(ctx.round),
                lambda m: 1.0,
                post="refill",
                post_options=post_options,
            )
        )
    assert trained == []


def test_bad_eval_and_post_results_are_named():
    with pytest.raises(imp.IMPError, match="eval_fn must return an accuracy .* got NoneType"):
        next(imp.run(Net(), 1, _fake_training({}), lambda m: None))
    with pytest.raises(imp.IMPError, match="post must return a Ticket, got dict"):
        list(imp.run(Net(), 1, _fake_training({}), lambda m: 1.0, post=lambda t, m: {}))


def test_capture_and_restore_state_round_trip():
    torch.manual_seed(0)
    model = Net()
    imp.set_masks(model, {"body.0.weight": torch.rand(16, 8, 3, 3) < 0.5})
    state = imp.capture_state(model)
    assert "body.0.weight" in state and "body.0.weight_orig" not in state
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    imp.restore_state(model, state)
    again = imp.capture_state(model)
    assert all(torch.equal(again[k], v) for k, v in state.items())
