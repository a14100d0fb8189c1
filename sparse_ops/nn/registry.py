"""The unit types a converted file may name."""

from __future__ import annotations

from .channel import ChannelPrunedConv2d
from .group import GroupSparseConv2d
from .torch_units import Relayout, TorchConv2d

UNITS = {
    cls.__name__: cls for cls in (ChannelPrunedConv2d, GroupSparseConv2d, TorchConv2d, Relayout)
}
