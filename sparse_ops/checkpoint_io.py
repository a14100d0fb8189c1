"""Reading checkpoint files without executing code.

Files are identified by their first bytes before anything is parsed:

* safetensors: an 8-byte little-endian header length, then a JSON object;
* ``torch.save`` zip archives (``PK\\x03\\x04``) and the legacy ``torch.save`` stream
  (a pickled magic number);
* anything else is refused, plain Python pickles included (unpickling runs code).

torch files are read with ``torch.load(weights_only=True)``, whose unpickler only
rebuilds tensors and plain containers. Research checkpoints often also hold numpy
scalars or arrays (accuracies, histories); the numpy globals that only rebuild numeric
data are allowed, named one by one below. Any other global is refused, naming it.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import torch

from .errors import TicketFormatError

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch-zip"
TORCH_LEGACY = "torch-legacy"
PICKLE = "pickle"
UNKNOWN = "unknown"

# torch.save's legacy (pre-1.6) stream starts with the pickled magic number
# 0x1950a86a20f9469cfc6c at protocol 2.
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"

# Globals that rebuild numeric numpy data and nothing else. Object arrays are not in
# the list: their elements would be arbitrary pickles.
_NUMPY_DATA_GLOBALS = {
    "numpy.dtype",
    "numpy.ndarray",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
}
_NUMPY_NUMERIC_DTYPE_NAMES = (
    "Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
    "Float16", "Float32", "Float64", "LongDouble", "Complex64", "Complex128",
)  # fmt: skip
_NUMPY_NUMERIC_DTYPES = {f"numpy.dtypes.{n}DType" for n in _NUMPY_NUMERIC_DTYPE_NAMES}


def sniff(path: str | os.PathLike) -> str:
    """Identify a file by its first bytes: one of the module-level format constants."""
    with open(path, "rb") as f:
        head = f.read(64)
        size = os.fstat(f.fileno()).st_size
    if head.startswith(b"PK\x03\x04"):
        return TORCH_ZIP
    if head.startswith(_LEGACY_MAGIC):
        return TORCH_LEGACY
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 8 + header_len <= size:
            return SAFETENSORS
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return PICKLE
    return UNKNOWN


def load_torch(path: str | os.PathLike) -> Any:
    """``torch.load`` a file on the CPU without executing code; clear errors otherwise."""
    path = Path(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "Weights only load failed" not in str(exc):
                raise
            needed = _unsafe_globals(path)
            if not (needed and all(_is_numpy_data(g) for g in needed)):
                raise _refusal(path, needed) from None
            # The scan names the reconstructors; dtype classes show up only while loading.
            allowed = [_resolve(g) for g in sorted(set(needed) | _NUMPY_DATA_GLOBALS)
                       if _resolvable(g)] + _numeric_dtype_classes()  # fmt: skip
            with torch.serialization.safe_globals(allowed):
                try:
                    return torch.load(path, map_location="cpu", weights_only=True)
                except pickle.UnpicklingError as again:
                    if "Weights only load failed" in str(again):
                        raise _refusal(path, needed) from None
                    raise
    except TicketFormatError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, struct.error,
            AttributeError, IndexError) as exc:  # fmt: skip
        raise TicketFormatError(
            f"{path}: truncated or corrupt torch file ({_first_line(exc)})"
        ) from None


def _refusal(path: Path, needed: list[str]) -> TicketFormatError:
    shown = ", ".join(needed) if needed else "objects outside tensors and plain containers"
    return TicketFormatError(
        f"{path}: refusing to load: it pickles {shown}, and unpickling those would "
        "execute code. Re-save it with only tensors, dicts, lists and numbers "
        "(e.g. torch.save(model.state_dict(), ...))"
    )


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on the CPU) and the string metadata of a safetensors file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise TicketFormatError(
            f"{path}: truncated or corrupt safetensors file ({_first_line(exc)})"
        ) from None
    return tensors, metadata


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write atomically (temp file + rename) so an interrupted save never leaves half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses views and shared storage: give it one compact copy of each.
    owned = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(owned, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy-format files cannot be scanned; report generically
        return []


def _is_numpy_data(name: str) -> bool:
    return name in _NUMPY_DATA_GLOBALS or name in _NUMPY_NUMERIC_DTYPES


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _resolvable(name: str) -> bool:
    """numpy 1 and 2 spell the reconstructors' module differently; skip the absent one."""
    try:
        _resolve(name)
    except (ImportError, AttributeError):
        return False
    return True


def _numeric_dtype_classes() -> list[type]:
    import numpy

    dtypes = getattr(numpy, "dtypes", None)  # numpy >= 1.25
    if dtypes is None:
        return []
    return [
        getattr(dtypes, f"{n}DType")
        for n in _NUMPY_NUMERIC_DTYPE_NAMES
        if hasattr(dtypes, f"{n}DType")
    ]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
