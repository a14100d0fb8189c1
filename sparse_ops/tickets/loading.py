"""Loading a ticket from whatever it arrives as: a file in any recognised layout, an
open_lth level directory, a loaded checkpoint dict or a live module.

The layout is read from the content (:func:`.checkpoint_io.sniff`, then the
importers), never from the file name, and nothing is unpickled that could run code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from .. import checkpoint_io, importers
from ..errors import TicketFormatError
from .ticket import Ticket, from_imported
from .ticket_file import CONVERTED_FORMAT_NAME, FORMAT_NAME, read_ticket_file


def load_ticket(source: str | os.PathLike | nn.Module | Mapping, arch: str | None = None) -> Ticket:
    """Read a ticket from a file, directory, loaded checkpoint dict or live module.

    The layout is detected from the content (see :mod:`sparse_ops.importers` for the
    list). With ``arch``, the ticket is checked against that architecture and any
    mismatch (missing/unexpected keys, shapes) raises a clear error.
    Loading never executes code.
    """
    if isinstance(source, nn.Module):
        return Ticket.from_module(source, arch)
    if isinstance(source, Mapping):
        return from_imported(importers.from_object(source, "<dict>"), "<dict>", arch)
    return from_imported(_import_path(Path(source)), str(source), arch)


def _import_path(path: Path) -> importers.Imported:
    if not path.exists():
        raise TicketFormatError(f"{path}: no such file or directory")
    if path.is_dir():
        imported = importers.from_open_lth_level(path)
    else:
        kind = checkpoint_io.sniff(path)
        if kind == checkpoint_io.SAFETENSORS:
            tensors, metadata = checkpoint_io.read_safetensors(path)
            if metadata.get("format") == FORMAT_NAME:
                imported = read_ticket_file(path, tensors, metadata)
            elif metadata.get("format") == CONVERTED_FORMAT_NAME:
                raise TicketFormatError(
                    f"{path}: a converted module, not a ticket; load it with "
                    "sparse_ops.load_converted (its masks are compiled into packed layers)"
                )
            else:
                imported = importers.from_state_dict(tensors, str(path))
        elif kind in (checkpoint_io.TORCH_ZIP, checkpoint_io.TORCH_LEGACY):
            if path.name == "mask.pth" and any(path.parent.glob("model_ep*_it*.pth")):
                imported = importers.from_open_lth_level(path.parent)
            else:
                imported = importers.from_object(checkpoint_io.load_torch(path), str(path))
        elif kind == checkpoint_io.PICKLE:
            raise TicketFormatError(
                f"{path}: a plain Python pickle, not a torch or safetensors checkpoint; "
                "refusing to unpickle it (that would execute code)"
            )
        else:
            raise TicketFormatError(
                f"{path}: unrecognised file format (recognised: {importers.recognised_formats()})"
            )
    imported.meta["source"] = str(path)
    return imported
