"""What the converter may choose between, and what it believes each choice costs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .prepare import ConvertError

MODES = ("auto", "channel", "group")
ON_UNSTRUCTURED = ("error", "dense", "regroup")


@dataclass(frozen=True)
class CostModel:
    """Predicted cost of one layer, in dense-FLOP equivalents, for ``mode='auto'``.

    channel: 2·rows·inputs·kh·kw·OH·OW (a smaller dense conv, no overhead).
    group:   2·Σ padded_rows·padded_cols·OH·OW × ``group_overhead``: per-column
             (ky, kx, c) gathers and tile padding cost about this much over a dense GEMM
             of the same size (a starting value; calibrate with bench/ results).
    The cheaper one is used; a channel-structured mask nearly always picks channel.

    The overhead depends on where the module runs (:meth:`for_device`): 1.3 for the
    Triton group kernel on a GPU (a starting value until GPU measurements calibrate
    it), 6 for the CPU torch path (one column gather + one GEMM per column set),
    measured on this project's CPU machine in the demo's tuning run: regroup layers at
    ~11% block density ran at 0.53–0.8 of oneDNN's dense conv with 32–64 channels
    (5–7× per useful multiply-add) and at 0.9–1.1 of it with 16 channels at 32×32
    (16-row groups, which the 32-row tile rounding prices at double). Measuring beats
    either number: ``convert(..., tune=x)``.

    **Channel alignment** (``docs/CONVERT.md``, "Channel alignment"). The GPU channel
    kernel uses 16-byte vector and asynchronous copies only where every row it reads or
    writes is 16-byte aligned: activation widths (the NHWC pixel stride) and the compact
    weight's input channels multiples of 8 elements at fp16/bf16, input read without a
    gather (``in_idx=None``), output written without a scatter (``out_idx=None``). With
    ``channel_align`` A > 1 the converter

    * rounds every narrowed activation's width up to a multiple of A by also storing
      channels it knows are constant there (when the tensor has that many channels);
    * lets a channel unit read its whole input layout, zero weight columns for the
      channels it does not use, when those are at most ``max_zero_inputs`` of the
      layout (or only fill the last 32-wide GEMM tile of the used ones);
    * lets a channel unit compute its whole output layout, zero weight rows for the
      channels no weight reaches, when those are at most ``max_zero_rows`` of the layout
      (or only fill the last 32-wide GEMM tile of the computed rows).

    ``channel_align=1`` (the CPU's) turns all three off: the layouts of before, which on
    a CPU are the fastest (zero rows and columns are real work for oneDNN).
    """

    group_overhead: float = 1.3
    block_n: int = 32
    k_pad: int = 32
    # 8 elements = 16 bytes at fp16/bf16 (fp32 needs only 4, so 8 serves every dtype).
    channel_align: int = 8
    # A gather costs scalar loads (and no cp.async pipelining) for the whole K loop, zero
    # columns only their fraction of extra MMA work: a quarter is a clear win.
    max_zero_inputs: float = 0.25
    # A scatter costs scalar stores once per output tile (the epilogue), zero rows their
    # fraction of extra MMA work in the K loop: the trade is narrower than on the input
    # side, so the limit is no larger. Starting values until GPU measurements calibrate
    # them, like group_overhead.
    max_zero_rows: float = 0.25

    def __post_init__(self) -> None:
        if not self.group_overhead > 0:
            raise ConvertError(f"CostModel.group_overhead must be > 0, got {self.group_overhead}")
        for name in ("block_n", "k_pad"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ConvertError(f"CostModel.{name} must be a power of two ≥ 16, got {value!r}")
        align = self.channel_align
        if isinstance(align, bool) or not isinstance(align, int) or align < 1:
            raise ConvertError(f"CostModel.channel_align must be an int ≥ 1, got {align!r}")
        for name in ("max_zero_inputs", "max_zero_rows"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConvertError(f"CostModel.{name} must lie in [0, 1], got {value!r}")

    @classmethod
    def for_device(cls, device: torch.device | str | None) -> CostModel:
        """The cost model for modules that run on ``device`` (None: a GPU)."""
        if device is not None and torch.device(device).type == "cpu":
            return cls(group_overhead=6.0, channel_align=1)
        return cls()


# The channel kernel's GEMM tiles are at least this wide in rows (BLOCK_N) and in input
# channels per K step (BLOCK_K): every tensor-core config in kernels/channel_conv.py has
# both ≥ 32 (the exact-fp32 "fma" configs step K by 16).
# Zero rows/columns that only fill the last tile the used ones occupy anyway cost no MMA
# work (the tile is computed whole, masked lanes as zeros). Were smaller tiles added, the
# cost would be at most one more 16-wide tile (tl.dot's smallest) on layers this narrow.
MIN_TILE = 32


def zero_padding_pays(width: int, used: int, max_fraction: float) -> bool:
    """Whether ``width − used`` zero-weight rows/columns (instead of a scatter/gather) are
    cheap enough: at most ``max_fraction`` of ``width``, or inside the last GEMM tile."""
    if used == 0:
        return False  # nothing to compute: no GEMM to pad
    extra = width - used
    return extra <= max_fraction * width or width <= -(-used // MIN_TILE) * MIN_TILE
