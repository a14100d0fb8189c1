"""Errors the kernel launchers raise before launching anything."""


class KernelInputError(ValueError):
    """An input a kernel cannot take: wrong device, dtype, shape or format version."""
