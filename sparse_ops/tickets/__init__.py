"""Tickets: binary masks over conv/linear weights, with the weights they belong to.

* :mod:`.ticket` — the :class:`Ticket` type;
* :mod:`.ticket_file` — our safetensors file format (``format_version``);
* :mod:`.loading` — :func:`load_ticket`, from any recognised layout;
* :mod:`.fitting` — checking a ticket against an architecture.
"""

from .fitting import maskable_weights, unpruned_copy
from .loading import load_ticket
from .ticket import Ticket
from .ticket_file import CONVERTED_FORMAT_NAME, FORMAT_NAME, FORMAT_VERSION

__all__ = [
    "CONVERTED_FORMAT_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Ticket",
    "load_ticket",
    "maskable_weights",
    "unpruned_copy",
]
