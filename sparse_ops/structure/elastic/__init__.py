"""Elastic lottery tickets (E-LTH): stretch or squeeze a ticket to another depth.

The Elastic Lottery Ticket Hypothesis (Chen et al., NeurIPS 2021) turns the ticket of
one network into a ticket of a deeper (*stretch*) or shallower (*squeeze*) network of
the same family, without running IMP again:

* Both networks have the same *stages*: a stem, stages of blocks (residual blocks;
  for VGG the convs between two poolings), a classifier. Only the number of blocks
  per stage differs.
* The stem, the classifier and the first block of every stage (the block that
  changes resolution or width) are copied unchanged.
* Inside each stage a *mapping* ``source block → target blocks`` says where every
  source block's masks **and** weights go: trained and rewind weights, BN affine
  parameters, running statistics and ``num_batches_tracked``. Replicas are exact
  clones. Source blocks mapped nowhere are dropped. Sparsity is not renormalised:
  every layer keeps its mask, so its density.

A mapping is a named strategy (:data:`STRATEGIES`, built for any pair of stage depths
by :func:`named_mapping`) or a string in open_lth/E-LTH's syntax ``src:tgt[,tgt];…``
(:func:`parse_mapping`), e.g. ResNet-32 → 56 ``0:0;1:1,2;2:3,4;3:5,6;4:7,8``. One
mapping applies to every stage alike; stages that need different ones take one each,
joined by ``|``. With ``random_extra=True`` (the paper's control) each *extra* copy,
that is every target after the first one listed for a source block, gets its masks
shuffled within the layer: same number of kept weights, other positions; its weights
stay copied.

The stage/block structure is read from the instantiated model (:func:`arch_layout`),
not from hand-written tables. A block is a child of an ``nn.Sequential`` *trunk* that
contains convs. A new stage starts at each trunk, after a pooling layer, and at a
block that changes resolution or width. Depth is the only thing that may change:
another family, block type (basic vs bottleneck) or width is an :class:`ElasticError`.

:mod:`.mapping` holds the mapping language, :mod:`.layout` reads the stages,
:mod:`.report` the records of what was done, :mod:`.transfer` the transform itself.
"""

from ...errors import BlockMappingError, ElasticError
from .layout import ArchLayout, arch_layout, check_compatible
from .mapping import (
    STRATEGIES,
    StageMapping,
    named_mapping,
    parse_mapping,
    parse_stage_mapping,
    resolve_mapping,
)
from .report import ElasticReport, LayerCopy, StageChange
from .transfer import transform

__all__ = [
    "STRATEGIES",
    "ArchLayout",
    "BlockMappingError",
    "ElasticError",
    "ElasticReport",
    "LayerCopy",
    "StageChange",
    "StageMapping",
    "arch_layout",
    "check_compatible",
    "named_mapping",
    "parse_mapping",
    "parse_stage_mapping",
    "resolve_mapping",
    "transform",
]
