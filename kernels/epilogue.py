"""The fused epilogue both conv kernels end with (a device function, not a kernel).

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
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def store_with_epilogue(
    acc, y_ptr, bias_ptr, bmap_ptr, res_ptr,
    out_ch, col_mask, m_mask, nb, oh, ow,
    stride_yn, stride_yh, stride_yw, stride_yc,
    stride_rn, stride_rh, stride_rw, stride_rc,
    stride_bc, stride_bh, stride_bw,
    HAS_BIAS: tl.constexpr, HAS_BIAS_MAP: tl.constexpr, HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
):  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_ch, mask=col_mask, other=0.0)[None, :]
    out_mask = m_mask[:, None] & col_mask[None, :]
    ch64 = out_ch.to(tl.int64)[None, :]
    if HAS_BIAS_MAP:
        b_pix = oh.to(tl.int64) * stride_bh + ow.to(tl.int64) * stride_bw
        acc += tl.load(bmap_ptr + b_pix[:, None] + ch64 * stride_bc, mask=out_mask, other=0.0)
    if HAS_RES:
        r_pix = (
            nb.to(tl.int64) * stride_rn + oh.to(tl.int64) * stride_rh + ow.to(tl.int64) * stride_rw
        )
        res = tl.load(res_ptr + r_pix[:, None] + ch64 * stride_rc, mask=out_mask, other=0.0)
        acc += res.to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    y_pix = nb.to(tl.int64) * stride_yn + oh.to(tl.int64) * stride_yh + ow.to(tl.int64) * stride_yw
    tl.store(
        y_ptr + y_pix[:, None] + ch64 * stride_yc, acc.to(y_ptr.dtype.element_ty), mask=out_mask
    )
