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

This package file only re-exports; where each part lives:

* ``api.py``: :func:`convert` itself; ``prepare.py``: checks on the model and its
  trace, :func:`masked_model`; ``fallback.py``: the per-module replacement;
* ``build.py``: the passes over the traced graph (``context.py``: their shared state;
  ``patterns.py``: conv chains fused into one unit; ``units.py``: the units built;
  ``inplace.py``: in-place ops made explicit); ``rules/``: what each op does to channels;
* ``cost.py``: :class:`CostModel`; ``tune.py`` and ``measure.py``: ``convert(tune=...)``;
* ``report.py``: :class:`ConversionReport`;
* ``serialize.py``: :func:`save_converted` / :func:`load_converted` (graph encoding in
  ``graph_writer.py`` and ``graph_reader.py``, the file's contract in
  ``saved_format.py``).
"""

from __future__ import annotations

from .api import convert
from .cost import MODES, ON_UNSTRUCTURED, CostModel
from .prepare import ConvertError, masked_model
from .report import ConversionReport
from .rules import Rule, register_module_rule, unregister_module_rule
from .serialize import SaveError, load_converted, save_converted
from .tune import TuneOptions

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
