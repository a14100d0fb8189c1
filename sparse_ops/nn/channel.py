"""``ChannelPrunedConv2d`` and the custom op ``sparse_ops::channel_conv`` it calls: a
:class:`~sparse_ops_kernels.formats.ChannelPlan` (kept output channels × kept input
channels; the others get their epilogue only). ``bias_map`` carries the contribution of
input channels that are constant and were removed from the activation. It varies near
the borders because of zero padding, so it is a per-position map, precomputed for the
conversion's input size."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_ops_kernels import launch
from sparse_ops_kernels.formats import ChannelPlan

from .. import ops
from ..errors import UnitFormatError
from . import saved
from .unit import Unit, fp32, memory_format, plain_eager_call, version_of


def channel_conv_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    fill_idx: Tensor | None,
    bias_map: Tensor | None,
    residual: Tensor | None,
    in_channels: int,
    out_channels: int,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu: bool,
) -> Tensor:
    """``sparse_ops::channel_conv``: a ChannelPlan's conv with its fused epilogue."""
    # Indices were checked when the unit was built or loaded: not again on every call.
    plan = ChannelPlan(
        weight,
        bias,
        in_idx,
        out_idx,
        fill_idx,
        in_channels,
        out_channels,
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        validate=False,
    )
    y = ops.channel_conv(x, plan, residual=residual, relu=relu, bias_map=bias_map)
    return y.contiguous(memory_format=memory_format(x))


channel_conv_op = torch.library.custom_op("sparse_ops::channel_conv", mutates_args=())(
    channel_conv_impl
)


@channel_conv_op.register_fake
def _channel_conv_fake(
    x,
    weight,
    bias,
    in_idx,
    out_idx,
    fill_idx,
    bias_map,
    residual,
    in_channels,
    out_channels,
    stride,
    padding,
    dilation,
    relu,
):
    kernel = weight.shape[1:3]
    oh, ow = launch.conv_output_size(x.shape[2], x.shape[3], kernel, stride, padding, dilation)
    shape = (x.shape[0], out_channels, oh, ow)
    return x.new_empty(shape).contiguous(memory_format=memory_format(x))


class ChannelPrunedConv2d(Unit):
    _buffer_names = (
        "weight",
        "bias",
        "in_idx",
        "out_idx",
        "fill_idx",
        "const_weight",
        "const_values",
        "bias_map",
    )

    def __init__(
        self,
        plan: ChannelPlan,
        *,
        relu: bool = False,
        const_weight: Tensor | None = None,
        const_values: Tensor | None = None,
        input_hw: tuple[int, int] | None = None,
        name: str = "",
    ):
        super().__init__()
        self.in_channels, self.out_channels = plan.in_channels, plan.out_channels
        self.stride, self.padding, self.dilation = plan.stride, plan.padding, plan.dilation
        self.relu, self.name = bool(relu), name
        self.input_hw = tuple(input_hw) if input_hw is not None else None
        bias_map = None
        if const_weight is not None and input_hw is not None:
            bias_map = self._compute_bias_map(const_weight, const_values, *input_hw)
        self._set_buffers(
            {
                "weight": plan.weight,
                "bias": plan.bias,
                "in_idx": plan.in_idx,
                "out_idx": plan.out_idx,
                "fill_idx": plan.fill_idx,
                "const_weight": const_weight,
                "const_values": const_values,
                "bias_map": bias_map,
            }
        )
        self.eval()

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (int(self.weight.shape[1]), int(self.weight.shape[2]))

    @property
    def plan(self) -> ChannelPlan:
        return ChannelPlan(
            self.weight,
            self.bias,
            self.in_idx,
            self.out_idx,
            self.fill_idx,
            self.in_channels,
            self.out_channels,
            self.stride,
            self.padding,
            self.dilation,
        )

    def _compute_bias_map(
        self, const_weight: Tensor, const_values: Tensor, h: int, w: int
    ) -> Tensor:
        """Contribution of removed constant input channels, per output position."""
        image = const_values.to(torch.float32).view(1, -1, 1, 1).expand(1, -1, h, w)
        kernel = const_weight.to(image.device, torch.float32)
        return F.conv2d(image, kernel, None, self.stride, self.padding, self.dilation)[
            0
        ].contiguous()

    def _bias_map_for(self, x: Tensor) -> Tensor | None:
        if self.const_weight is None:
            return None
        if self.bias_map is not None and tuple(x.shape[2:]) == self.input_hw:
            return self.bias_map
        return self._compute_bias_map(self.const_weight, self.const_values, x.shape[2], x.shape[3])

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        bias_map = self._bias_map_for(x)
        b = self._buffers  # not getattr: nn.Module's __getattr__ costs per lookup
        if plain_eager_call(x, residual, b["weight"], b["bias"], bias_map):
            # What channel_conv_impl does, on a plan kept between calls.
            y = ops.channel_conv(
                x, self._eager_plan(), residual=residual, relu=self.relu, bias_map=fp32(bias_map)
            )
            return y.contiguous(memory_format=torch.channels_last)
        return channel_conv_op(
            x,
            self.weight,
            fp32(self.bias),
            self.in_idx,
            self.out_idx,
            self.fill_idx,
            fp32(bias_map),
            residual,
            self.in_channels,
            self.out_channels,
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            self.relu,
        )

    def _eager_plan(self) -> ChannelPlan:
        """The unit's plan, rebuilt only when a buffer was replaced (``.to()``, loading)."""
        b = self._buffers
        tensors = (b["weight"], b["bias"], b["in_idx"], b["out_idx"], b["fill_idx"])
        # The bias's version too: after .half() the plan holds an fp32 copy of it, which
        # an in-place update of the buffer (load_state_dict) would not reach.
        version = version_of(tensors[1])
        cached = self.__dict__.get("_plan_cache")
        if (
            cached is None
            or cached[1] != version
            or any(a is not c for a, c in zip(cached[0], tensors, strict=True))
        ):
            plan = ChannelPlan(
                tensors[0],
                fp32(tensors[1]),
                *tensors[2:],
                self.in_channels,
                self.out_channels,
                tuple(self.stride),
                tuple(self.padding),
                tuple(self.dilation),
                validate=False,
            )
            cached = self.__dict__["_plan_cache"] = (tensors, version, plan)
        return cached[2]

    def config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "relu": self.relu,
            "name": self.name,
            "input_hw": list(self.input_hw) if self.input_hw else None,
        }

    @classmethod
    def from_state(cls, tensors, config):
        cin, cout, geometry = saved.conv_fields(config)
        input_hw = saved.pair_field(config, "input_hw", 1, saved.MAX_INPUT_HW, optional=True)
        saved.check_tensor_names(tensors, config, cls._buffer_names)
        weight = saved.tensor_field(tensors, config, "weight", "float", 4)
        bias = saved.tensor_field(tensors, config, "bias", "float", 1, optional=True)
        idx = {
            k: saved.exact_int32(
                saved.tensor_field(tensors, config, k, "int", 1, optional=True), config, k
            )
            for k in ("in_idx", "out_idx", "fill_idx")
        }
        rows, kh, kw, ins = weight.shape
        if not (1 <= kh <= saved.MAX_KERNEL and 1 <= kw <= saved.MAX_KERNEL):
            raise UnitFormatError(f"{saved.where(config)}: kernel {kh}×{kw} out of range")
        saved.check_shape(idx["in_idx"], (ins,), config, "in_idx")
        saved.check_shape(idx["out_idx"], (rows,), config, "out_idx")
        if idx["in_idx"] is None and ins != cin:
            raise UnitFormatError(
                f"{saved.where(config)}: weight reads {ins} of {cin} inputs, no in_idx"
            )
        filled = 0 if idx["fill_idx"] is None else idx["fill_idx"].numel()
        if rows + filled != cout:
            raise UnitFormatError(f"{saved.where(config)}: {rows} rows + {filled} filled ≠ {cout}")
        saved.check_shape(bias, (cout,), config, "bias")
        const_weight = saved.tensor_field(
            tensors, config, "const_weight", "float", 4, optional=True
        )
        const_values = saved.tensor_field(
            tensors, config, "const_values", "float", 1, optional=True
        )
        bias_map = saved.tensor_field(tensors, config, "bias_map", "float", 3, optional=True)
        if (const_weight is None) != (const_values is None):
            raise UnitFormatError(
                f"{saved.where(config)}: const_weight and const_values come together"
            )
        if const_weight is not None:
            saved.check_shape(
                const_weight, (cout, const_values.numel(), kh, kw), config, "const_weight"
            )
        if bias_map is not None:
            if const_weight is None or input_hw is None:
                raise UnitFormatError(
                    f"{saved.where(config)}: bias_map without constants and input_hw"
                )
            oh, ow = launch.conv_output_size(
                *input_hw, (kh, kw), geometry["stride"], geometry["padding"], geometry["dilation"]
            )
            saved.check_shape(bias_map, (cout, oh, ow), config, "bias_map")

        def build():
            plan = ChannelPlan(
                weight, bias, idx["in_idx"], idx["out_idx"], idx["fill_idx"], cin, cout, **geometry
            )
            # No input_hw here: the saved bias map is used as it is. Recomputing it would
            # cost memory quadratic in a number the file states; without a saved map the
            # unit computes one per input size on its first call.
            unit = cls(
                plan,
                relu=saved.flag_field(config, "relu"),
                const_weight=const_weight,
                const_values=const_values,
                name=saved.name_field(config),
            )
            if bias_map is not None or const_weight is None:
                unit.input_hw = input_hw
            if bias_map is not None:
                unit.bias_map = bias_map.detach().clone(memory_format=torch.contiguous_format)
            return unit

        return saved.checked(build, config)

    def extra_repr(self) -> str:
        rows = self.weight.shape[0]
        ins = self.weight.shape[3]
        bits = [
            f"{ins}/{self.in_channels} in",
            f"{rows}/{self.out_channels} out",
            f"k={self.kernel_size}",
            f"s={self.stride}",
            f"p={self.padding}",
        ]
        if self.dilation != (1, 1):
            bits.append(f"d={self.dilation}")
        if self.const_weight is not None:
            bits.append(f"bias_map from {self.const_weight.shape[1]} constant channels")
        if self.relu:
            bits.append("relu")
        return ", ".join(bits)
