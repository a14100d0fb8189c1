"""What a saved converted file is: its format name and version, the error both ways
raise, and the names and paths it may hold.

Shared by the writer (``graph_writer.py``, which renames module paths until they pass
these checks, so that what saves also loads) and the reader (``graph_reader.py``, which
refuses anything else). The underscored names are for those two modules only.
"""

from __future__ import annotations

import keyword
import re
from typing import Any

from torch import fx

from ..errors import SparseOpsError
from ..tickets import CONVERTED_FORMAT_NAME

FORMAT_NAME = CONVERTED_FORMAT_NAME
FORMAT_VERSION = 1


class SaveError(SparseOpsError):
    """A converted module that cannot be saved, or a file that cannot be loaded."""


# Modules whose constructor's ``bias`` is a flag while the instance's is the tensor.
_BIAS_FLAG = frozenset({"Linear", "Conv2d", "LayerNorm"})


# The names a file may hold are the ones torch.fx can paste into the Python source it
# generates from the rebuilt graph (``graph_reader.py`` says where and why).
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
_INDEX = re.compile(r"(0|[1-9][0-9]{0,8})\Z")


def _is_name(text: Any) -> bool:
    """A plain identifier fx can paste into source and nn.Module can register: not a
    keyword, no leading double underscore (dunders reach into the interpreter), not an
    attribute GraphModule or nn.Module already has (``forward``, ``training``...)."""
    return (
        isinstance(text, str)
        and _IDENTIFIER.match(text) is not None
        and not keyword.iskeyword(text)
        and not keyword.issoftkeyword(text)
        and not text.startswith("__")
        and not hasattr(fx.GraphModule, text)
    )


def _is_path(text: Any) -> bool:
    """``layer1.0.conv1``: dotted names and decimal indices (Sequential children)."""
    if not isinstance(text, str) or not text or len(text) > 1024:
        return False
    parts = text.split(".")
    return all(_is_name(p) or _INDEX.match(p) for p in parts) and not _INDEX.match(parts[0])


def _short(value: Any, limit: int = 60) -> str:
    """A file's value in an error message: repr (no raw control characters), cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
