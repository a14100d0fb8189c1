"""The ``sparse-ops`` command (also ``python -m sparse_ops``).

Every subcommand takes ``--json`` (one JSON object on stdout instead of tables). Bad
input prints one line, ``sparse-ops: error: ...``, on stderr and exits with status 2.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

from ..errors import USER_ERRORS, printable
from .arguments import COMMAND_GROUP, build_parser

__all__ = ["COMMAND_GROUP", "build_parser", "main"]


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, like errors: the source line means nothing to a CLI user."""
    print(f"sparse-ops: warning: {printable(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores the global hook on the way out
            warnings.showwarning = _show_warning
            return args.handler(args)
    except USER_ERRORS as exc:
        print(f"sparse-ops: error: {printable(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co: not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep interpreter exit quiet
        return 0
    except OSError as exc:  # an output path we cannot write, a full disk, ...
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"sparse-ops: error: {printable(f'{where}{exc.strerror or exc}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparse-ops: interrupted", file=sys.stderr)
        return 130
