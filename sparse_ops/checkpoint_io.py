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
import pickletools
import re
import stat
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import OutputPathError, TicketFormatError, first_line

# The output-file helpers, importable from here as well: bench/ and convert/ write
# through checkpoint_io.
from .output_files import TEMP_TAG as TEMP_TAG
from .output_files import atomic_output as atomic_output
from .output_files import check_output_file as check_output_file
from .output_files import temp_path as temp_path
from .output_files import write_text as write_text

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch-zip"
TORCH_LEGACY = "torch-legacy"
PICKLE = "pickle"
UNKNOWN = "unknown"

# torch.save's legacy (non-zip) stream starts with the pickled magic number
# 0x1950a86a20f9469cfc6c: a LONG1 opcode after the protocol header (and, from
# protocol 4 on, a FRAME opcode), whatever pickle_protocol the writer chose.
_LEGACY_MAGIC_LONG = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"

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
    "Bool",
    "Int8",
    "Int16",
    "Int32",
    "Int64",
    "UInt8",
    "UInt16",
    "UInt32",
    "UInt64",
    "Float16",
    "Float32",
    "Float64",
    "LongDouble",
    "Complex64",
    "Complex128",
)
_NUMPY_NUMERIC_DTYPES = {f"numpy.dtypes.{n}DType" for n in _NUMPY_NUMERIC_DTYPE_NAMES}


def check_input_file(path: str | os.PathLike, error: type[Exception] = TicketFormatError) -> None:
    """Refuse anything but a regular file before opening it: a FIFO would block the
    open forever, a device would stream endlessly, a directory cannot be read."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(mode)
            else "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        raise error(f"{path}: {kind}, not a checkpoint file")


def sniff(path: str | os.PathLike) -> str:
    """Identify a file by its first bytes: one of the module-level format constants."""
    check_input_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise TicketFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if head.startswith(b"PK\x03\x04"):
        return TORCH_ZIP
    if head[:1] == b"\x80" and _LEGACY_MAGIC_LONG in head[:24]:
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
    check_input_file(path)
    if sniff(path) == TORCH_LEGACY:
        _check_legacy(path)
    elif _check_zip(path):
        raise TicketFormatError(
            f"{path}: a TorchScript archive (torch.jit.save), not a checkpoint; load it with "
            "torch.jit.load and save its state_dict()"
        )
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "Weights only load failed" not in str(exc):
                raise
            needed = _unsafe_globals(path)
            refused = [g for g in needed if not _is_numpy_data(g)]
            if refused:
                raise _refusal(path, refused) from None
            if not needed:  # nothing unsafe named: an unsupported or damaged pickle
                hint = ""
                if sniff(path) == TORCH_LEGACY and "Unsupported operand" in str(exc):
                    hint = (
                        "; a legacy (non-zip) torch file written with pickle_protocol ≥ 4 "
                        "cannot be read without running code: re-save it with torch.save's "
                        "default format"
                    )
                raise TicketFormatError(
                    f"{path}: unsupported or corrupt torch file ({_weights_only_reason(exc)}){hint}"
                ) from None
            # The scan names the reconstructors; dtype classes show up only while loading.
            allowed = [
                _resolve(g) for g in sorted(set(needed) | _NUMPY_DATA_GLOBALS) if _resolvable(g)
            ] + _numeric_dtype_classes()
            with torch.serialization.safe_globals(allowed):
                try:
                    return torch.load(path, map_location="cpu", weights_only=True)
                except pickle.UnpicklingError as again:
                    raise TicketFormatError(
                        f"{path}: refusing to load: {_weights_only_reason(again)}"
                    ) from None
    except TicketFormatError:
        raise
    except Exception as exc:  # torch raises many types for damaged files
        raise TicketFormatError(
            f"{path}: truncated or corrupt torch file ({first_line(exc)})"
        ) from None


# What a zip may inflate to, beyond its own size: torch.save stores entries uncompressed,
# so a real checkpoint's entries add up to less than the file.
ZIP_SLACK_BYTES = 64 << 20


def _check_zip(path: Path) -> bool:
    """Check a torch zip before torch.load reads it; True if it is a TorchScript archive.

    The central directory's declared sizes are checked first (a few KB of deflated
    zeros can declare gigabytes, and torch would inflate them), then every entry is read
    once against its CRC-32 (torch does not check them: a damaged byte would load as a
    silently wrong weight)."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            declared = sum(info.file_size for info in infos)
            budget = 2 * os.path.getsize(path) + ZIP_SLACK_BYTES
            if declared > budget:
                big = max(infos, key=lambda info: info.file_size)
                raise TicketFormatError(
                    f"{path}: its zip entries declare {declared:,} bytes uncompressed "
                    f"({big.filename!r}: {big.file_size:,}), far more than the file holds; "
                    "refusing to inflate it"
                )
            damaged = archive.testzip()
            if damaged is not None:
                raise TicketFormatError(
                    f"{path}: zip entry {damaged!r} fails its CRC check: the file is damaged"
                )
    except zipfile.BadZipFile as exc:
        if sniff(path) == TORCH_ZIP:
            raise TicketFormatError(
                f"{path}: truncated or corrupt torch file (zip: {first_line(exc)})"
            ) from None
        return False  # the legacy format: not a zip, no CRCs to check
    except (OSError, EOFError, NotImplementedError, RuntimeError) as exc:
        raise TicketFormatError(
            f"{path}: truncated or corrupt torch file (zip: {first_line(exc)})"
        ) from None
    names = [info.filename for info in infos]
    return any(n.endswith(("/constants.pkl", "/code/__torch__.py")) or "/code/" in n for n in names)


_STORAGE_BYTES = {
    "Double": 8,
    "Float": 4,
    "Half": 2,
    "BFloat16": 2,
    "Long": 8,
    "Int": 4,
    "Short": 2,
    "Char": 1,
    "Byte": 1,
    "Bool": 1,
    "ComplexFloat": 8,
    "ComplexDouble": 16,
}


def _check_legacy(path: Path) -> None:
    """The legacy (non-zip) format has no directory: torch allocates each storage at the
    size its pickle declares, then reads the data. So the declared sizes are read off
    the pickle's opcodes first (nothing is executed) and must fit the file."""
    declared = _legacy_declared_bytes(path)
    budget = 2 * os.path.getsize(path) + ZIP_SLACK_BYTES
    if declared is not None and declared > budget:
        raise TicketFormatError(
            f"{path}: its storages declare {declared:,} bytes, far more than the file holds; "
            "refusing to load it"
        )


def _legacy_declared_bytes(path: Path) -> int | None:
    """Sum of the storage sizes the main pickle declares; None where the opcodes are not
    understood (then torch.load's own errors apply)."""
    mark = object()
    try:
        with open(path, "rb") as f:
            for _ in range(3):  # magic number, protocol version, sys info
                for _op in pickletools.genops(f):
                    pass
            stack: list[Any] = []
            memo: dict[Any, Any] = {}
            storages: dict[Any, int] = {}
            for op, arg, _pos in pickletools.genops(f):
                name = op.name
                if name == "MARK":
                    stack.append(mark)
                elif name in ("GLOBAL", "STACK_GLOBAL"):
                    if name == "STACK_GLOBAL":
                        module, attr = stack.pop(), stack.pop()
                        arg = f"{attr} {module}"
                    stack.append(("global", arg))
                elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                    memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    stack.append(memo.get(arg))
                elif name == "TUPLE":
                    at = len(stack) - 1 - stack[::-1].index(mark)
                    items = tuple(stack[at + 1 :])
                    del stack[at:]
                    stack.append(items)
                elif name in ("TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
                    n = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}.get(name, 0)
                    items = tuple(stack[len(stack) - n :])
                    del stack[len(stack) - n :]
                    stack.append(items)
                elif name == "BINPERSID":
                    pid = stack.pop()
                    if (
                        isinstance(pid, tuple)
                        and len(pid) >= 5
                        and pid[0] == "storage"
                        and isinstance(pid[4], int)
                    ):
                        kind = pid[1][1].rpartition(" ")[2] if isinstance(pid[1], tuple) else ""
                        size = _STORAGE_BYTES.get(kind.removesuffix("Storage"), 1)
                        storages[pid[2]] = pid[4] * size
                    stack.append(None)
                elif op.arg is not None and not op.stack_before and len(op.stack_after) == 1:
                    stack.append(arg)  # a constant
                else:
                    if pickletools.markobject in op.stack_before:
                        del stack[len(stack) - 1 - stack[::-1].index(mark) :]
                    else:
                        del stack[len(stack) - len(op.stack_before) :]
                    stack.extend([None] * len(op.stack_after))
    except (ValueError, IndexError, KeyError, TypeError, EOFError, OSError):
        return None
    return sum(storages.values())


def _weights_only_reason(exc: BaseException) -> str:
    """The unpickler's own explanation, without torch's generic advice around it."""
    match = re.search(r"WeightsUnpickler error: (.+?)(?:\n\n|$)", str(exc), re.S)
    return " ".join((match[1] if match else first_line(exc)).split())[:300]


def _refusal(path: Path, refused: list[str]) -> TicketFormatError:
    return TicketFormatError(
        f"{path}: refusing to load: it pickles {', '.join(refused)}, and unpickling that "
        "would execute code. Re-save it with only tensors, dicts, lists and numbers "
        "(e.g. torch.save(model.state_dict(), ...))"
    )


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on the CPU) and the string metadata of a safetensors file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    check_input_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise TicketFormatError(
            f"{path}: truncated or corrupt safetensors file ({first_line(exc)})"
        ) from None
    return tensors, metadata


_TORCH_SUFFIXES = (".pt", ".pth", ".tar", ".ckpt", ".bin")


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write atomically (temp file + rename) so an interrupted save never leaves half a file.

    Raises :class:`OutputPathError` naming ``path`` when it cannot hold a file."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    check_output_file(path)
    if path.suffix.lower() in _TORCH_SUFFIXES:
        warnings.warn(
            f"{path}: written as safetensors; a {path.suffix} name suggests a torch.save file, "
            "which torch.load cannot read this as (sparse-ops reads it by content)",
            stacklevel=3,
        )
    # safetensors refuses views and shared storage: give it one compact copy of each.
    owned = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_output(path) as tmp:
        try:
            save_file(owned, str(tmp), metadata=metadata)
        except SafetensorError as exc:
            raise OutputPathError(f"{path}: cannot write ({first_line(exc)})") from None


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
