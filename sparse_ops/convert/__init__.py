"""Convert a network + ticket into an eval-only module running our kernels.

    fast = sparse_ops.convert(model, ticket, mode="auto")
    fast(x)  # == masked_model(model, ticket)(x), up to float rounding

What happens (``docs/CONVERT.md`` has the details):

* BatchNorm folded into the preceding conv; the ReLU and residual add after it fused
  into the conv's epilogue, wherever the traced graph allows;
* each conv becomes a ``ChannelPrunedConv2d`` (dense or channel-pruned), a
  ``GroupSparseConv2d`` (group-wise) or a ``TorchConv2d`` (grouped/depthwise convs).
  ``mode`` picks the representation: ``"channel"``, ``"group"`` or ``"auto"`` (the
  cheapest per layer under :class:`CostModel`);
* pruned channels are physically removed from activations where every consumer allows
  it. Channels tied by residual adds share one layout, and constant channels feeding
  a conv become its bias map;
* masks the mode cannot run follow ``on_unstructured``: ``"error"``, ``"dense"``
  (masked dense conv) or ``"regroup"`` (regrouped, plus an exact pack of leftovers).

If torch.fx cannot trace the model, each masked conv is replaced in place (no folding,
no fusion) and the report says so.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from sparse_ops_kernels.formats import ChannelPlan

from ..nn import ChannelPrunedConv2d, TorchConv2d
from ..packing import pack_channels
from ..structure.regroup import RegroupConfig
from ..tables import format_table
from ..tickets import Ticket
from . import rules
from .build import build
from .context import LayerRow
from .cost import MODES, ON_UNSTRUCTURED, CostModel
from .prepare import ConvertError, check_model, example_input, masked_model
from .rules import Rule, register_module_rule, unregister_module_rule
from .serialize import SaveError, load_converted, save_converted
from .tune import TuneOptions, tune_network, tuning_table

__all__ = [
    "MODES",
    "ON_UNSTRUCTURED",
    "ConversionReport",
    "ConvertError",
    "CostModel",
    "Rule",
    "SaveError",
    "TuneOptions",
    "convert",
    "load_converted",
    "masked_model",
    "register_module_rule",
    "save_converted",
    "unregister_module_rule",
]


@dataclass
class ConversionReport:
    mode: str
    on_unstructured: str
    traced: bool
    input_shape: tuple[int, ...]
    layers: list[LayerRow]
    notes: dict[str, Any] = field(default_factory=dict)
    channel_align: int = 1  # the CostModel's (docs/CONVERT.md, "Channel alignment")

    @property
    def flops_dense(self) -> int:
        return sum(r.flops_dense for r in self.layers)

    @property
    def flops_after(self) -> int:
        """The useful work: multiply-adds of kept weights on non-constant inputs, the same
        whatever the channel alignment."""
        return sum(r.flops_after for r in self.layers)

    @property
    def flops_kernel(self) -> int:
        """The work the units' GEMMs really do: ``flops_after`` plus zero-weight rows and
        columns (channel alignment) and group tiles' padding."""
        return sum(r.flops_after if r.flops_kernel is None else r.flops_kernel
                   for r in self.layers)  # fmt: skip

    @property
    def params_stored(self) -> int:
        """Weights the units store, zero-weight padding included."""
        return sum(r.params_after if r.params_stored is None else r.params_stored
                   for r in self.layers)  # fmt: skip

    @property
    def alignment(self) -> tuple[int, int]:
        """``(aligned, total)`` channel units: aligned ones read and write only 16-byte
        aligned rows, without gather or scatter (the GPU kernel's vector-copy path)."""
        units = [r for r in self.layers if "aligned" in r.detail]
        return sum(1 for r in units if r.detail["aligned"]), len(units)

    @property
    def params_dense(self) -> int:
        return sum(r.params_dense for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "on_unstructured": self.on_unstructured,
            "traced": self.traced,
            "input_shape": list(self.input_shape),
            "flops_dense": self.flops_dense,
            "flops_after": self.flops_after,
            "flops_ratio": self.flops_after / self.flops_dense if self.flops_dense else 1.0,
            "params_dense": self.params_dense,
            "params_after": self.params_after,
            "flops_kernel": self.flops_kernel,
            "params_stored": self.params_stored,
            "channel_align": self.channel_align,
            "aligned_channel_units": self.alignment[0],
            "channel_units": self.alignment[1],
            "notes": self.notes,
            "layers": [
                {**{k: getattr(r, k) for k in r.__dataclass_fields__ if k != "detail"}, **r.detail}
                for r in self.layers
            ],
        }

    def render(self) -> str:
        rows = [
            [
                r.name,
                r.structure,
                r.representation,
                r.flops_dense / 1e6,
                r.flops_after / 1e6,
                r.params_dense,
                r.params_after,
            ]
            for r in self.layers
        ]
        table = format_table(
            ["layer", "mask", "runs as", "MFLOPs before", "after", "params before", "after"],
            rows, align="lllrrrr",
        )  # fmt: skip
        ratio = self.flops_after / self.flops_dense if self.flops_dense else 1.0
        lines = [
            table,
            "",
            f"total: {self.flops_dense / 1e6:.1f} → {self.flops_after / 1e6:.1f} MFLOPs per "
            f"input of shape {tuple(self.input_shape[1:])} ({100 * ratio:.1f}% of dense); "
            f"{self.params_dense:,} → {self.params_after:,} conv/linear weights",
        ]
        if self.flops_kernel != self.flops_after:
            lines.append(
                f"GEMM work with zero-weight padding (alignment, tiles): "
                f"{self.flops_kernel / 1e6:.1f} MFLOPs, {self.params_stored:,} weights stored"
            )
        aligned, units = self.alignment
        if units:
            lines.append(
                f"aligned: {aligned} of {units} channel units read and write 16-byte aligned "
                f"rows without gather/scatter (channel_align={self.channel_align})"
            )
        counts = [f"{v} {k.replace('_', ' ')}" for k, v in self.notes.items() if isinstance(v, int)]
        if counts:
            lines.append("fused: " + ", ".join(counts))
        if not self.traced:
            lines.append(f"NOTE: {self.notes.get('fallback')}")
        if isinstance(self.notes.get("tuning"), dict):
            lines += ["", tuning_table(self.layers, self.notes["tuning"])]
        return "\n".join(lines)


def convert(
    model: nn.Module,
    ticket: Ticket | None = None,
    mode: str = "auto",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    on_unstructured: str = "error",
    *,
    input_size: tuple[int, int, int] | None = None,
    cost: CostModel | None = None,
    regroup: RegroupConfig | None = None,
    tune: torch.Tensor | None = None,
    tune_options: TuneOptions | None = None,
    return_report: bool = False,
):
    """Return an eval-only module computing ``masked_model(model, ticket)`` with our units.

    ``model`` must be in eval mode. ``ticket`` supplies masks (and weights, if it has
    any); without one, the model's own pruning hooks or zeros are used. ``input_size``
    (C, H, W) is the input shape the conversion is sized for (bias maps are precomputed
    for it; other sizes work too). It defaults to the architecture's, else 3×32×32.
    ``regroup`` configures ``on_unstructured="regroup"``. ``cost`` prices the
    representations for ``mode="auto"``; by default :meth:`CostModel.for_device` of
    ``device``, and without a device the GPU's, because a converted module is usually
    moved to the GPU afterwards (pass ``device="cpu"`` for CPU inference). With
    ``return_report=True`` returns ``(module, ConversionReport)``.

    ``tune`` (an example input batch): time every representation the mode allows for
    each conv on ``device`` (default: the example's) at that shape and keep the fastest,
    then check the whole network against the BatchNorm-folded dense and the narrowed
    network and fall back layer by layer while it is slower (:mod:`.tune`;
    ``tune_options``: :class:`TuneOptions`). Decisions and timings are in the report
    (each row's ``detail["tuning"]``, ``notes["tuning"]``) and the module's
    ``sparse_ops_tuning`` attribute, which :func:`save_converted` keeps.
    """
    check_model(model)
    if mode not in MODES:
        raise ConvertError(f"mode must be one of {MODES}, got {mode!r}")
    if on_unstructured not in ON_UNSTRUCTURED:
        raise ConvertError(
            f"on_unstructured must be one of {ON_UNSTRUCTURED}, got {on_unstructured!r}"
        )
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConvertError(
            f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}"
        )
    if tune is not None and not torch.is_tensor(tune):
        raise ConvertError(f"tune must be an example input tensor, got {type(tune).__name__}")
    if tune is not None and tune.dim() < 2:
        raise ConvertError(
            f"tune: the example input needs a batch dimension, got {tuple(tune.shape)}"
        )
    if ticket is None:
        from ..tickets import load_ticket

        ticket = load_ticket(model)
    if tune is not None and input_size is None:
        input_size = tuple(tune.shape[1:])
    dense = masked_model(model, ticket).cpu().float()
    example = example_input(dense, ticket.arch, input_size)
    masks = {k: v for k, v in ticket.masks.items()}
    layouts = {k.removesuffix(".weight"): v for k, v in ticket.meta.get("groups", {}).items()}
    for conv in dense.modules():  # dense is our private copy: safe to rewrite
        if type(conv) is nn.Conv2d:
            _explicit_padding(conv)
    _check_masked_modules(dense, masks)
    cost = cost or CostModel.for_device(device)
    try:
        traced = fx.GraphModule(dense, rules.Tracer().trace(dense))
    except Exception as exc:  # tracing failed: fall back to per-module replacement
        module, report = _replace_modules(dense, masks, mode, dtype, example, exc)
    else:
        _check_trace_follows_the_model(dense, traced, example)
        module, ctx = build(traced, example, masks, layouts, mode=mode,
                            on_unstructured=on_unstructured, dtype=dtype, cost=cost,
                            regroup=regroup)  # fmt: skip
        notes = dict(ctx.notes)
        notes["narrowed_activations"] = sum(
            1 for node, layout in ctx.layout.items()
            if node.op != "placeholder" and layout.numel() < ctx.const[node].numel()
        )  # fmt: skip
        report = ConversionReport(mode, on_unstructured, True, tuple(example.shape), ctx.rows,
                                  notes, cost.channel_align)  # fmt: skip
    if device is not None:
        module = module.to(device)
    if tune is not None and not report.traced:
        report.notes["tuning"] = "skipped: the model was converted module by module"
    elif tune is not None:
        target = torch.device(device) if device is not None else tune.device
        module = module.to(target)

        def baselines() -> dict[str, nn.Module]:
            size = {"dtype": dtype, "device": target, "input_size": input_size}
            unmasked = Ticket({}, ticket.weights, ticket.arch)
            return {
                "folded": convert(model, unmasked, mode="channel", **size),
                "narrow": convert(model, ticket, mode="channel", on_unstructured="dense", **size),
            }

        module, record = tune_network(module, ctx, tune, target, tune_options or TuneOptions(),
                                      baselines, dtype or torch.float32)  # fmt: skip
        module.sparse_ops_tuning = record
        report.notes["tuning"] = record
    module.eval()
    return (module, report) if return_report else module


def _check_trace_follows_the_model(model: nn.Module, traced: fx.GraphModule, example) -> None:
    """torch.fx records what a forward does to proxies, not always what it does to tensors:
    ``b = a; b += 1`` traces as an out-of-place add, so the graph misses that ``a``
    changed. Such a graph is refused rather than converted into a wrong module."""
    x = torch.randn(example.shape, generator=torch.Generator().manual_seed(0)).to(example)
    try:
        with torch.no_grad():
            expected = pytree.tree_leaves(model(x.clone()))
    except Exception:  # the model cannot run on this input: shape propagation says why
        return
    try:
        with torch.no_grad():
            got = pytree.tree_leaves(traced(x.clone()))
        same = len(expected) == len(got) and all(map(_same_value, expected, got))
    except (ValueError, RuntimeError):
        same = False
    if not same:
        raise ConvertError(
            "the model's torch.fx trace computes something else than the model itself on a "
            "random input (typically an in-place op on a second name of a tensor, as in "
            "`b = a; b += 1`, which fx records as `b = a + 1`); write the op out of place"
        )


def _same_value(a: Any, b: Any) -> bool:
    if not (torch.is_tensor(a) and torch.is_tensor(b)):
        return torch.is_tensor(a) == torch.is_tensor(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    scale = float(a.abs().nan_to_num(posinf=0.0, neginf=0.0).max()) if a.numel() else 0.0
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, scale), equal_nan=True)


def _check_masked_modules(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """A mask on a layer type we cannot run is an error naming it, and so is any conv
    (pruned or not: every conv becomes one of our units) whose padding we cannot run
    (after :func:`_explicit_padding`)."""
    modules = dict(model.named_modules())
    bad = []
    for name in masks:
        module = modules.get(name.rpartition(".")[0])
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            bad.append(f"{name.rpartition('.')[0]!r} ({type(module).__name__})")
    if bad:
        raise ConvertError(f"pruned layers of a type the converter cannot run: {', '.join(bad)}")
    for name, module in modules.items():
        if type(module) is nn.Conv2d and (
            module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            bad.append(f"{name!r} (padding={module.padding!r}, "
                       f"padding_mode={module.padding_mode!r})")  # fmt: skip
    if bad:
        raise ConvertError(
            f"convs the converter cannot run (zero padding of fixed size only): {', '.join(bad)}"
        )


def _explicit_padding(conv: nn.Conv2d) -> None:
    """``padding='valid'``/``'same'`` as the equal integer padding it means, where there is
    one (``'same'`` pads ``d·(k−1)`` in all, split unevenly when that is odd)."""
    if conv.padding == "valid":
        conv.padding = (0, 0)
    elif conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if all(t % 2 == 0 for t in totals):
            conv.padding = tuple(t // 2 for t in totals)


def _replace_modules(dense, masks, mode, dtype, example, exc):
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
        row = LayerRow(name, "conv", "replaced", type(unit).__name__, module.in_channels,
                       module.out_channels, 0, 0, w.numel(), kept)  # fmt: skip
        rows.append(row)
    if dtype is not None:
        model = model.to(dtype)
    reason = f"torch.fx could not trace the model ({type(exc).__name__}: {exc}); masked convs "
    reason += "replaced in place, BatchNorm not folded, nothing fused"
    report = ConversionReport(
        mode, "dense", False, tuple(example.shape), rows, {"fallback": reason}
    )
    return model.eval(), report
