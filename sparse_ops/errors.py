"""Exception types.

Errors a user causes with bad input derive from :class:`SparseOpsError` (a
``ValueError``) and carry a one-line message naming the file, key or layer at fault;
the ``sparse-ops`` CLI prints that line and exits with status 2 (as it does for output
paths it cannot write). The kernels package's ``KernelInputError`` (a launcher's check,
or a ``FormatError``: a packed format that contradicts itself, a version it does not
read, a weight that cannot be packed as asked) is a user error too, handled alike
(:data:`USER_ERRORS`): it cannot derive from ``SparseOpsError``, because the kernels
import nothing from sparse_ops. Anything else escaping is a bug in sparse_ops.
"""

from __future__ import annotations

from sparse_ops_kernels.errors import KernelInputError
from sparse_ops_kernels.formats import FormatError


class SparseOpsError(ValueError):
    """Base class: bad input detected by sparse_ops."""


USER_ERRORS = (SparseOpsError, KernelInputError)


class PackingError(SparseOpsError, FormatError):
    """A weight, mask or group layout that cannot be packed as asked (``sparse_ops.packing``,
    ``sparse_ops.layouts``). Both a ``SparseOpsError``, like every error of the converter,
    and the kernels' ``FormatError``."""


class UnitFormatError(SparseOpsError, FormatError):
    """A converted unit's stored state that does not hold together: a saved config or
    tensor out of range, or an index that does not fit the input it is asked to read.
    Both a ``SparseOpsError`` and the kernels' ``FormatError``."""


class TicketFormatError(SparseOpsError):
    """A checkpoint that cannot be read: unknown layout, corrupt, truncated or unsafe."""


class TicketMismatchError(SparseOpsError):
    """A ticket that is inconsistent in itself or does not fit an architecture."""


class UnknownArchitectureError(SparseOpsError):
    """An architecture name the registry does not know."""


class OutputPathError(SparseOpsError):
    """A path a result cannot be written to: a directory, a device, a missing parent."""


class ElasticError(SparseOpsError):
    """An elastic (E-LTH) depth transform that cannot be done: other family, width, ..."""


class BlockMappingError(ElasticError):
    """A block mapping that cannot be parsed or does not fit the stages it is applied to."""


def printable(text: object) -> str:
    """``text`` with control and format characters escaped as ``repr`` would (``\\n``,
    ``\\x1b``, ``\\u202e``): names read from files reach a terminal only this way, so a
    file cannot add lines to an error or send escape sequences. Other characters,
    non-ASCII letters and symbols included, stay as they are."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def listing(items, limit: int = 8) -> str:
    """``'a', 'b', 'c' and 12 more`` for error messages."""
    items = [str(i) for i in items]
    if not items:
        return "(none)"
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, cut at 300 characters, for one-line
    errors that quote a library's own message."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    line = lines[0]
    return line if len(line) <= 300 else line[:299] + "…"
