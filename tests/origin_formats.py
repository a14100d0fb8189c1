"""Build checkpoints the way each origin code writes them (independent of our exporters).

Structure-LTH (VITA-Group/Structure-LTH, main_imp.py): every round prunes 20% of the
remaining weights of every ``nn.Conv2d`` whose module name is not exactly ``conv1``
with ``prune.global_unstructured(L1Unstructured)``, extracts the ``*_mask`` buffers,
removes the re-parametrisation, rewinds to ``init_weight`` and re-applies the masks
with ``CustomFromMask``; it then trains and saves ``{state, result, epoch, state_dict,
best_sa, optimizer, scheduler, init_weight}`` with ``torch.save``.

open_lth (facebookresearch/open_lth): a level directory holds ``mask.pth`` (a plain dict
of int32 0/1 tensors over *every* Conv2d/Linear weight), ``model_ep{E}_it{I}.pth``
(state dicts multiplied by the mask), ``sparsity_report.json`` and ``checkpoint.pth``
whose ``model_state_dict`` comes from the ``PrunedModel`` wrapper: its own
``mask_<name with . → ___>`` float buffers, then ``model.<name>`` entries.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

from sparse_ops import models


def structure_lth_targets(model: nn.Module) -> list[tuple[nn.Module, str]]:
    # Their exclusion is by the literal module name 'conv1' (so VGG's stem is pruned).
    return [
        (m, "weight")
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and name != "conv1"
    ]


def _train_a_little(model: nn.Module) -> None:
    """Stand-in for training: move every weight, masked positions included (momentum)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.01 * torch.randn_like(p))
            if name.endswith("weight_orig"):
                p.add_(0.001)


def structure_lth_run(arch: str, rounds: int, directory: Path, num_classes: int = 10) -> dict:
    """Run the IMP bookkeeping of main_imp.py for ``rounds`` rounds; return the last ckpt dict.

    Writes ``{directory}/{state}checkpoint.pth.tar`` per round, as they do.
    """
    model = models.create(arch, num_classes)
    init_weight = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[80, 120], gamma=0.1)
    ckpt = {}
    for state in range(rounds + 1):
        if state > 0:
            prune.global_unstructured(
                structure_lth_targets(model), pruning_method=prune.L1Unstructured, amount=0.2
            )
            current_mask = {k: v.clone() for k, v in model.state_dict().items() if "mask" in k}
            for module, name in structure_lth_targets(model):
                prune.remove(module, name)
            model.load_state_dict(init_weight)
            for mname, module in model.named_modules():
                if isinstance(module, nn.Conv2d) and mname != "conv1":
                    prune.CustomFromMask.apply(
                        module, "weight", mask=current_mask[mname + ".weight_mask"]
                    )
        _train_a_little(model)
        ckpt = {
            "state": state,
            "result": {"train": [1.2, 0.8], "ta": [40.0, 60.0], "test_ta": [41.0, 61.0]},
            "epoch": 160,
            "state_dict": model.state_dict(),
            "best_sa": 91.25,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "init_weight": init_weight,
        }
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, directory / f"{state}checkpoint.pth.tar")
    return ckpt


def open_lth_prunable(model: nn.Module) -> list[str]:
    return [
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]


def open_lth_sparse_global(
    state: dict, mask: dict[str, torch.Tensor], fraction: float, ignore: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """One open_lth level: prune ``fraction`` of the remaining weights by global magnitude."""
    names = [k for k in mask if k not in ignore]
    kept = torch.cat([state[k][mask[k].bool()].abs().flatten() for k in names])
    n_prune = int(torch.ceil(torch.tensor(fraction * kept.numel())).item())
    threshold = kept.sort().values[n_prune]
    out = dict(mask)
    for k in names:
        out[k] = torch.where(state[k].abs() > threshold, mask[k], torch.zeros_like(mask[k]))
    return out


class PrunedModelLike(nn.Module):
    """open_lth's PrunedModel buffer/parameter naming."""

    def __init__(self, model: nn.Module, mask: dict[str, torch.Tensor]):
        super().__init__()
        for name, m in mask.items():
            self.register_buffer("mask_" + name.replace(".", "___"), m.float())
        self.model = model


def open_lth_level(
    arch: str, level: int, root: Path, ignore: tuple[str, ...] = (), num_classes: int = 10
) -> Path:
    """Write ``root/level_{level}/main`` the way an open_lth lottery run leaves it."""
    model = models.create(arch, num_classes)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    names = open_lth_prunable(model)
    mask = {k: torch.ones_like(init[k], dtype=torch.int32) for k in names}
    trained = init
    for _ in range(level):
        trained = {
            k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
            for k, v in trained.items()
        }
        mask = open_lth_sparse_global(trained, mask, 0.2, ignore)

    def masked(state: dict) -> dict:
        return {k: v * mask[k] if k in mask else v for k, v in state.items()}

    main = root / f"level_{level}" / "main"
    main.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.int() for k, v in mask.items()}, main / "mask.pth")
    torch.save(masked(init), main / "model_ep0_it0.pth")
    torch.save(masked(trained), main / "model_ep160_it0.pth")
    total = sum(v.numel() for v in mask.values())
    unpruned = sum(int(v.sum()) for v in mask.values())
    report = {"total": float(total), "unpruned": float(unpruned)}
    report["sparsity_ratio"] = unpruned / total  # E-LTH's addition: the kept fraction
    (main / "sparsity_report.json").write_text(json.dumps(report, indent=4))
    model.load_state_dict(masked(trained))
    wrapper = PrunedModelLike(model, mask)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save(
        {
            "ep": 160,
            "it": 0,
            "model_state_dict": wrapper.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "logger": "test_accuracy,0,0.1\ntest_loss,0,2.3\n",
        },
        main / "checkpoint.pth",
    )
    return main


def structure_lth_resume(path: Path, arch: str, num_classes: int = 10) -> dict:
    """Read ``path`` the way main_imp*.py's ``--resume`` does; return what it builds.

    Their order: a fresh model, SGD and MultiStepLR; ``checkpoint = torch.load(...)``;
    ``best_sa``, ``result``, ``epoch``, ``state``; for ``state > 0`` the masks
    (``extract_mask``: every key containing 'mask') go through ``prune_model_custom``
    (``CustomFromMask`` on every Conv2d not named ``conv1``, ``mask_dict[name +
    '.weight_mask']``) and a new optimizer/scheduler is built; then a strict
    ``load_state_dict`` of ``state_dict``, ``optimizer`` and ``scheduler``, and the
    rewind point from ``init_weight``, loaded strictly after ``prune.remove``.
    """
    model = models.create(arch, num_classes)
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[91, 136], gamma=0.1)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    best_sa, result = checkpoint["best_sa"], checkpoint["result"]
    start_epoch = checkpoint["epoch"]
    start_state = checkpoint.get("state", 1)
    if start_state > 0:
        current_mask = {k: v for k, v in checkpoint["state_dict"].items() if "mask" in k}
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and name != "conv1":
                prune.CustomFromMask.apply(m, "weight", mask=current_mask[name + ".weight_mask"])
        optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [91, 136], gamma=0.1)
    model.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    initialization = checkpoint["init_weight"]
    masks = {
        name + ".weight": m.weight_mask.clone()
        for name, m in model.named_modules()
        if hasattr(m, "weight_mask")
    }
    # Their rewind step: remove the re-parametrisation, load init_weight strictly.
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and name != "conv1" and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")
    model.load_state_dict(initialization)
    return {
        "model": model,
        "masks": masks,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "epoch": start_epoch,
        "state": start_state,
        "best_sa": best_sa,
        "result": result,
    }


def structure_lth_refill_layer(
    mask: torch.Tensor, count: torch.Tensor, fillback_rate: float = 0.0, generator=None
) -> torch.Tensor:
    """One layer of Structure-LTH's ``prune_model_custom_fillback`` (pruning_utils.py).

    ``count`` is the channel score (their default criterion ``remain``: the row's kept
    weights). ``int_channel = int(d·Cout + (Cout − d·Cout)·rate)``; the threshold is the
    ``max(Cout − int_channel, 1)``-th smallest score; rows above it become all ones, rows
    below all zeros, and *one* random row at the threshold all ones; the other rows at
    the threshold keep their mask as it was.
    """
    out = mask.clone().float().reshape(mask.shape[0], -1)
    cout = out.shape[0]
    num_channel = (out.sum() / out.shape[1]).item()
    int_channel = int(num_channel + (cout - num_channel) * fillback_rate)
    threshold, _ = torch.kthvalue(count, max(cout - int_channel, 1))
    out[torch.where(count > threshold)[0]] = 1
    out[torch.where(count < threshold)[0]] = 0
    tied = torch.where(count == threshold)[0]
    out[tied[torch.randperm(tied.numel(), generator=generator)[0]]] = 1
    return out.reshape(mask.shape).bool()
