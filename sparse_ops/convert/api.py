"""The :func:`convert` entry point: check the arguments, trace, run the passes, tune.

The steps themselves live elsewhere: the checks and the masked dense network in
``prepare.py``, tracing with registered module types kept whole in ``rules``, the passes
in ``build.py``, the per-module fallback (when torch.fx cannot trace) in ``fallback.py``,
and timing in ``tune.py``. This module only orders them and assembles the report.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..structure.regroup import RegroupConfig
from ..tickets import Ticket
from .build import build
from .cost import MODES, ON_UNSTRUCTURED, CostModel
from .fallback import replace_modules
from .prepare import (
    ConvertError,
    check_masked_modules,
    check_model,
    check_trace_follows_the_model,
    example_input,
    explicit_padding,
    masked_model,
)
from .report import ConversionReport
from .rules import Tracer
from .tune import TuneOptions, tune_network


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
            explicit_padding(conv)
    check_masked_modules(dense, masks)
    cost = cost or CostModel.for_device(device)
    try:
        traced = fx.GraphModule(dense, Tracer().trace(dense))
    except Exception as exc:  # tracing failed: fall back to per-module replacement
        module, report = replace_modules(dense, masks, mode, dtype, example, exc)
    else:
        check_trace_follows_the_model(dense, traced, example)
        module, ctx = build(
            traced,
            example,
            masks,
            layouts,
            mode=mode,
            on_unstructured=on_unstructured,
            dtype=dtype,
            cost=cost,
            regroup=regroup,
        )
        notes = dict(ctx.notes)
        notes["narrowed_activations"] = sum(
            1
            for node, layout in ctx.layout.items()
            if node.op != "placeholder" and layout.numel() < ctx.const[node].numel()
        )
        report = ConversionReport(
            mode, on_unstructured, True, tuple(example.shape), ctx.rows, notes, cost.channel_align
        )
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

        module, record = tune_network(
            module,
            ctx,
            tune,
            target,
            tune_options or TuneOptions(),
            baselines,
            dtype or torch.float32,
        )
        module.sparse_ops_tuning = record
        report.notes["tuning"] = record
    module.eval()
    return (module, report) if return_report else module
