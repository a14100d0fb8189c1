"""The channel kernel's GEMM tile: the fp32 accumulator of ``[BLOCK_M pixels, BLOCK_N
rows]`` over K = kh·kw·Cin', as nested (ky, kx, channel block) loops or one flat loop
(``FLAT``). Kept apart from ``channel_conv.py`` as the epilogue is: device functions the
kernel inlines, so the kernel file holds the kernel, its configs and its launcher.

Operands: the input at each tap is ``x[n, ih, iw, in_idx[c]]`` (NHWC, zero off-image and
past Cin'), the weight ``w[row, ky, kx, c]`` of the plan's compacted ``[Cout', kh, kw,
Cin']`` tensor.
"""

import triton
import triton.language as tl


@triton.jit
def _tap_pixels(x_img, ih, iw, m_mask, H, W, stride_xh, stride_xw, WIDE: tl.constexpr):
    """Each tile pixel's input offset at one tap, and whether that tap is in the image."""
    inside = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    if WIDE:
        x_pix = x_img + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
    else:
        x_pix = x_img + ih * stride_xh + iw * stride_xw
    return x_pix, inside


@triton.jit
def _input_tile(
    x_ptr,
    in_idx_ptr,
    x_pix,
    inside,
    rk,
    k_mask,
    stride_xc,
    HAS_IN_IDX: tl.constexpr,
    WIDE: tl.constexpr,
):
    """The [BLOCK_M pixels, BLOCK_K channels] operand at one tap: channels ``rk`` of the
    plan's inputs, read through ``in_idx`` when the plan gathers them; zeros off-image."""
    if HAS_IN_IDX:
        ch = tl.load(in_idx_ptr + rk, mask=k_mask, other=0)
    else:
        ch = rk
    if WIDE:
        ch = ch.to(tl.int64)
    return tl.load(
        x_ptr + x_pix[:, None] + ch[None, :] * stride_xc,
        mask=inside[:, None] & k_mask[None, :],
        other=0.0,
    )


@triton.jit
def conv_tile(
    # tensors
    x_ptr,
    w_ptr,
    in_idx_ptr,
    # the tile: its pixels (flat, image, row, column) and its rows, with their masks
    rm,
    m_mask,
    nb,
    oh,
    ow,
    rn,
    n_mask,
    # input size and strides (elements)
    H,
    W,
    C_IN,
    stride_xn,
    stride_xh,
    stride_xw,
    stride_xc,
    # conv geometry
    STRIDE_H,
    STRIDE_W,
    PAD_H,
    PAD_W,
    DIL_H,
    DIL_W,
    # kernel taps, features, numerics, tile
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_IN_IDX: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    WIDE: tl.constexpr,
    FLAT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The fp32 accumulator of one [BLOCK_M pixels, BLOCK_N rows] GEMM tile."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    if WIDE:
        x_img = nb.to(tl.int64) * stride_xn
        w_row = rn.to(tl.int64) * (KH * KW * C_IN)
    else:
        x_img = nb * stride_xn
        w_row = rn * (KH * KW * C_IN)
    rk0 = tl.arange(0, BLOCK_K)
    if FLAT:
        c_steps = tl.cdiv(C_IN, BLOCK_K)
        for step in range(0, KH * KW * c_steps):
            # (tap, channel block) from the step alone: state carried through an `if`
            # would stop the software pipeliner from issuing copies ahead.
            tap = step // c_steps
            c0 = (step - tap * c_steps) * BLOCK_K
            ky = tap // KW
            kx = tap - ky * KW
            x_pix, inside = _tap_pixels(
                x_img, ih0 + ky * DIL_H, iw0 + kx * DIL_W, m_mask, H, W, stride_xh, stride_xw, WIDE
            )
            rk = c0 + rk0
            k_mask = rk < C_IN
            a = _input_tile(
                x_ptr, in_idx_ptr, x_pix, inside, rk, k_mask, stride_xc, HAS_IN_IDX, WIDE
            )
            b = tl.load(
                w_ptr + w_row[None, :] + (tap * C_IN + rk)[:, None],
                mask=n_mask[None, :] & k_mask[:, None],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        for ky in range(KH):
            ih = ih0 + ky * DIL_H
            for kx in range(KW):
                x_pix, inside = _tap_pixels(
                    x_img, ih, iw0 + kx * DIL_W, m_mask, H, W, stride_xh, stride_xw, WIDE
                )
                w_tap = w_row + (ky * KW + kx) * C_IN
                for c0 in range(0, C_IN, BLOCK_K):
                    rk = c0 + rk0
                    k_mask = rk < C_IN
                    a = _input_tile(
                        x_ptr, in_idx_ptr, x_pix, inside, rk, k_mask, stride_xc, HAS_IN_IDX, WIDE
                    )
                    b = tl.load(
                        w_ptr + w_tap[None, :] + rk[:, None],
                        mask=n_mask[None, :] & k_mask[:, None],
                        other=0.0,
                    )
                    acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc
