"""``GroupSparseConv2d`` and the custom op ``sparse_ops::group_conv`` it calls: one
:class:`~sparse_ops_kernels.formats.GroupPack`, optionally followed by a second pack of
leftover nonzeros (one-row groups) that keeps a regrouped layer exact."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sparse_ops_kernels import launch
from sparse_ops_kernels.formats import GroupPack

from .. import ops
from ..errors import UnitFormatError
from . import saved
from .unit import Unit, fp32, memory_format, plain_eager_call, version_of


def group_conv_impl(
    x: Tensor,
    values: Tensor,
    val_ptr: Tensor,
    row_idx: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    col_code: Tensor,
    col_ptr: Tensor,
    tile_group: Tensor,
    tile_row: Tensor,
    fill_idx: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    in_channels: int,
    out_channels: int,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    block_n: int,
    k_pad: int,
    col_run: int,
    max_cols: int,
    relu: bool,
) -> Tensor:
    """``sparse_ops::group_conv``: a GroupPack's conv with its fused epilogue."""
    # max_cols comes from the host: deriving it from col_ptr would sync with the device.
    pack = GroupPack(
        values,
        val_ptr,
        row_idx,
        row_ptr,
        col_idx,
        col_code,
        col_ptr,
        tile_group,
        tile_row,
        fill_idx,
        bias,
        in_channels,
        out_channels,
        tuple(kernel_size),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        block_n,
        k_pad,
        col_run,
        groups_meta={"max_cols": max_cols},
        validate=False,
    )
    y = ops.group_conv(x, pack, residual=residual, relu=relu)
    return y.contiguous(memory_format=memory_format(x))


group_conv_op = torch.library.custom_op("sparse_ops::group_conv", mutates_args=())(group_conv_impl)


@group_conv_op.register_fake
def _group_conv_fake(
    x,
    values,
    val_ptr,
    row_idx,
    row_ptr,
    col_idx,
    col_code,
    col_ptr,
    tile_group,
    tile_row,
    fill_idx,
    bias,
    residual,
    in_channels,
    out_channels,
    kernel_size,
    stride,
    padding,
    dilation,
    block_n,
    k_pad,
    col_run,
    max_cols,
    relu,
):
    oh, ow = launch.conv_output_size(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    shape = (x.shape[0], out_channels, oh, ow)
    return x.new_empty(shape).contiguous(memory_format=memory_format(x))


_PACK_FIELDS = GroupPack.TENSOR_FIELDS


_BUFFERS_OF = {prefix: tuple(f"{prefix}_{f}" for f in _PACK_FIELDS) for prefix in ("main", "left")}


class GroupSparseConv2d(Unit):
    _buffer_names = tuple(f"{p}_{f}" for p in ("main", "left") for f in _PACK_FIELDS)

    def __init__(
        self, pack: GroupPack, *, relu: bool = False, leftover: GroupPack | None = None, name=""
    ):
        super().__init__()
        self.in_channels, self.out_channels = pack.in_channels, pack.out_channels
        self.kernel_size, self.stride = pack.kernel_size, pack.stride
        self.padding, self.dilation = pack.padding, pack.dilation
        self.block_n, self.k_pad, self.col_run = pack.block_n, pack.k_pad, pack.col_run
        self.relu, self.name = bool(relu), name
        self.has_leftover = leftover is not None
        self.left_block = (
            (leftover.block_n, leftover.k_pad, leftover.col_run) if leftover is not None else None
        )
        tensors = {f"main_{f}": getattr(pack, f) for f in _PACK_FIELDS}
        if leftover is not None:
            tensors.update({f"left_{f}": getattr(leftover, f) for f in _PACK_FIELDS})
        self._set_buffers(tensors)
        self.groups_meta = dict(pack.groups_meta)
        self.left_groups_meta = dict(leftover.groups_meta) if leftover is not None else {}
        # Host-side ints, so a forward never reads index arrays back from the GPU.
        self.max_cols = {
            "main": pack.max_cols,
            "left": leftover.max_cols if leftover is not None else 0,
        }
        self.eval()

    def _run(self, x: Tensor, prefix: str, block: tuple[int, int, int], residual, relu) -> Tensor:
        buffers = self._buffers  # not getattr: nn.Module's __getattr__ costs per lookup
        t = [buffers[name] for name in _BUFFERS_OF[prefix]]
        if plain_eager_call(x, residual, t[0], t[-1]):
            # What group_conv_impl does, on a pack kept between calls.
            y = ops.group_conv(x, self._eager_pack(prefix, t, block), residual=residual, relu=relu)
            return y.contiguous(memory_format=torch.channels_last)
        return group_conv_op(
            x,
            *t[:-1],
            fp32(t[-1]),
            residual,
            self.in_channels,
            self.out_channels,
            list(self.kernel_size),
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            *block,
            self.max_cols[prefix],
            relu,
        )

    def _eager_pack(self, prefix: str, tensors: list[Tensor], block) -> GroupPack:
        """Pack ``prefix``, rebuilt only when a buffer was replaced (``.to()``, loading)."""
        caches = self.__dict__.setdefault("_pack_cache", {})
        cached = caches.get(prefix)
        # The bias's version (see ChannelPrunedConv2d._eager_plan) and the values': the
        # torch path keeps weights prepared from them on the pack, and a leftover pack
        # has no bias whose version a load_state_dict would bump.
        version = (version_of(tensors[0]), version_of(tensors[-1]))
        if (
            cached is None
            or cached[1] != version
            or any(a is not c for a, c in zip(cached[0], tensors, strict=True))
        ):
            pack = GroupPack(
                *tensors[:-1],
                fp32(tensors[-1]),
                self.in_channels,
                self.out_channels,
                tuple(self.kernel_size),
                tuple(self.stride),
                tuple(self.padding),
                tuple(self.dilation),
                *block,
                groups_meta={"max_cols": self.max_cols[prefix]},
                validate=False,
            )
            cached = caches[prefix] = (list(tensors), version, pack)
        return cached[2]

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        main_relu = self.relu and not self.has_leftover
        y = self._run(x, "main", (self.block_n, self.k_pad, self.col_run), residual, main_relu)
        if self.has_leftover:  # leftover nonzeros: y + leftover(x), then the ReLU
            y = self._run(x, "left", self.left_block, y, self.relu)
        return y

    def pack(self, which: str = "main") -> GroupPack:
        block = (self.block_n, self.k_pad, self.col_run) if which == "main" else self.left_block
        return GroupPack(
            *[getattr(self, f"{which}_{f}") for f in _PACK_FIELDS],
            self.in_channels,
            self.out_channels,
            tuple(self.kernel_size),
            tuple(self.stride),
            tuple(self.padding),
            tuple(self.dilation),
            *block,
            groups_meta={"max_cols": self.max_cols[which]},
        )

    def config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "block_n": self.block_n,
            "k_pad": self.k_pad,
            "col_run": self.col_run,
            "relu": self.relu,
            "name": self.name,
            "leftover": list(self.left_block) if self.left_block else None,
            "groups_meta": self.groups_meta,
            "left_groups_meta": self.left_groups_meta,
        }

    @classmethod
    def from_state(cls, tensors, config):
        cin, cout, geometry = saved.conv_fields(config)
        kernel = saved.pair_field(config, "kernel_size", 1, saved.MAX_KERNEL)
        # col_run: absent in GroupPack version-1 files (derived from the columns then).
        block = (
            saved.int_field(config, "block_n", 1, saved.MAX_BLOCK),
            saved.int_field(config, "k_pad", 1, saved.MAX_BLOCK),
            saved.col_run_field(config, config.get("col_run")),
        )
        left = config.get("leftover")
        if isinstance(left, list) and len(left) == 3:  # [block_n, k_pad, col_run]
            left_block = (
                *saved.pair_field({**config, "leftover": left[:2]}, "leftover", 1, saved.MAX_BLOCK),
                saved.col_run_field(config, left[2]),
            )
        else:
            left_block = saved.pair_field(config, "leftover", 1, saved.MAX_BLOCK, optional=True)
            left_block = None if left_block is None else (*left_block, None)
        prefixes = ("main", "left") if left_block else ("main",)
        saved.check_tensor_names(
            tensors, config, [f"{p}_{f}" for p in prefixes for f in _PACK_FIELDS]
        )
        for prefix in prefixes:  # the dtypes and sizes the launcher requires
            saved.tensor_field(tensors, config, f"{prefix}_values", "float", 1)
            bias = saved.tensor_field(tensors, config, f"{prefix}_bias", "float", 1, optional=True)
            saved.check_shape(bias, (cout,), config, f"{prefix}_bias")
            for f in _PACK_FIELDS[1:-1]:
                t = saved.tensor_field(
                    tensors, config, f"{prefix}_{f}", "int", 1, optional=f == "col_code"
                )
                if t is None:
                    continue
                if t.dtype != (torch.int64 if f == "val_ptr" else torch.int32):
                    raise UnitFormatError(
                        f"{saved.where(config)}: tensor '{prefix}_{f}' has dtype {t.dtype}"
                    )

        def pack(prefix, block, key):
            meta = config.get(key, {})
            if not isinstance(meta, dict):
                raise UnitFormatError(f"config {key!r} must be an object")
            # Files without a pack's meta (older writers) get max_cols read off col_ptr;
            # without col_code or col_run (GroupPack version 1) both are derived.
            packed = GroupPack(
                *[tensors.get(f"{prefix}_{f}") for f in _PACK_FIELDS],
                cin,
                cout,
                kernel,
                geometry["stride"],
                geometry["padding"],
                geometry["dilation"],
                *block,
                groups_meta=meta,
            )
            # The kernel loops to max_cols: a file may not claim more (or fewer) columns
            # than its widest group has.
            ptr = packed.col_ptr
            widest = int((ptr[1:] - ptr[:-1]).max()) if ptr.numel() > 1 else 0
            if packed.max_cols != widest:
                raise UnitFormatError(
                    f"{prefix} pack: groups_meta max_cols {packed.max_cols} ≠ widest group {widest}"
                )
            return packed

        def build():
            leftover = pack("left", left_block, "left_groups_meta") if left_block else None
            main = pack("main", block, "groups_meta")
            return cls(
                main,
                relu=saved.flag_field(config, "relu"),
                leftover=leftover,
                name=saved.name_field(config),
            )

        return saved.checked(build, config)

    def extra_repr(self) -> str:
        groups = int(self.main_row_ptr.numel()) - 1
        bits = [
            f"{self.in_channels}→{self.out_channels}",
            f"{groups} groups",
            f"k={self.kernel_size}",
            f"s={self.stride}",
            f"p={self.padding}",
        ]
        if self.has_leftover:
            bits.append("+ leftover nonzeros")
        if self.relu:
            bits.append("relu")
        return ", ".join(bits)
