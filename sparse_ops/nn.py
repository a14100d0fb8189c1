"""Inference modules the converter emits (eval only).

Each conv unit computes one conv layer with BatchNorm folded in and its epilogue fused:

    y = relu?( conv(x, W) + bias [+ bias_map] [+ residual] )

``ChannelPrunedConv2d``
    a :class:`~sparse_ops.formats.ChannelPlan` (kept output channels × kept input
    channels; others filled with their epilogue). ``bias_map`` carries the
    contribution of input channels that are constant and were removed from the
    activation. It varies near the borders because of zero padding, so it is a
    per-position map, precomputed for the conversion's input size.
``GroupSparseConv2d``
    one :class:`~sparse_ops.formats.GroupPack`, optionally followed by a second pack of
    leftover nonzeros (one-row groups) that keeps a regrouped layer exact.
``TorchConv2d``
    a plain (masked) conv run by torch: grouped / depthwise layers.
``Relayout``
    moves a tensor between channel layouts: gathers physical channels and fills
    removed ones with their constant value.

On CUDA tensors the conv units run the Triton kernels, on CPU tensors the torch paths
of :mod:`sparse_ops.ops`. Both sit behind the custom ops ``sparse_ops::channel_conv`` and
``sparse_ops::group_conv``, so ``torch.compile`` and CUDA-graph capture see one opaque
op per layer instead of breaking the graph.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from sparse_ops_kernels import launch
from torch import Tensor, nn

from . import ops
from .errors import listing
from .formats import COL_RUN, FORMAT_VERSION, ChannelPlan, FormatError, GroupPack


def _memory_format(x: Tensor) -> torch.memory_format:
    # Both the kernels and the CPU paths produce channels-last outputs.
    return torch.channels_last


# ---------------------------------------------------------------------- custom ops


def _plain_eager_call(*tensors: Tensor | None) -> bool:
    """True when nothing traces or intercepts this call: no torch.compile / export /
    jit trace, no tensor subclass (fake, functional, proxy), no dispatch or function mode,
    no gradient wanted. Then a unit calls its op's implementation directly, skipping the
    dispatcher's custom-op machinery (about half the host time of an eager conv call);
    whenever anything might be recording, it calls the registered op, so graphs always
    see one opaque op per layer."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not Tensor or (grad and t.requires_grad) or _functorch_wrapped(t):
            return False
    # A kept plan built during CUDA-graph capture would hold copies the capture only
    # records (never runs) until the first replay: capture goes through the op.
    return not (tensors[0].is_cuda and torch.cuda.is_current_stream_capturing())


def _functorch_wrapped(t: Tensor) -> bool:
    """A vmap/grad transform's wrapper: a plain Tensor by type, not by behaviour."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


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
    plan = ChannelPlan(weight, bias, in_idx, out_idx, fill_idx, in_channels, out_channels,
                       tuple(stride), tuple(padding), tuple(dilation), validate=False)  # fmt: skip
    y = ops.channel_conv(x, plan, residual=residual, relu=relu, bias_map=bias_map)
    return y.contiguous(memory_format=_memory_format(x))


channel_conv_op = torch.library.custom_op("sparse_ops::channel_conv", mutates_args=())(
    channel_conv_impl
)


@channel_conv_op.register_fake
def _(x, weight, bias, in_idx, out_idx, fill_idx, bias_map, residual, in_channels, out_channels,
      stride, padding, dilation, relu):  # fmt: skip
    kernel = weight.shape[1:3]
    oh, ow = launch.conv_output_size(x.shape[2], x.shape[3], kernel, stride, padding, dilation)
    shape = (x.shape[0], out_channels, oh, ow)
    return x.new_empty(shape).contiguous(memory_format=_memory_format(x))


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
    pack = GroupPack(values, val_ptr, row_idx, row_ptr, col_idx, col_code, col_ptr, tile_group,
                     tile_row, fill_idx, bias, in_channels, out_channels, tuple(kernel_size),
                     tuple(stride), tuple(padding), tuple(dilation), block_n, k_pad, col_run,
                     groups_meta={"max_cols": max_cols}, validate=False)  # fmt: skip
    y = ops.group_conv(x, pack, residual=residual, relu=relu)
    return y.contiguous(memory_format=_memory_format(x))


group_conv_op = torch.library.custom_op("sparse_ops::group_conv", mutates_args=())(group_conv_impl)


@group_conv_op.register_fake
def _(x, values, val_ptr, row_idx, row_ptr, col_idx, col_code, col_ptr, tile_group, tile_row,
      fill_idx, bias, residual, in_channels, out_channels, kernel_size, stride, padding,
      dilation, block_n, k_pad, col_run, max_cols, relu):  # fmt: skip
    oh, ow = launch.conv_output_size(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    shape = (x.shape[0], out_channels, oh, ow)
    return x.new_empty(shape).contiguous(memory_format=_memory_format(x))


# ---------------------------------------------------------------------- loading checks
#
# ``from_state`` reads what a (possibly crafted) file says. Every config value and tensor
# is checked before anything is built from it, so a bad file raises a FormatError
# naming the field instead of an IndexError deep inside a kernel, and no size read from
# a file allocates memory the file's own tensors do not account for.

MAX_CHANNELS = 1 << 24
MAX_KERNEL = 64
MAX_GEOMETRY = 1 << 12  # stride, padding, dilation
MAX_INPUT_HW = 1 << 14  # input_hw of a saved bias map
MAX_BLOCK = 1 << 12  # block_n, k_pad


def _where(config: dict) -> str:
    name = config.get("name") if isinstance(config, dict) else None
    return f"layer {name!r}" if isinstance(name, str) and name else "layer"


def _int(config: dict, key: str, low: int, high: int) -> int:
    value = config.get(key)
    if type(value) is not int or not low <= value <= high:
        raise FormatError(
            f"{_where(config)}: config {key!r} must be an int in [{low}, {high}], got {value!r}"
        )
    return value


def _pair_of(config: dict, key: str, low: int, high: int, optional: bool = False):
    value = config.get(key)
    if value is None and optional:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(type(v) is int and low <= v <= high for v in value)):  # fmt: skip
        raise FormatError(
            f"{_where(config)}: config {key!r} must be two ints in [{low}, {high}], got {value!r}"
        )
    return tuple(value)


def _col_run_of(config: dict, value):
    if value is not None and (type(value) is not int or value not in (1, COL_RUN)):
        raise FormatError(f"{_where(config)}: config col_run must be 1 or {COL_RUN}, got {value!r}")
    return value


def _flag(config: dict, key: str) -> bool:
    value = config.get(key)  # required: a missing flag would silently change the output
    if type(value) is not bool:
        raise FormatError(f"{_where(config)}: config {key!r} must be true or false")
    return value


def _name_of(config: dict) -> str:
    value = config.get("name", "")
    if not isinstance(value, str) or len(value) > 1024:
        raise FormatError("layer: config 'name' must be a string")
    return value


def _tensor(tensors: dict, config: dict, key: str, kind: str, dims: int, optional=False):
    """``tensors[key]``, checked to be ``kind`` ("float" / "int") with ``dims`` dims."""
    t = tensors.get(key)
    if t is None:
        if optional:
            return None
        raise FormatError(f"{_where(config)}: tensor {key!r} is missing")
    good = (
        t.dtype.is_floating_point
        if kind == "float"
        else (not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool)
    )
    if not good or t.dim() != dims:
        raise FormatError(
            f"{_where(config)}: tensor {key!r} must be a {dims}-D {kind} tensor, got "
            f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"
        )
    return t


def _exact_int32(t, config: dict, key: str):
    if t is not None and t.dtype != torch.int32:
        raise FormatError(f"{_where(config)}: tensor {key!r} must be int32, got {t.dtype}")
    return t


def _shape_is(t, shape: tuple, config: dict, key: str) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise FormatError(
            f"{_where(config)}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
        )


def _stray(tensors: dict, config: dict, known) -> None:
    """No tensor the unit does not have, and (files that list them) exactly those listed:
    optional tensors (a bias) would otherwise go missing without a word."""
    extra = sorted(set(tensors) - set(known))
    if extra:
        raise FormatError(f"{_where(config)}: unexpected tensors {extra[:8]}")
    listed = config.get("tensors")
    if listed is None:
        return  # written before the list was kept
    if not isinstance(listed, list):
        raise FormatError(f"{_where(config)}: config 'tensors' must be a list of names")
    if sorted(map(str, listed)) != sorted(tensors):
        missing = sorted(set(map(str, listed)) - set(tensors))
        raise FormatError(
            f"{_where(config)}: the file lists tensors {listing(sorted(map(str, listed)))} but "
            f"holds {listing(sorted(tensors))}; missing {listing(missing)}"
        )


def _checked(build, config: dict):
    """Run ``build()``; the format checks inside raise FormatError, anything else a file
    can provoke (a shape torch refuses) is reported the same way, naming the layer."""
    try:
        return build()
    except FormatError as exc:
        raise FormatError(f"{_where(config)}: {exc}") from None
    except (IndexError, KeyError, RuntimeError, TypeError, ValueError, ZeroDivisionError) as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise FormatError(f"{_where(config)}: inconsistent tensors ({line})") from None


def _geometry_of(config: dict) -> dict:
    return {
        "stride": _pair_of(config, "stride", 1, MAX_GEOMETRY),
        "padding": _pair_of(config, "padding", 0, MAX_GEOMETRY),
        "dilation": _pair_of(config, "dilation", 1, MAX_GEOMETRY),
    }


# ---------------------------------------------------------------------- modules


def _fp32(t: Tensor | None) -> Tensor | None:
    """Biases stay fp32 for the kernels even after ``module.half()``."""
    return t if t is None or t.dtype == torch.float32 else t.float()


def _version_of(t: Tensor | None) -> int | None:
    """In-place updates seen so far; inference tensors (a module built under
    ``torch.inference_mode``) keep no counter, and change only by replacement."""
    return None if t is None or t.is_inference() else t._version


class _Unit(nn.Module):
    """Shared plumbing: buffers that may be None, a JSON config, state for saving."""

    _buffer_names: tuple[str, ...] = ()

    def _set_buffers(self, tensors: dict[str, Tensor | None]) -> None:
        for name in self._buffer_names:
            value = tensors.get(name)
            if value is not None:
                # Canonical strides: a contiguous tensor may carry any stride on a size-1
                # dimension, and CPU conv kernels pick different paths on that, so a module
                # and its saved-and-loaded copy would round differently.
                value = value.detach().clone(memory_format=torch.contiguous_format)
            self.register_buffer(name, value)

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {n: getattr(self, n) for n in self._buffer_names if getattr(self, n) is not None}
        return tensors, dict(self.config(), format_version=FORMAT_VERSION, tensors=sorted(tensors))

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], config: dict[str, Any]):
        raise NotImplementedError

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(f"{type(self).__name__} is an inference module (eval only)")
        return super().train(False)


class ChannelPrunedConv2d(_Unit):
    _buffer_names = ("weight", "bias", "in_idx", "out_idx", "fill_idx", "const_weight",
                     "const_values", "bias_map")  # fmt: skip

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
        self._set_buffers({
            "weight": plan.weight, "bias": plan.bias, "in_idx": plan.in_idx,
            "out_idx": plan.out_idx, "fill_idx": plan.fill_idx, "const_weight": const_weight,
            "const_values": const_values, "bias_map": bias_map,
        })  # fmt: skip
        self.eval()

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (int(self.weight.shape[1]), int(self.weight.shape[2]))

    @property
    def plan(self) -> ChannelPlan:
        return ChannelPlan(self.weight, self.bias, self.in_idx, self.out_idx, self.fill_idx,
                           self.in_channels, self.out_channels, self.stride, self.padding,
                           self.dilation)  # fmt: skip

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
        if _plain_eager_call(x, residual, b["weight"], b["bias"], bias_map):
            # What channel_conv_impl does, on a plan kept between calls.
            y = ops.channel_conv(x, self._eager_plan(), residual=residual, relu=self.relu,
                                 bias_map=_fp32(bias_map))  # fmt: skip
            return y.contiguous(memory_format=torch.channels_last)
        return channel_conv_op(
            x, self.weight, _fp32(self.bias), self.in_idx, self.out_idx, self.fill_idx,
            _fp32(bias_map), residual, self.in_channels, self.out_channels,
            list(self.stride), list(self.padding), list(self.dilation), self.relu,
        )  # fmt: skip

    def _eager_plan(self) -> ChannelPlan:
        """The unit's plan, rebuilt only when a buffer was replaced (``.to()``, loading)."""
        b = self._buffers
        tensors = (b["weight"], b["bias"], b["in_idx"], b["out_idx"], b["fill_idx"])
        # The bias's version too: after .half() the plan holds an fp32 copy of it, which
        # an in-place update of the buffer (load_state_dict) would not reach.
        version = _version_of(tensors[1])
        cached = self.__dict__.get("_plan_cache")
        if (cached is None or cached[1] != version
                or any(a is not c for a, c in zip(cached[0], tensors, strict=True))):  # fmt: skip
            plan = ChannelPlan(tensors[0], _fp32(tensors[1]), *tensors[2:], self.in_channels,
                               self.out_channels, tuple(self.stride), tuple(self.padding),
                               tuple(self.dilation), validate=False)  # fmt: skip
            cached = self.__dict__["_plan_cache"] = (tensors, version, plan)
        return cached[2]

    def config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "stride": list(self.stride), "padding": list(self.padding),
            "dilation": list(self.dilation), "relu": self.relu, "name": self.name,
            "input_hw": list(self.input_hw) if self.input_hw else None,
        }  # fmt: skip

    @classmethod
    def from_state(cls, tensors, config):
        _name_of(config)
        cin = _int(config, "in_channels", 1, MAX_CHANNELS)
        cout = _int(config, "out_channels", 1, MAX_CHANNELS)
        geometry = _geometry_of(config)
        input_hw = _pair_of(config, "input_hw", 1, MAX_INPUT_HW, optional=True)
        _stray(tensors, config, cls._buffer_names)
        weight = _tensor(tensors, config, "weight", "float", 4)
        bias = _tensor(tensors, config, "bias", "float", 1, optional=True)
        idx = {k: _exact_int32(_tensor(tensors, config, k, "int", 1, optional=True), config, k)
               for k in ("in_idx", "out_idx", "fill_idx")}  # fmt: skip
        rows, kh, kw, ins = weight.shape
        if not (1 <= kh <= MAX_KERNEL and 1 <= kw <= MAX_KERNEL):
            raise FormatError(f"{_where(config)}: kernel {kh}×{kw} out of range")
        _shape_is(idx["in_idx"], (ins,), config, "in_idx")
        _shape_is(idx["out_idx"], (rows,), config, "out_idx")
        if idx["in_idx"] is None and ins != cin:
            raise FormatError(f"{_where(config)}: weight reads {ins} of {cin} inputs, no in_idx")
        filled = 0 if idx["fill_idx"] is None else idx["fill_idx"].numel()
        if rows + filled != cout:
            raise FormatError(f"{_where(config)}: {rows} rows + {filled} filled ≠ {cout}")
        _shape_is(bias, (cout,), config, "bias")
        const_weight = _tensor(tensors, config, "const_weight", "float", 4, optional=True)
        const_values = _tensor(tensors, config, "const_values", "float", 1, optional=True)
        bias_map = _tensor(tensors, config, "bias_map", "float", 3, optional=True)
        if (const_weight is None) != (const_values is None):
            raise FormatError(f"{_where(config)}: const_weight and const_values come together")
        if const_weight is not None:
            _shape_is(const_weight, (cout, const_values.numel(), kh, kw), config, "const_weight")
        if bias_map is not None:
            if const_weight is None or input_hw is None:
                raise FormatError(f"{_where(config)}: bias_map without constants and input_hw")
            oh, ow = launch.conv_output_size(*input_hw, (kh, kw), geometry["stride"],
                                             geometry["padding"], geometry["dilation"])  # fmt: skip
            _shape_is(bias_map, (cout, oh, ow), config, "bias_map")

        def build():
            plan = ChannelPlan(weight, bias, idx["in_idx"], idx["out_idx"], idx["fill_idx"],
                               cin, cout, **geometry)  # fmt: skip
            # No input_hw here: the saved bias map is used as it is. Recomputing it would
            # cost memory quadratic in a number the file states; without a saved map the
            # unit computes one per input size on its first call.
            unit = cls(plan, relu=_flag(config, "relu"), const_weight=const_weight,
                       const_values=const_values, name=_name_of(config))  # fmt: skip
            if bias_map is not None or const_weight is None:
                unit.input_hw = input_hw
            if bias_map is not None:
                unit.bias_map = bias_map.detach().clone(memory_format=torch.contiguous_format)
            return unit

        return _checked(build, config)

    def extra_repr(self) -> str:
        rows = self.weight.shape[0]
        ins = self.weight.shape[3]
        bits = [f"{ins}/{self.in_channels} in", f"{rows}/{self.out_channels} out",
                f"k={self.kernel_size}", f"s={self.stride}", f"p={self.padding}"]  # fmt: skip
        if self.dilation != (1, 1):
            bits.append(f"d={self.dilation}")
        if self.const_weight is not None:
            bits.append(f"bias_map from {self.const_weight.shape[1]} constant channels")
        if self.relu:
            bits.append("relu")
        return ", ".join(bits)


_PACK_FIELDS = ("values", "val_ptr", "row_idx", "row_ptr", "col_idx", "col_code", "col_ptr",
                "tile_group", "tile_row", "fill_idx", "bias")  # fmt: skip


_BUFFERS_OF = {prefix: tuple(f"{prefix}_{f}" for f in _PACK_FIELDS) for prefix in ("main", "left")}


class GroupSparseConv2d(_Unit):
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
        self.left_block = ((leftover.block_n, leftover.k_pad, leftover.col_run)
                           if leftover is not None else None)  # fmt: skip
        tensors = {f"main_{f}": getattr(pack, f) for f in _PACK_FIELDS}
        if leftover is not None:
            tensors.update({f"left_{f}": getattr(leftover, f) for f in _PACK_FIELDS})
        self._set_buffers(tensors)
        self.groups_meta = dict(pack.groups_meta)
        self.left_groups_meta = dict(leftover.groups_meta) if leftover is not None else {}
        # Host-side ints, so a forward never reads index arrays back from the GPU.
        self.max_cols = {"main": pack.max_cols,
                         "left": leftover.max_cols if leftover is not None else 0}  # fmt: skip
        self.eval()

    def _run(self, x: Tensor, prefix: str, block: tuple[int, int, int], residual, relu) -> Tensor:
        buffers = self._buffers  # not getattr: nn.Module's __getattr__ costs per lookup
        t = [buffers[name] for name in _BUFFERS_OF[prefix]]
        if _plain_eager_call(x, residual, t[0], t[-1]):
            # What group_conv_impl does, on a pack kept between calls.
            y = ops.group_conv(x, self._eager_pack(prefix, t, block), residual=residual,
                               relu=relu)  # fmt: skip
            return y.contiguous(memory_format=torch.channels_last)
        return group_conv_op(
            x, *t[:-1], _fp32(t[-1]), residual, self.in_channels, self.out_channels,
            list(self.kernel_size), list(self.stride), list(self.padding), list(self.dilation),
            *block, self.max_cols[prefix], relu,
        )  # fmt: skip

    def _eager_pack(self, prefix: str, tensors: list[Tensor], block) -> GroupPack:
        """Pack ``prefix``, rebuilt only when a buffer was replaced (``.to()``, loading)."""
        caches = self.__dict__.setdefault("_pack_cache", {})
        cached = caches.get(prefix)
        # The bias's version (see ChannelPrunedConv2d._eager_plan) and the values': the
        # torch path keeps weights prepared from them on the pack, and a leftover pack
        # has no bias whose version a load_state_dict would bump.
        version = (_version_of(tensors[0]), _version_of(tensors[-1]))
        if (cached is None or cached[1] != version
                or any(a is not c for a, c in zip(cached[0], tensors, strict=True))):  # fmt: skip
            pack = GroupPack(*tensors[:-1], _fp32(tensors[-1]), self.in_channels,
                             self.out_channels, tuple(self.kernel_size), tuple(self.stride),
                             tuple(self.padding), tuple(self.dilation), *block,
                             groups_meta={"max_cols": self.max_cols[prefix]},
                             validate=False)  # fmt: skip
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
        return GroupPack(*[getattr(self, f"{which}_{f}") for f in _PACK_FIELDS],
                         self.in_channels, self.out_channels, tuple(self.kernel_size),
                         tuple(self.stride), tuple(self.padding), tuple(self.dilation),
                         *block, groups_meta={"max_cols": self.max_cols[which]})  # fmt: skip

    def config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size), "stride": list(self.stride),
            "padding": list(self.padding), "dilation": list(self.dilation),
            "block_n": self.block_n, "k_pad": self.k_pad, "col_run": self.col_run,
            "relu": self.relu, "name": self.name,
            "leftover": list(self.left_block) if self.left_block else None,
            "groups_meta": self.groups_meta, "left_groups_meta": self.left_groups_meta,
        }  # fmt: skip

    @classmethod
    def from_state(cls, tensors, config):
        _name_of(config)
        cin = _int(config, "in_channels", 1, MAX_CHANNELS)
        cout = _int(config, "out_channels", 1, MAX_CHANNELS)
        kernel = _pair_of(config, "kernel_size", 1, MAX_KERNEL)
        geometry = _geometry_of(config)
        # col_run: absent in GroupPack version-1 files (derived from the columns then).
        block = (_int(config, "block_n", 1, MAX_BLOCK), _int(config, "k_pad", 1, MAX_BLOCK),
                 _col_run_of(config, config.get("col_run")))  # fmt: skip
        left = config.get("leftover")
        if isinstance(left, list) and len(left) == 3:  # [block_n, k_pad, col_run]
            left_block = (*_pair_of({**config, "leftover": left[:2]}, "leftover", 1, MAX_BLOCK),
                          _col_run_of(config, left[2]))  # fmt: skip
        else:
            left_block = _pair_of(config, "leftover", 1, MAX_BLOCK, optional=True)
            left_block = None if left_block is None else (*left_block, None)
        prefixes = ("main", "left") if left_block else ("main",)
        _stray(tensors, config, [f"{p}_{f}" for p in prefixes for f in _PACK_FIELDS])
        for prefix in prefixes:  # the dtypes and sizes the launcher requires
            _tensor(tensors, config, f"{prefix}_values", "float", 1)
            bias = _tensor(tensors, config, f"{prefix}_bias", "float", 1, optional=True)
            _shape_is(bias, (cout,), config, f"{prefix}_bias")
            for f in _PACK_FIELDS[1:-1]:
                t = _tensor(tensors, config, f"{prefix}_{f}", "int", 1,
                            optional=f == "col_code")  # fmt: skip
                if t is None:
                    continue
                if t.dtype != (torch.int64 if f == "val_ptr" else torch.int32):
                    raise FormatError(
                        f"{_where(config)}: tensor '{prefix}_{f}' has dtype {t.dtype}"
                    )

        def pack(prefix, block, key):
            meta = config.get(key, {})
            if not isinstance(meta, dict):
                raise FormatError(f"config {key!r} must be an object")
            # Files without a pack's meta (older writers) get max_cols read off col_ptr;
            # without col_code or col_run (GroupPack version 1) both are derived.
            packed = GroupPack(*[tensors.get(f"{prefix}_{f}") for f in _PACK_FIELDS],
                               cin, cout, kernel, geometry["stride"], geometry["padding"],
                               geometry["dilation"], *block, groups_meta=meta)  # fmt: skip
            # The kernel loops to max_cols: a file may not claim more (or fewer) columns
            # than its widest group has.
            ptr = packed.col_ptr
            widest = int((ptr[1:] - ptr[:-1]).max()) if ptr.numel() > 1 else 0
            if packed.max_cols != widest:
                raise FormatError(
                    f"{prefix} pack: groups_meta max_cols {packed.max_cols} ≠ widest group {widest}"
                )
            return packed

        def build():
            leftover = pack("left", left_block, "left_groups_meta") if left_block else None
            main = pack("main", block, "groups_meta")
            return cls(main, relu=_flag(config, "relu"), leftover=leftover,
                       name=_name_of(config))  # fmt: skip

        return _checked(build, config)

    def extra_repr(self) -> str:
        groups = int(self.main_row_ptr.numel()) - 1
        bits = [f"{self.in_channels}→{self.out_channels}", f"{groups} groups",
                f"k={self.kernel_size}", f"s={self.stride}", f"p={self.padding}"]  # fmt: skip
        if self.has_leftover:
            bits.append("+ leftover nonzeros")
        if self.relu:
            bits.append("relu")
        return ", ".join(bits)


class TorchConv2d(_Unit):
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
        return {"stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "relu": self.relu,
                "name": self.name}  # fmt: skip

    @classmethod
    def from_state(cls, tensors, config):
        geometry = _geometry_of(config)
        groups = _int(config, "groups", 1, MAX_CHANNELS)
        _stray(tensors, config, cls._buffer_names)
        weight = _tensor(tensors, config, "weight", "float", 4)
        bias = _tensor(tensors, config, "bias", "float", 1, optional=True)
        if weight.shape[0] % groups or not all(1 <= k <= MAX_KERNEL for k in weight.shape[2:]):
            raise FormatError(
                f"{_where(config)}: weight {tuple(weight.shape)} does not fit groups={groups}"
            )
        _shape_is(bias, (weight.shape[0],), config, "bias")
        return _checked(lambda: cls(weight, bias, **geometry, groups=groups,
                                    relu=_flag(config, "relu"), name=_name_of(config)),
                        config)  # fmt: skip

    def extra_repr(self) -> str:
        out, per_group = self.weight.shape[:2]
        return f"{per_group * self.groups}→{out}, groups={self.groups}" + (
            ", relu" if self.relu else ""
        )


class Relayout(_Unit):
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
            raise FormatError(
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
        _stray(tensors, config, cls._buffer_names)
        index = _tensor(tensors, config, "index", "int", 1)
        fill = _tensor(tensors, config, "fill", "float", 1)
        _shape_is(fill, tuple(index.shape), config, "fill")
        if index.numel() and not -1 <= int(index.min()) <= int(index.max()) < MAX_CHANNELS:
            raise FormatError(
                f"{_where(config)}: Relayout index values must lie in [-1, {MAX_CHANNELS}), "
                f"found {int(index.min())}..{int(index.max())}"
            )
        return _checked(lambda: cls(index, fill, name=_name_of(config)), config)

    def extra_repr(self) -> str:
        kept = int((self.index >= 0).sum())
        return f"{kept} of {self.index.numel()} channels gathered, the rest constant"


UNITS = {
    cls.__name__: cls for cls in (ChannelPrunedConv2d, GroupSparseConv2d, TorchConv2d, Relayout)
}
