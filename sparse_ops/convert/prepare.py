"""Before conversion: checks on the model and its trace, and the masked dense network the
converted module must equal."""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.nn.utils import prune

from ..errors import SparseOpsError, listing
from ..tickets import Ticket, unpruned_copy


class ConvertError(SparseOpsError):
    """A model/ticket pair that cannot be converted as asked."""


def _is_prune_hook(hook) -> bool:
    return isinstance(hook, prune.BasePruningMethod)


def check_model(model: nn.Module) -> None:
    """Eval mode, and no hooks the converted module could not honour."""
    if not isinstance(model, nn.Module):
        raise ConvertError(f"model must be an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ConvertError(
            "model is in training mode: call model.eval() first (conversion folds BatchNorm "
            "running statistics, which only eval mode uses)"
        )
    hooked = []
    for name, m in model.named_modules():
        pre = [h for h in m._forward_pre_hooks.values() if not _is_prune_hook(h)]
        if pre or m._forward_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None):
            hooked.append(name or type(model).__name__)
    if hooked:
        raise ConvertError(
            f"modules {listing(hooked)} carry forward/backward hooks, which the converted "
            "module would not run; remove them before converting"
        )


def masked_model(model: nn.Module, ticket: Ticket | None = None) -> nn.Module:
    """An eval-mode copy of ``model`` with the ticket's weights and masks multiplied in.

    This is the function a converted module must compute. Pruning re-parametrisations on
    ``model`` are folded (``weight = weight_orig × weight_mask``). With a ticket, its
    trained weights are loaded (if it has any) and its masks applied.
    """
    dense = unpruned_copy(model)
    if ticket is not None:
        try:
            ticket.apply(dense, "weights" if ticket.weights is not None else None, hooks=False)
        except SparseOpsError as exc:
            raise ConvertError(f"the ticket does not fit the model: {exc}") from None
    return dense.eval()


def example_input(model: nn.Module, arch: str | None, input_size, batch: int = 1) -> torch.Tensor:
    """A zero input of the model's expected shape (for shape propagation)."""
    if input_size is None:
        if arch is not None:
            from .. import models

            if models.is_known(arch):
                input_size = models.info(arch).input_size
        if input_size is None:
            input_size = (3, 32, 32)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros(batch, *tuple(input_size), device=device, dtype=dtype)


def check_trace_follows_the_model(model: nn.Module, traced: fx.GraphModule, example) -> None:
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


def check_masked_modules(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """A mask on a layer type we cannot run is an error naming it, and so is any conv
    (pruned or not: every conv becomes one of our units) whose padding we cannot run
    (after :func:`explicit_padding`)."""
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
            bad.append(
                f"{name!r} (padding={module.padding!r}, padding_mode={module.padding_mode!r})"
            )
    if bad:
        raise ConvertError(
            f"convs the converter cannot run (zero padding of fixed size only): {', '.join(bad)}"
        )


def explicit_padding(conv: nn.Conv2d) -> None:
    """``padding='valid'``/``'same'`` as the equal integer padding it means, where there is
    one (``'same'`` pads ``d·(k−1)`` in all, split unevenly when that is odd)."""
    if conv.padding == "valid":
        conv.padding = (0, 0)
    elif conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if all(t % 2 == 0 for t in totals):
            conv.padding = tuple(t // 2 for t in totals)
