"""The fallback when torch.fx cannot trace a model: each masked conv replaced in place.

Without a graph there is nothing to fold, fuse or narrow across layers, so every masked
``Conv2d`` becomes a unit of its own (dense or channel-pruned, or a ``TorchConv2d`` for
grouped convs) and the report says why (``notes["fallback"]``). Such a module runs, but
``save_converted`` refuses it: the file format is a graph.
"""

from __future__ import annotations

import copy

from torch import nn

from ..nn import ChannelPrunedConv2d, TorchConv2d
from ..packing import pack_channels
from .context import LayerRow
from .report import ConversionReport


def replace_modules(dense, masks, mode, dtype, example, exc):
    """Fallback when fx cannot trace: each masked Conv2d replaced in place, nothing fused."""
    model = copy.deepcopy(dense)
    rows = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Conv2d) or f"{name}.weight" not in masks:
            continue
        w = module.weight.detach()
        b = module.bias.detach().float() if module.bias is not None else None
        geometry = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}
        if module.groups != 1:
            unit = TorchConv2d(w, b, groups=module.groups, name=name, **geometry)
        else:
            plan = pack_channels(w, None, b, **geometry)
            unit = ChannelPrunedConv2d(plan.to(dtype=dtype or w.dtype), name=name)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, unit)
        kept = int((w != 0).sum())
        row = LayerRow(
            name,
            "conv",
            "replaced",
            type(unit).__name__,
            module.in_channels,
            module.out_channels,
            0,
            0,
            w.numel(),
            kept,
        )
        rows.append(row)
    if dtype is not None:
        model = model.to(dtype)
    reason = f"torch.fx could not trace the model ({type(exc).__name__}: {exc}); masked convs "
    reason += "replaced in place, BatchNorm not folded, nothing fused"
    report = ConversionReport(
        mode, "dense", False, tuple(example.shape), rows, {"fallback": reason}
    )
    return model.eval(), report
