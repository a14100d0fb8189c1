"""Models whose BatchNorm layers are not the identity, shared by the converter tests: folded
biases and the constant outputs of pruned channels (bias maps) are then not zero."""

from __future__ import annotations

import torch
from torch import nn

from sparse_ops import models


def perturb_batchnorm(model: nn.Module, scale: bool = True) -> nn.Module:
    """Random running statistics and shifts (and, with ``scale``, affine weights), in
    place; the model in eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                if scale:
                    m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)  # many pruned channels become nonzero constants
    return model.eval()


def trained_like(arch: str, seed: int = 0, scale: bool = True) -> nn.Module:
    """Built-in architecture ``arch`` as if trained, as far as folding can tell."""
    torch.manual_seed(seed)
    return perturb_batchnorm(models.create(arch), scale)
