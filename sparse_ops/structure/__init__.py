"""Structuring tickets: masks in, masks out.

* :func:`refill` — channel-wise (Refill, Refill+), :mod:`.refill`;
* :func:`regroup` — group-wise dense blocks with disjoint rows, :mod:`.regroup`;
* :func:`transform` — elastic (E-LTH) stretch/squeeze to another depth, :mod:`.elastic`.

Each returns a new :class:`~sparse_ops.Ticket` whose meta records the method, the
parameters and a per-layer report (``meta["structure_report"]``). :mod:`.methods` is
the registry of them by name that IMP, ``restructure`` and the CLI read.
"""

from ..layouts import Group, GroupLayout
from .elastic import (
    STRATEGIES,
    ElasticReport,
    StageMapping,
    arch_layout,
    named_mapping,
    parse_mapping,
    resolve_mapping,
    transform,
)
from .methods import METHODS, MethodError, resolve
from .refill import CRITERIA, RefillError, kept_channels, refill, refill_mask
from .regroup import RegroupConfig, RegroupError, regroup, regroup_mask
from .report import LayerChange, render_changes

__all__ = [
    "CRITERIA",
    "METHODS",
    "STRATEGIES",
    "ElasticReport",
    "Group",
    "GroupLayout",
    "LayerChange",
    "MethodError",
    "RefillError",
    "RegroupConfig",
    "RegroupError",
    "StageMapping",
    "arch_layout",
    "kept_channels",
    "named_mapping",
    "parse_mapping",
    "refill",
    "refill_mask",
    "regroup",
    "regroup_mask",
    "render_changes",
    "resolve",
    "resolve_mapping",
    "transform",
]
