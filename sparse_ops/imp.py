"""Iterative magnitude pruning (IMP) with rewinding and structuring after each round.

One round: prune ``rate`` of the *remaining* weights by magnitude (globally over all
prunable layers, or per layer), optionally post-process the masks (``refill``,
``refill+``, ``regroup`` or your own function), rewind the weights to the captured
state, then train and evaluate. After ``k`` rounds of plain IMP the density is
``(1 - rate)^k`` (up to rounding per round).

Masks live on the model in the torch.nn.utils.prune convention (``weight_orig`` +
``weight_mask`` with a forward pre-hook), so pruning tools, checkpoints and
:func:`sparse_ops.load_ticket` all see them.

Prunable layers are every ``Conv2d`` and ``Linear`` weight minus ``exclude``. The default
excludes the stem (found by running the model: the first conv applied to the input,
whatever it is called; VGG's ``features.0`` included) and every ``Linear``, as in
Structure-LTH. Exclusions may be :data:`STEM`, :data:`CLASSIFIER`, a module type, an
exact module name, or a predicate ``f(name, module) -> bool``.

Usage::

    for ticket in imp.run(model, rounds=4, train_fn=train, eval_fn=test, post="regroup"):
        print(ticket.meta["round"], ticket.density, ticket.meta["accuracy"])

``train_fn(model, ctx)`` trains in place; ``ctx.round`` is the round (0 = dense), and
calling ``ctx.capture_rewind()`` during round 0 sets the rewind point (early-epoch
rewinding). Without that call the rewind point is the state before round 0.
``eval_fn(model)`` returns an accuracy or a dict of metrics.

Inside an initialised ``torch.distributed`` process group (``torchrun``), every rank
calls :func:`run` alike: the model starts from rank 0's state, rank 0 computes each
round's masks (and post-processing) and broadcasts them, so every rank holds the same
masks and yields the same tickets. Training data-parallel is ``train_fn``'s part (the
built-in :class:`sparse_ops.training.Trainer` wraps the model in DDP); see
:mod:`sparse_ops.distributed`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from . import distributed
from .errors import SparseOpsError
from .tickets.ticket import Ticket


class IMPError(SparseOpsError):
    """Bad IMP configuration."""


class _Selector:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"imp.{self.name.upper()}"


STEM = _Selector("stem")  # the first conv applied to the network input
CLASSIFIER = _Selector("classifier")  # the last Linear
DEFAULT_EXCLUDE: tuple = (STEM, nn.Linear)
SCOPES = ("global", "layer")

ExcludeItem = _Selector | type | str | Callable[[str, nn.Module], bool]


# ---------------------------------------------------------------------- layers


def find_stem(model: nn.Module, example_input: torch.Tensor | None = None) -> str:
    """Name of the first ``Conv2d`` the forward pass applies (the stem)."""
    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, _i, name=n: order.append(name))
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    if not handles:
        raise IMPError(f"{type(model).__name__} has no Conv2d, so it has no stem to exclude")
    param = next(model.parameters())
    x = example_input if example_input is not None else torch.zeros(1, 3, 32, 32)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x.to(param.device, param.dtype))
    except Exception as exc:
        raise IMPError(
            f"could not run {type(model).__name__} on an input of shape {tuple(x.shape)} to "
            f"find its stem ({type(exc).__name__}: {exc}); pass example_input="
        ) from None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return order[0]


def prunable(
    model: nn.Module,
    exclude: Iterable[ExcludeItem] = DEFAULT_EXCLUDE,
    example_input: torch.Tensor | None = None,
) -> list[str]:
    """Weight names (``"<module>.weight"``) of the Conv2d/Linear layers IMP prunes."""
    exclude = list(exclude)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    names = set(dict(model.named_modules()))
    unknown = [e for e in exclude if isinstance(e, str) and e not in names]
    if unknown:
        raise IMPError(f"exclude names no module of {type(model).__name__}: {unknown}")
    stem = find_stem(model, example_input) if STEM in exclude else None
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    classifier = linears[-1] if linears else None

    def excluded(name: str, module: nn.Module) -> bool:
        for e in exclude:
            if (e is STEM and name == stem) or (e is CLASSIFIER and name == classifier):
                return True
            if isinstance(e, type) and isinstance(module, e):
                return True
            if isinstance(e, str) and name == e:
                return True
            if callable(e) and not isinstance(e, type | _Selector) and e(name, module):
                return True
        return False

    chosen = [f"{n}.weight" for n, m in modules.items() if not excluded(n, m)]
    if not chosen:
        raise IMPError(f"every Conv2d/Linear of {type(model).__name__} is excluded")
    return chosen


# ---------------------------------------------------------------------- state and masks


def _module_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, param = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), param


def capture_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state with pruning pairs folded to plain names.

    Pruned parameters are captured from ``*_orig``: values under the mask are kept.
    """
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("_mask") and key[: -len("_mask")] + "_orig" in model.state_dict():
            continue
        plain = key[: -len("_orig")] if key.endswith("_orig") else key
        state[plain] = value.detach().clone()
    return state


def restore_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` (plain names) into ``model``, writing pruned params' ``*_orig``."""
    own = model.state_dict()
    missing = [k for k in own if not k.endswith("_mask") and k.removesuffix("_orig") not in state]
    if missing:
        raise IMPError(f"state lacks keys of the model: {missing[:6]}")
    with torch.no_grad():
        for key, target in own.items():
            if key.endswith("_mask") and key[: -len("_mask")] + "_orig" in own:
                continue
            target.copy_(state[key.removesuffix("_orig")])


def current_masks(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Bool masks of ``names`` (all ones where a layer carries no mask yet)."""
    out = {}
    for name in names:
        module, param = _module_of(model, name)
        mask = getattr(module, f"{param}_mask", None)
        weight = getattr(module, f"{param}_orig", getattr(module, param))
        out[name] = (mask if mask is not None else torch.ones_like(weight)).detach().bool().cpu()
    return out


def set_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Attach (or overwrite) masks the torch.nn.utils.prune way."""
    for name, mask in masks.items():
        module, param = _module_of(model, name)
        existing = getattr(module, f"{param}_mask", None)
        if existing is not None:
            with torch.no_grad():
                existing.copy_(mask.to(existing.device, existing.dtype))
            # Refresh the derived attribute now; the hook would do it on the next forward.
            setattr(module, param, getattr(module, f"{param}_orig") * existing)
        else:
            weight = getattr(module, param)
            prune.custom_from_mask(module, param, mask.to(weight.device))


def magnitude_masks(
    weights: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    rate: float,
    scope: str = "global",
) -> dict[str, torch.Tensor]:
    """Prune ``rate`` of the remaining weights with the smallest ``|w|``.

    ``scope="global"``: one threshold over all layers, ``round(rate × remaining)``
    weights pruned in total. ``"layer"``: each layer loses ``round(rate × its
    remaining)``. Ties are broken by position (layer order, then flat index), so
    results are deterministic.
    """
    _check_rate(rate)
    if scope not in SCOPES:
        raise IMPError(f"scope must be one of {SCOPES}, got {scope!r}")
    names = list(masks)
    if scope == "layer":
        out = {}
        for n in names:
            out.update(magnitude_masks({n: weights[n]}, {n: masks[n]}, rate, "global"))
        return out
    scores, owners = [], []
    for i, n in enumerate(names):
        keep = masks[n].reshape(-1)
        scores.append(weights[n].detach().reshape(-1).abs().float().cpu()[keep])
        owners.append(torch.full((int(keep.sum()),), i, dtype=torch.int32))
    flat = torch.cat(scores)
    n_prune = round(rate * flat.numel())
    order = torch.sort(flat, stable=True).indices[:n_prune]
    doomed = torch.zeros(flat.numel(), dtype=torch.bool)
    doomed[order] = True
    out, start = {}, 0
    for n, s in zip(names, scores, strict=True):
        new = masks[n].clone().reshape(-1)
        kept_positions = torch.nonzero(new).reshape(-1)
        new[kept_positions[doomed[start : start + s.numel()]]] = False
        out[n] = new.reshape(masks[n].shape)
        start += s.numel()
    return out


def _check_rate(rate: float) -> None:
    if not isinstance(rate, int | float) or not 0 < rate < 1:
        raise IMPError(f"rate must be in (0, 1), got {rate!r}")


# ---------------------------------------------------------------------- the loop


@dataclass
class RoundContext:
    """What ``train_fn`` gets besides the model."""

    round: int
    rounds: int
    _capture: Callable[[], None] = field(repr=False)

    def capture_rewind(self) -> None:
        """Make the model's current state the rewind point (round 0 only)."""
        if self.round != 0:
            raise IMPError("the rewind point can only be captured during round 0")
        self._capture()


PostFn = Callable[[Ticket, nn.Module], Ticket]


def resolve_post(post: str | PostFn | None, options: dict[str, Any] | None = None) -> PostFn | None:
    """``None``/``"none"``, ``"refill"``, ``"refill+"``, ``"regroup"`` or a callable
    (:func:`sparse_ops.structure.methods.resolve`, the one registry)."""
    from .structure import methods

    try:
        return methods.resolve(post, options)
    except methods.MethodError as exc:
        raise IMPError(str(exc)) from None


def run(
    model: nn.Module,
    rounds: int,
    train_fn: Callable[[nn.Module, RoundContext], Any],
    eval_fn: Callable[[nn.Module], float | dict],
    *,
    rate: float = 0.2,
    scope: str = "global",
    post: str | PostFn | None = None,
    post_options: dict[str, Any] | None = None,
    exclude: Iterable[ExcludeItem] = DEFAULT_EXCLUDE,
    example_input: torch.Tensor | None = None,
    arch: str | None = None,
) -> Iterator[Ticket]:
    """Run ``rounds`` rounds of IMP on ``model`` (in place); yield a Ticket per round.

    Round 0 trains the dense network; its ticket has all-ones masks. Every ticket
    carries the masks, the trained weights, the rewind weights and meta ``round``,
    ``density``, ``imp_density`` (before post-processing), ``accuracy`` / ``metrics``
    and, with post-processing, that step's ``structure_report`` (and ``groups``).
    """
    _check_rate(rate)
    if not isinstance(rounds, int) or rounds < 0:
        raise IMPError(f"rounds must be a non-negative int, got {rounds!r}")
    if scope not in SCOPES:
        raise IMPError(f"scope must be one of {SCOPES}, got {scope!r}")
    post_fn = resolve_post(post, post_options)
    post_name = post if isinstance(post, str) else ("custom" if post else "none")
    names = prunable(model, exclude, example_input)
    set_masks(model, {n: torch.ones_like(m) for n, m in current_masks(model, names).items()})
    # Inside a process group every rank starts from rank 0's state, so rewind points
    # (and everything computed from the weights) agree.
    distributed.broadcast_module_state(model)
    rewind = {"state": capture_state(model)}

    def capture() -> None:
        rewind["state"] = capture_state(model)

    base_meta = {"rate": rate, "scope": scope, "post": post_name, "rounds": rounds}
    for r in range(rounds + 1):
        imp_density = None
        structure_meta: dict[str, Any] = {}
        if r > 0:
            trained = capture_state(model)
            masks = current_masks(model, names)
            if distributed.is_main():  # rank 0 prunes (and structures) once for everyone
                masks, imp_density, structure_meta = _prune_round(
                    model, trained, masks, rewind["state"], rate, scope, post_fn, arch
                )
            masks = distributed.broadcast_masks(masks, names, like=masks)
            imp_density, structure_meta = distributed.broadcast_object(
                (imp_density, structure_meta)
            )
            restore_state(model, rewind["state"])
            set_masks(model, masks)
        train_fn(model, RoundContext(r, rounds, capture))
        result = eval_fn(model)
        if isinstance(result, bool) or not isinstance(result, (int, float, dict)):
            raise IMPError(
                f"eval_fn must return an accuracy (a number) or a dict of metrics, "
                f"got {type(result).__name__}"
            )
        metrics = dict(result) if isinstance(result, dict) else {"accuracy": float(result)}
        masks = current_masks(model, names)
        meta = dict(
            base_meta,
            round=r,
            density=_density(masks),
            imp_density=imp_density if imp_density is not None else _density(masks),
            accuracy=metrics.get("accuracy"),
            metrics=metrics,
            **structure_meta,
        )
        meta.setdefault("method", "imp" if r else "dense")
        yield Ticket(masks, capture_state(model), arch, meta, rewind=copy.copy(rewind["state"]))


def _prune_round(model, trained, masks, rewind, rate, scope, post_fn, arch):
    """One round's new masks: magnitude pruning, then the post-processing step."""
    names = list(masks)
    effective = {n: trained[n] * masks[n] for n in names}
    masks = magnitude_masks(effective, masks, rate, scope)
    imp_density = _density(masks)
    structure_meta: dict[str, Any] = {}
    if post_fn is not None:
        structured = post_fn(Ticket(masks, trained, arch, rewind=rewind), model)
        if not isinstance(structured, Ticket):
            raise IMPError(f"post must return a Ticket, got {type(structured).__name__}")
        masks = _checked_post_masks(structured, masks)
        structure_meta = {
            k: structured.meta[k]
            for k in ("method", "groups", "structure_report")
            if k in structured.meta
        }
    return masks, imp_density, structure_meta


def _density(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total


def _checked_post_masks(ticket: Ticket, before: dict[str, torch.Tensor]) -> dict:
    if set(ticket.masks) != set(before):
        raise IMPError(
            "post-processing must return masks for exactly the prunable layers; got "
            f"{sorted(set(ticket.masks) ^ set(before))[:6]} differing"
        )
    bad = [n for n in before if ticket.masks[n].shape != before[n].shape]
    if bad:
        raise IMPError(f"post-processing changed mask shapes of {bad[:6]}")
    return dict(ticket.masks)
