"""Before conversion: checks on the model, and the masked dense network it must equal."""

from __future__ import annotations

import torch
from torch import nn
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
