"""The structuring methods by name: the one registry IMP (``post=``), ``restructure`` and
the CLI read.

``resolve(name, options)`` returns ``step(ticket, model) -> ticket`` (``model`` may be
None where a method needs none), or None for ``None``/``"none"``. Options are checked
here, before any training, not after IMP's first round.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import SparseOpsError
from ..tickets.ticket import Ticket

METHODS = ("refill", "refill+", "regroup")
Step = Callable[[Ticket, nn.Module | None], Ticket]


class MethodError(SparseOpsError, ValueError):
    """An unknown structuring method, or options it does not take."""


def resolve(method: str | Step | None, options: dict[str, Any] | None = None) -> Step | None:
    """``None``/``"none"``, one of :data:`METHODS`, or a callable (returned as is)."""
    options = dict(options or {})
    if method is None or method == "none":
        if options:
            raise MethodError(f"post options {sorted(options)} given without a post method")
        return None
    if callable(method):
        return method
    from .refill import refill
    from .regroup import RegroupConfig, regroup

    if method in ("refill", "refill+"):
        if method == "refill+":
            options.setdefault("extra", 0.1)
            if options["extra"] <= 0:
                raise MethodError("refill+ needs extra > 0 (the share of pruned channels refilled)")
        _check_refill_options(options)
        return lambda t, m: refill(t, model=m, **options)
    if method == "regroup":
        config = RegroupConfig(**options)
        return lambda t, m: regroup(t, config, model=m)
    raise MethodError(f"unknown post-processing {method!r}; choose from none, {', '.join(METHODS)}")


def _check_refill_options(options: dict[str, Any]) -> None:
    from .refill import ACTIVATION_CRITERIA, CRITERIA, refill

    allowed = set(inspect.signature(refill).parameters) - {"ticket", "model"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise MethodError(f"unknown refill options {unknown}; refill takes {sorted(allowed)}")
    criterion = options.get("criterion", "l1")
    if criterion not in CRITERIA:
        raise MethodError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if criterion in ACTIVATION_CRITERIA and options.get("batch") is None:
        raise MethodError(
            f"criterion {criterion!r} ranks channels by activations: pass "
            "post_options={'batch': (inputs, targets)}"
        )
