"""sparse_ops: structurally sparse lottery tickets, structured, converted and made fast.

Importing this package touches no GPU and does not import Triton.
"""

from . import models
from .convert import ConversionReport, convert, load_converted, masked_model, save_converted
from .errors import (
    SparseOpsError,
    TicketFormatError,
    TicketMismatchError,
    UnknownArchitectureError,
)
from .masks import MaskStats, gemm_view, mask_stats
from .tickets import FORMAT_VERSION, Ticket, load_ticket

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "ConversionReport",
    "MaskStats",
    "SparseOpsError",
    "Ticket",
    "TicketFormatError",
    "TicketMismatchError",
    "UnknownArchitectureError",
    "__version__",
    "convert",
    "gemm_view",
    "load_converted",
    "load_ticket",
    "mask_stats",
    "masked_model",
    "models",
    "save_converted",
]
