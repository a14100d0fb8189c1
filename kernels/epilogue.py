"""The fused epilogue both conv kernels end with (device functions, not kernels).

Math. For a tile of output pixels ``m = (n, oh, ow)`` and output channels ``out_ch``:

    y[m, out_ch] = cast( relu?( acc[m, ·] + bias[out_ch] + bmap[out_ch, oh, ow]
                                + res[m, out_ch] ) )

Shapes and layout: ``acc`` [BLOCK_M, BLOCK_N] float32; ``out_ch`` [BLOCK_N] int32
channel numbers (only read where ``col_mask``); ``y`` and ``res`` [N, C, OH, OW]
logical with strides passed explicitly; ``bias`` [C] float32; ``bmap`` [C, OH, OW]
float32. Each addend is a constexpr feature flag, so a disabled one costs nothing and
its pointer is never dereferenced.

Every addend is added in fp32 and the cast to ``y``'s dtype comes last: one rounding,
however many terms are fused.

Offsets are int32 unless ``WIDE`` (a tensor of 2^31 elements or more): 64-bit offset
arithmetic costs two instructions per element where int32 costs one. When ``out_ch``
is a contiguous run (no index map) and the strides are multiples of 8, the stores and
the residual loads are 16-byte vectors; the caller states the strides' alignment with
:func:`multiple_of`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def multiple_of(value, ALIGN: tl.constexpr):
    """``value``, which the launcher checked is a multiple of ``ALIGN``, written so the
    compiler's alignment analysis knows it (``tl.multiple_of`` has no effect on scalar
    arguments; Triton's own specialisation only marks multiples of 16)."""
    if ALIGN > 1:
        value = (value // ALIGN) * ALIGN
    return value


@triton.jit
def store_with_epilogue(
    acc,
    y_ptr,
    bias_ptr,
    bmap_ptr,
    res_ptr,
    out_ch,
    col_mask,
    m_mask,
    nb,
    oh,
    ow,
    stride_yn,
    stride_yh,
    stride_yw,
    stride_yc,
    stride_rn,
    stride_rh,
    stride_rw,
    stride_rc,
    stride_bc,
    stride_bh,
    stride_bw,
    HAS_BIAS: tl.constexpr,
    HAS_BIAS_MAP: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    WIDE: tl.constexpr,
):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_ch, mask=col_mask, other=0.0)[None, :]
    out_mask = m_mask[:, None] & col_mask[None, :]
    if WIDE:
        ch = out_ch.to(tl.int64)[None, :]
        nb = nb.to(tl.int64)
        oh = oh.to(tl.int64)
        ow = ow.to(tl.int64)
    else:
        ch = out_ch[None, :]
    if HAS_BIAS_MAP:
        b_pix = oh * stride_bh + ow * stride_bw
        acc += tl.load(bmap_ptr + b_pix[:, None] + ch * stride_bc, mask=out_mask, other=0.0)
    if HAS_RES:
        r_pix = nb * stride_rn + oh * stride_rh + ow * stride_rw
        res = tl.load(res_ptr + r_pix[:, None] + ch * stride_rc, mask=out_mask, other=0.0)
        acc += res.to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    y_pix = nb * stride_yn + oh * stride_yh + ow * stride_yw
    tl.store(y_ptr + y_pix[:, None] + ch * stride_yc, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
