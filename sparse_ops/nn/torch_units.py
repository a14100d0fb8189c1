"""Units torch runs as they are: ``TorchConv2d`` (grouped / depthwise convs, and the
cuDNN candidate of tuning) and ``Relayout`` (moves a tensor between channel layouts:
gathers physical channels, fills removed ones with their constant value)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..errors import UnitFormatError
from . import saved
from .unit import Unit


class TorchConv2d(Unit):
    """A conv torch runs (grouped/depthwise layers), BN folded, epilogue in torch."""

    _buffer_names = ("weight", "bias")

    def __init__(self, weight, bias, *, stride, padding, dilation, groups, relu=False, name=""):
        super().__init__()
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.groups, self.relu, self.name = int(groups), bool(relu), name
        self._set_buffers({"weight": weight, "bias": bias})
        self.eval()

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.conv2d(x, self.weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y

    def config(self) -> dict[str, Any]:
        return {
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "relu": self.relu,
            "name": self.name,
        }

    @classmethod
    def from_state(cls, tensors, config):
        geometry = saved.geometry_fields(config)
        groups = saved.int_field(config, "groups", 1, saved.MAX_CHANNELS)
        saved.check_tensor_names(tensors, config, cls._buffer_names)
        weight = saved.tensor_field(tensors, config, "weight", "float", 4)
        bias = saved.tensor_field(tensors, config, "bias", "float", 1, optional=True)
        if weight.shape[0] % groups or not all(
            1 <= k <= saved.MAX_KERNEL for k in weight.shape[2:]
        ):
            raise UnitFormatError(
                f"{saved.where(config)}: weight {tuple(weight.shape)} does not fit groups={groups}"
            )
        saved.check_shape(bias, (weight.shape[0],), config, "bias")
        return saved.checked(
            lambda: cls(
                weight,
                bias,
                **geometry,
                groups=groups,
                relu=saved.flag_field(config, "relu"),
                name=saved.name_field(config),
            ),
            config,
        )

    def extra_repr(self) -> str:
        out, per_group = self.weight.shape[:2]
        return f"{per_group * self.groups}→{out}, groups={self.groups}" + (
            ", relu" if self.relu else ""
        )


class Relayout(Unit):
    """Channel re-layout: output channel j is input channel ``index[j]``, or the constant
    ``fill[j]`` where ``index[j] < 0`` (a removed channel)."""

    _buffer_names = ("index", "fill")

    def __init__(self, index: Tensor, fill: Tensor, *, name: str = ""):
        super().__init__()
        self.name = name
        self._set_buffers({"index": index.to(torch.int64), "fill": fill.to(torch.float32)})
        # Host-side, so each call checks its input is wide enough without reading the
        # index back from the GPU (an out-of-range gather there is a device-side fault).
        self.reads = int(index.max()) + 1 if index.numel() else 0
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] < self.reads:
            raise UnitFormatError(
                f"Relayout {self.name!r}: reads channel {self.reads - 1}, input has shape "
                f"{tuple(x.shape)}"
            )
        shape = [1, -1] + [1] * (x.dim() - 2)
        if x.dim() == 4:
            # A strided view (an option-A shortcut's x[:, :, ::2, ::2]) made compact first:
            # the channel gather on a channels-last tensor is then one 2-D index_select,
            # several times faster than on the view's 4-D strides.
            x = x.contiguous(memory_format=torch.channels_last)
        gathered = ops.select_channels(x, self.index.clamp(min=0))
        removed = (self.index < 0).view(shape)
        return torch.where(removed, self.fill.to(x.dtype).view(shape), gathered)

    def config(self) -> dict[str, Any]:
        return {"name": self.name}

    @classmethod
    def from_state(cls, tensors, config):
        saved.check_tensor_names(tensors, config, cls._buffer_names)
        index = saved.tensor_field(tensors, config, "index", "int", 1)
        fill = saved.tensor_field(tensors, config, "fill", "float", 1)
        saved.check_shape(fill, tuple(index.shape), config, "fill")
        if index.numel() and not -1 <= int(index.min()) <= int(index.max()) < saved.MAX_CHANNELS:
            raise UnitFormatError(
                f"{saved.where(config)}: Relayout index values must lie in "
                f"[-1, {saved.MAX_CHANNELS}), found {int(index.min())}..{int(index.max())}"
            )
        return saved.checked(lambda: cls(index, fill, name=saved.name_field(config)), config)

    def extra_repr(self) -> str:
        kept = int((self.index >= 0).sum())
        return f"{kept} of {self.index.numel()} channels gathered, the rest constant"
