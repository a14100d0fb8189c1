"""Reading a unit's saved config and tensors, as a (possibly crafted) file states them.

Every config value and tensor is checked before anything is built from it, so a bad file
raises a UnitFormatError naming the layer and field instead of an IndexError deep inside a
kernel, and no size read from a file allocates memory the file's own tensors do not
account for."""

from __future__ import annotations

import torch

from sparse_ops_kernels.formats import COL_RUN, FormatError

from ..errors import UnitFormatError, listing

MAX_CHANNELS = 1 << 24


MAX_KERNEL = 64


MAX_GEOMETRY = 1 << 12  # stride, padding, dilation


MAX_INPUT_HW = 1 << 14  # input_hw of a saved bias map


MAX_BLOCK = 1 << 12  # block_n, k_pad


def where(config: dict) -> str:
    name = config.get("name") if isinstance(config, dict) else None
    return f"layer {name!r}" if isinstance(name, str) and name else "layer"


def int_field(config: dict, key: str, low: int, high: int) -> int:
    value = config.get(key)
    if type(value) is not int or not low <= value <= high:
        raise UnitFormatError(
            f"{where(config)}: config {key!r} must be an int in [{low}, {high}], got {value!r}"
        )
    return value


def pair_field(config: dict, key: str, low: int, high: int, optional: bool = False):
    value = config.get(key)
    if value is None and optional:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(type(v) is int and low <= v <= high for v in value)
    ):
        raise UnitFormatError(
            f"{where(config)}: config {key!r} must be two ints in [{low}, {high}], got {value!r}"
        )
    return tuple(value)


def col_run_field(config: dict, value):
    if value is not None and (type(value) is not int or value not in (1, COL_RUN)):
        raise UnitFormatError(
            f"{where(config)}: config col_run must be 1 or {COL_RUN}, got {value!r}"
        )
    return value


def flag_field(config: dict, key: str) -> bool:
    value = config.get(key)  # required: a missing flag would silently change the output
    if type(value) is not bool:
        raise UnitFormatError(f"{where(config)}: config {key!r} must be true or false")
    return value


def name_field(config: dict) -> str:
    value = config.get("name", "")
    if not isinstance(value, str) or len(value) > 1024:
        raise UnitFormatError("layer: config 'name' must be a string")
    return value


def tensor_field(tensors: dict, config: dict, key: str, kind: str, dims: int, optional=False):
    """``tensors[key]``, checked to be ``kind`` ("float" / "int") with ``dims`` dims."""
    t = tensors.get(key)
    if t is None:
        if optional:
            return None
        raise UnitFormatError(f"{where(config)}: tensor {key!r} is missing")
    good = (
        t.dtype.is_floating_point
        if kind == "float"
        else (not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool)
    )
    if not good or t.dim() != dims:
        raise UnitFormatError(
            f"{where(config)}: tensor {key!r} must be a {dims}-D {kind} tensor, got "
            f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"
        )
    return t


def exact_int32(t, config: dict, key: str):
    if t is not None and t.dtype != torch.int32:
        raise UnitFormatError(f"{where(config)}: tensor {key!r} must be int32, got {t.dtype}")
    return t


def check_shape(t, shape: tuple, config: dict, key: str) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise UnitFormatError(
            f"{where(config)}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
        )


def check_tensor_names(tensors: dict, config: dict, known) -> None:
    """No tensor the unit does not have, and (files that list them) exactly those listed:
    optional tensors (a bias) would otherwise go missing without a word."""
    extra = sorted(set(tensors) - set(known))
    if extra:
        raise UnitFormatError(f"{where(config)}: unexpected tensors {extra[:8]}")
    listed = config.get("tensors")
    if listed is None:
        return  # written before the list was kept
    if not isinstance(listed, list):
        raise UnitFormatError(f"{where(config)}: config 'tensors' must be a list of names")
    if sorted(map(str, listed)) != sorted(tensors):
        missing = sorted(set(map(str, listed)) - set(tensors))
        raise UnitFormatError(
            f"{where(config)}: the file lists tensors {listing(sorted(map(str, listed)))} but "
            f"holds {listing(sorted(tensors))}; missing {listing(missing)}"
        )


def checked(build, config: dict):
    """Run ``build()``; the format checks inside raise FormatError, anything else a file
    can provoke (a shape torch refuses) is reported the same way, naming the layer."""
    try:
        return build()
    except FormatError as exc:
        raise UnitFormatError(f"{where(config)}: {exc}") from None
    except (IndexError, KeyError, RuntimeError, TypeError, ValueError, ZeroDivisionError) as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UnitFormatError(f"{where(config)}: inconsistent tensors ({line})") from None


def geometry_fields(config: dict) -> dict:
    return {
        "stride": pair_field(config, "stride", 1, MAX_GEOMETRY),
        "padding": pair_field(config, "padding", 0, MAX_GEOMETRY),
        "dilation": pair_field(config, "dilation", 1, MAX_GEOMETRY),
    }


def conv_fields(config: dict) -> tuple[int, int, dict]:
    """``(in_channels, out_channels, geometry)`` of a conv unit's config, checked (the
    name too, so every message after this can quote it)."""
    name_field(config)
    cin = int_field(config, "in_channels", 1, MAX_CHANNELS)
    cout = int_field(config, "out_channels", 1, MAX_CHANNELS)
    return cin, cout, geometry_fields(config)
