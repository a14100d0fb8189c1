"""Refill / Refill+: the kept-channel formula and every ranking criterion, on hand-built masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparse_ops import Ticket, models
from sparse_ops.masks import mask_stats
from sparse_ops.structure import RefillError, kept_channels, refill, refill_mask


def test_formula_refill_and_refill_plus():
    # d·Cout = nnz / row_length
    assert kept_channels(nnz=4 * 9, row_length=9, cout=16) == 4
    assert kept_channels(nnz=4 * 9, row_length=9, cout=16, extra=0.5) == 4 + 6
    assert kept_channels(nnz=37, row_length=9, cout=16) == 4  # 4.11 → 4
    assert kept_channels(nnz=37, row_length=9, cout=16, extra=0.1) == 5  # 4.11 + 1.19
    assert kept_channels(nnz=0, row_length=9, cout=16, extra=1.0) == 16


def test_formula_is_exact_where_floats_would_round_down():
    # In floats 100 · 0.29 = 28.999999999999996, which truncates to 28.
    assert 100 * 0.29 < 29
    assert kept_channels(nnz=0, row_length=9, cout=100, extra=0.29) == 29
    # d·Cout = nnz / row_length exactly, not (nnz / numel) · Cout in floats
    for cout in (29, 58, 87):
        row = 3 * 3 * 7
        assert kept_channels(nnz=29 * row, row_length=row, cout=cout) == 29


def test_extra_out_of_range():
    with pytest.raises(RefillError, match="extra must be in"):
        kept_channels(1, 1, 4, extra=1.5)


def _layer_ticket(mask: torch.Tensor, weight: torch.Tensor | None = None) -> Ticket:
    weights = None if weight is None else {"conv.weight": weight}
    return Ticket({"conv.weight": mask}, weights)


def test_remain_keeps_rows_with_most_nonzeros():
    # 6 channels × 4 weights; counts 3, 1, 4, 1, 2, 0 → density 11/24 → keep ⌊6·11/24⌋ = 2
    mask = torch.zeros(6, 4, 1, 1, dtype=torch.bool)
    for row, count in enumerate([3, 1, 4, 1, 2, 0]):
        mask[row, :count] = True
    out = refill(_layer_ticket(mask), criterion="remain")
    kept = out.masks["conv.weight"].flatten(1).all(1).nonzero().flatten().tolist()
    assert kept == [0, 2]
    assert mask_stats(out.masks["conv.weight"]).structure == "channel"


def test_l1_and_l2_rank_differently():
    mask = torch.ones(4, 4, 1, 1, dtype=torch.bool)
    mask[:, 2:] = False  # density 0.5 → keep 2 of 4
    w = torch.zeros(4, 4, 1, 1)
    w[0, :2, 0, 0] = torch.tensor([1.0, 1.0])  # l1 2.0, l2 1.41
    w[1, :2, 0, 0] = torch.tensor([1.6, 0.0])  # l1 1.6, l2 1.6
    w[2, :2, 0, 0] = torch.tensor([0.1, 0.1])  # small
    w[3, :2, 0, 0] = torch.tensor([1.2, 0.5])  # l1 1.7, l2 1.3
    w[3, 2:, 0, 0] = 100.0  # masked out: must not count
    ticket = _layer_ticket(mask, w)

    def kept(criterion):
        out = refill(ticket, criterion=criterion).masks["conv.weight"]
        return out.flatten(1).all(1).nonzero().flatten().tolist()

    assert kept("l1") == [0, 3]
    assert kept("l2") == [0, 1]


def test_ties_go_to_lower_channel_index():
    mask = torch.zeros(8, 2, 3, 3, dtype=torch.bool)
    mask[:, 0, 1, 1] = True  # every channel identical: all scores tie
    for criterion in ("remain", "l1"):
        out = refill(_layer_ticket(mask, torch.ones(8, 2, 3, 3)), criterion=criterion)
        rows = out.masks["conv.weight"].flatten(1).all(1)
        expected = torch.zeros(8, dtype=torch.bool)
        expected[: out.meta["structure_report"]["layers"][0]["detail"]["channels_kept"]] = True
        assert torch.equal(rows, expected)


def test_refill_plus_keeps_formula_count_and_report():
    torch.manual_seed(0)
    mask = torch.rand(32, 16, 3, 3) < 0.3
    ticket = _layer_ticket(mask, torch.randn(32, 16, 3, 3))
    expected = kept_channels(int(mask.sum()), 16 * 9, 32, extra=0.25)
    out = refill(ticket, extra=0.25)
    rows = out.masks["conv.weight"].flatten(1)
    assert int(rows.all(1).sum()) == expected
    assert not (rows.any(1) & ~rows.all(1)).any()  # every channel all-or-nothing
    change = out.meta["structure_report"]["layers"][0]
    assert change["detail"]["channels_kept"] == expected
    assert change["nnz_after"] == expected * 16 * 9
    assert change["dropped"] + change["nnz_after"] == change["nnz_before"] + change["refilled"]
    assert out.meta["method"] == "refill+"


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1, bias=False)
        self.fc = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def _feature_ticket() -> tuple[Ticket, TinyNet, tuple]:
    """4 channels fed by input 0 only (density 0.5 → keep 2), activations 4 > 3 > 2 > 1.

    With two classes, ∂L/∂a_c ∝ fc[0, c] − fc[1, c]: zero for channels 0 and 2, so
    saliency keeps channels 1 and 3 while the feature norms keep 0 and 1.
    """
    net = TinyNet()
    with torch.no_grad():
        net.conv.weight.copy_(torch.tensor([[4.0, 9], [3, 9], [2, 9], [1, 9]]).view(4, 2, 1, 1))
        net.fc.weight.copy_(torch.tensor([[0.5, 1.0, 1.0, 1.0], [0.5, -1.0, 1.0, 2.0]]))
    mask = torch.tensor([1, 0], dtype=torch.bool).view(1, 2, 1, 1).expand(4, 2, 1, 1)
    ticket = Ticket({"conv.weight": mask}, net.state_dict())
    batch = (torch.ones(3, 2, 2, 2), torch.tensor([0, 1, 1]))
    return ticket, net, batch


def _kept_rows(ticket: Ticket) -> list[int]:
    return ticket.masks["conv.weight"].flatten(1).any(1).nonzero().flatten().tolist()


@pytest.mark.parametrize("criterion", ["feature_l1", "feature_l2"])
def test_feature_criteria_use_masked_activations(criterion):
    ticket, net, batch = _feature_ticket()
    # the masked-out input 1 (weight 9 everywhere) must not count
    assert _kept_rows(refill(ticket, criterion=criterion, model=net, batch=batch)) == [0, 1]
    assert not any(hasattr(m, "weight_orig") for m in net.modules())  # caller's model untouched
    assert torch.equal(net.conv.weight[:, 1].flatten(), torch.full((4,), 9.0))


def test_saliency_follows_the_gradient():
    ticket, net, batch = _feature_ticket()
    assert _kept_rows(refill(ticket, criterion="saliency", model=net, batch=batch)) == [1, 3]


def test_feature_criteria_need_a_batch_and_weights():
    ticket, net, _ = _feature_ticket()
    with pytest.raises(RefillError, match="needs batch"):
        refill(ticket, criterion="feature_l1", model=net)
    with pytest.raises(RefillError, match="needs batch=\\(inputs, targets\\)"):
        refill(ticket, criterion="saliency", model=net, batch=(torch.ones(1, 2, 2, 2),))
    no_weights = Ticket(ticket.masks)
    with pytest.raises(RefillError, match="needs the ticket's trained weights"):
        refill(no_weights, criterion="l1")
    with pytest.raises(RefillError, match="unknown refill criterion"):
        refill(ticket, criterion="magic")


def test_empty_layer_stays_empty_and_min_channels():
    mask = torch.zeros(8, 4, 3, 3, dtype=torch.bool)
    out = refill(_layer_ticket(mask), criterion="remain")
    assert not out.masks["conv.weight"].any()
    assert out.meta["structure_report"]["layers"][0]["status"] == "empty"
    sparse = torch.zeros(8, 4, 3, 3, dtype=torch.bool)
    sparse[5, 0, 0, 0] = True  # d·Cout ≈ 0.02 → 0 channels; min_channels keeps one
    kept = refill(_layer_ticket(sparse), criterion="remain").masks["conv.weight"]
    assert kept.flatten(1).all(1).nonzero().flatten().tolist() == [5]


def test_linear_skipped_depthwise_refilled():
    model = models.create("mobilenet")
    torch.manual_seed(0)
    masks = {
        "layers.0.conv1.weight": torch.rand(32, 1, 3, 3) < 0.5,  # depthwise
        "layers.0.conv2.weight": torch.rand(64, 32, 1, 1) < 0.5,
        "linear.weight": torch.rand(10, 1024) < 0.5,
    }
    ticket = Ticket(masks, model.state_dict(), "mobilenet")
    out = refill(ticket)
    statuses = {c["name"]: c["status"] for c in out.meta["structure_report"]["layers"]}
    assert statuses == {
        "layers.0.conv1.weight": "refilled",
        "layers.0.conv2.weight": "refilled",
        "linear.weight": "skipped: linear",
    }
    assert torch.equal(out.masks["linear.weight"], masks["linear.weight"])


def test_refill_mask_checks_score_shape():
    with pytest.raises(RefillError, match="need 4 channel scores"):
        refill_mask(torch.ones(4, 2, 1, 1, dtype=torch.bool), torch.ones(3))


def test_refill_drops_stale_group_layouts():
    mask = torch.rand(8, 4, 3, 3) < 0.5
    ticket = _layer_ticket(mask)
    ticket.meta["groups"] = {"conv.weight": [{"rows": [0], "cols": [0]}], "other": []}
    out = refill(ticket, criterion="remain")
    assert "conv.weight" not in out.meta["groups"] and "other" in out.meta["groups"]


# ------------------------------------------- differences from the original (docs/STRUCTURE.md)


def _rows_with_counts(counts: list[int], width: int = 9) -> torch.Tensor:
    """A [Cout, 1, 3, 3] mask whose row ``o`` keeps its first ``counts[o]`` weights."""
    mask = torch.zeros(len(counts), width, dtype=torch.bool)
    for o, c in enumerate(counts):
        mask[o, :c] = True
    return mask.reshape(len(counts), 1, 3, 3)


@pytest.mark.parametrize(
    "counts", [[9, 8, 7, 6, 5, 4, 3, 2], [1, 3, 5, 7, 9, 2, 4, 6], [9, 9, 8, 0, 0, 1, 2, 3]]
)
def test_original_keeps_one_channel_more_without_ties(counts):
    from origin_formats import structure_lth_refill_layer

    mask = _rows_with_counts(counts)
    score = mask.flatten(1).sum(1).float()
    k = kept_channels(int(mask.sum()), 9, len(counts))
    theirs = structure_lth_refill_layer(mask, score, generator=torch.Generator().manual_seed(0))
    ours, _ = refill_mask(mask, score.double())
    threshold = score.sort().values[len(counts) - k - 1]
    assert (score == threshold).sum() == 1  # no tie at their threshold
    assert int(theirs.flatten(1).all(1).sum()) == k + 1
    assert int(ours.flatten(1).all(1).sum()) == k
    assert mask_stats(theirs).structure == mask_stats(ours).structure == "channel"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_original_leaves_tied_rows_partially_pruned(seed):
    from origin_formats import structure_lth_refill_layer

    counts = [9, 9, 9, 9, 5, 5, 5, 5, 5, 5, 5, 5, 1, 1, 1, 1]  # d·Cout = 80 / 9: K = 8
    mask = _rows_with_counts(counts)
    score = mask.flatten(1).sum(1).float()
    g = torch.Generator().manual_seed(seed)
    theirs = structure_lth_refill_layer(mask, score, generator=g).flatten(1)
    ours, _ = refill_mask(mask, score.double())
    # threshold = the 8th smallest count = 5: four 9s kept, 1s cleared, one random 5
    # filled, and the seven other 5s keep their partial rows
    partial = theirs.any(1) & ~theirs.all(1)
    assert int(theirs.all(1).sum()) == 5 and int(partial.sum()) == 7
    assert torch.equal(theirs[partial], mask.flatten(1)[partial])
    rows = ours.flatten(1)
    assert not (rows.any(1) & ~rows.all(1)).any() and int(rows.all(1).sum()) == 8
    assert mask_stats(theirs.reshape(mask.shape)).structure != "channel"
