"""Exception types.

Every error a user can cause with bad input derives from :class:`SparseOpsError`
(a ``ValueError``), carries a one-line message naming the file, key or layer at
fault, and makes the ``sparse-ops`` CLI exit with status 2.
"""

from __future__ import annotations


class SparseOpsError(ValueError):
    """Base class: bad input detected by sparse_ops."""


class TicketFormatError(SparseOpsError):
    """A checkpoint that cannot be read: unknown layout, corrupt, truncated or unsafe."""


class TicketMismatchError(SparseOpsError):
    """A ticket that is inconsistent in itself or does not fit an architecture."""


class UnknownArchitectureError(SparseOpsError):
    """An architecture name the registry does not know."""
