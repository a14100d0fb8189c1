"""Group-wise block-sparse convolution: one launch over every dense group of a layer.

Math. A layer's weight, seen as the GEMM matrix ``Cout × K`` (``K = kh·kw·Cin``, column
``j = (ky·kw + kx)·Cin + c``), is a union of dense groups with disjoint rows: group
``g`` owns output rows ``rows[g]`` and columns ``cols[g]``. For output pixel
``m = (n, oh, ow)`` and row ``r`` of group ``g``:

    acc[m, r] = Σ_{j ∈ cols[g]} x[n, oh·sh − ph + ky(j)·dh, ow·sw − pw + kx(j)·dw, c(j)]
                               · values_g[r, j]                  (out-of-image taps: 0)
    y[m, r] = cast( relu?( acc[m, r] + bias[r] + res[m, r] ) )

Output rows in no group (``fill_idx``) get the epilogue of a zero accumulator.

Schedule. The pack holds a flat list of tiles ``(group, BLOCK_N rows)`` — groups with
the most columns first — followed by epilogue-only tiles. The grid is one dimension,
row tiles varying fastest: the tiles of one pixel tile run side by side and share its
input rows in L2, and the pack (a few MB at most) stays in L2 across pixel tiles. On a
large layer the input is then streamed from DRAM about once, where a pixel-fastest
order streams it once per row tile.

K loop. Columns arrive decoded: the pack's ``col_code`` holds ``c | kx << 16 | ky << 24``
per column (host-side, so no division runs in the loop), from which a column's input
offset ``ky·dh·sxh + kx·dw·sxw + c`` and its tap bits ``1 << ky | 1 << (16 + kx)``
follow in a few integer operations per column. Each pixel's in-image taps are one
32-bit word computed before the loop (bit ky: row in image, bit 16 + kx: column in
image, 0 for pixels past M), so a gathered element's bounds test is one AND and one
compare instead of four comparisons. Padding columns name a tap no pixel has, so
they are masked like an out-of-image tap (an Inf in the input never meets their zero
weight). A group's values are a dense, zero-padded ``[rows_pad, cols_pad]`` tile
whose rows start at multiples of ``K_PAD``: the value operand loads without a mask in
16-byte vectors (``cp.async`` once pipelined).

Column runs. When the pack's columns come in runs of 8 consecutive channels of one tap
starting at a multiple of 8 (``col_run = 8``, regroup's ``RegroupConfig(col_run=8)``)
and the input's pixel strides are multiples of 8 (``X_ALIGN``), ``COL_RUN = 8`` tells
the compiler so (``max_contiguous``/``multiple_of`` on the offsets, ``max_constancy``
on the tap bits): the gathered operand also loads in 16-byte vectors, one address and
one bounds test per 8 elements.

Shapes and layout:
    x         [N, Cin, H, W] logical, channels innermost (strides passed explicitly)
    values    flat; group g's tile row-major at val_ptr[g], x's dtype
    row_idx   int32, −1 padded per group to BLOCK_N · row_ptr [G+1]
    col_code  int32, per padded column of col_ptr's groups · col_ptr [G+1]
    tile_group, tile_row  int32 [T] · fill_idx int32 · bias [Cout] float32
    res, y    [N, Cout, OH, OW] logical, channels innermost

Geometry (kernel size, stride, padding, dilation) is constexpr: a layer's constants,
folded into the address arithmetic. fp32 accumulation; int32 offsets, int64 (``WIDE``)
once a tensor spans 2^30 elements; fp16, bf16 or fp32 (tf32 when allowed) inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs, launch
from .epilogue import multiple_of, store_with_epilogue
from .errors import KernelInputError
from .formats import COL_RUN, GroupPack

MAX_TAPS_PER_AXIS = 16  # tap bits: 16 for rows, 16 for columns, in one int32 per pixel


@triton.jit
def group_conv_kernel(
    # tensors: input, pack values, bias, residual, output
    x_ptr,
    val_ptr,
    bias_ptr,
    res_ptr,
    y_ptr,
    # pack index arrays and the tile schedule
    row_idx_ptr,
    row_ptr_ptr,
    col_code_ptr,
    col_ptr_ptr,
    vptr_ptr,
    tile_group_ptr,
    tile_row_ptr,
    fill_idx_ptr,
    # problem size (M = N·OH·OW output pixels) and schedule size
    M,
    H,
    W,
    OH,
    OW,
    N_FILL,
    NUM_TILES,
    MAX_COLS,
    # strides, in elements: input, output, residual (NHWC order)
    stride_xn,
    stride_xh,
    stride_xw,
    stride_xc,
    stride_yn,
    stride_yh,
    stride_yw,
    stride_yc,
    stride_rn,
    stride_rh,
    stride_rw,
    stride_rc,
    # conv geometry (constexpr: the column codes are decoded per tap)
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
    # epilogue features
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    # numerics, the pack's blocking and the alignment the launcher proved
    INPUT_PRECISION: tl.constexpr,
    K_PAD: tl.constexpr,
    COL_RUN: tl.constexpr,
    X_ALIGN: tl.constexpr,
    WIDE: tl.constexpr,
    GATHER_TRANSPOSED: tl.constexpr,
    # tile: BLOCK_M autotuned, BLOCK_N the pack's block_n, BLOCK_K dividing K_PAD
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_t = pid % NUM_TILES
    pid_m = pid // NUM_TILES
    group = tl.load(tile_group_ptr + pid_t)
    start = tl.load(tile_row_ptr + pid_t)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    ow = rm % OW
    oh = (rm // OW) % OH
    nb = (rm // OW) // OH
    rr = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if group >= 0:
        out_ch = tl.load(row_idx_ptr + start + rr)  # −1 marks padding rows
        # Column blocks are K_PAD-padded, so offsets into them are K_PAD multiples:
        # stated, so the value tile and the column codes load as 16-byte vectors.
        col_begin = multiple_of(tl.load(col_ptr_ptr + group), K_PAD)
        cols_pad = multiple_of(tl.load(col_ptr_ptr + group + 1) - col_begin, K_PAD)
        row_in_group = start - tl.load(row_ptr_ptr + group)
        stride_xn = multiple_of(stride_xn, X_ALIGN)
        stride_xh = multiple_of(stride_xh, X_ALIGN)
        stride_xw = multiple_of(stride_xw, X_ALIGN)
        ih0 = oh * STRIDE_H - PAD_H
        iw0 = ow * STRIDE_W - PAD_W
        pix_bits = tl.zeros((BLOCK_M,), dtype=tl.int32)
        # (Names apart from the K loop's ky/kx: Triton would see one variable change type.)
        for tap_y in tl.static_range(KH):
            ih = ih0 + tap_y * DIL_H
            pix_bits |= tl.where((ih >= 0) & (ih < H), 1 << tap_y, 0)
        for tap_x in tl.static_range(KW):
            iw = iw0 + tap_x * DIL_W
            pix_bits |= tl.where((iw >= 0) & (iw < W), 1 << (16 + tap_x), 0)
        pix_bits = tl.where(m_mask, pix_bits, 0)
        if WIDE:
            v_base = tl.load(vptr_ptr + group) + row_in_group.to(tl.int64) * cols_pad
            x_pix = (
                nb.to(tl.int64) * stride_xn
                + ih0.to(tl.int64) * stride_xh
                + iw0.to(tl.int64) * stride_xw
            )
            v_rows = rr.to(tl.int64)[None, :] * cols_pad
        else:
            # int32 offsets (the launcher checked every tensor spans < 2^30 elements):
            # 64-bit arithmetic on every gathered element costs twice the instructions.
            v_base = (tl.load(vptr_ptr + group) + row_in_group * cols_pad).to(tl.int32)
            x_pix = nb * stride_xn + ih0 * stride_xh + iw0 * stride_xw
            v_rows = rr[None, :] * cols_pad
        v_base = multiple_of(v_base, K_PAD)
        for k0 in range(0, cols_pad, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            code = tl.load(col_code_ptr + col_begin + rk)
            ky = code >> 24
            kx = (code >> 16) & 0xFF
            c = code & 0xFFFF
            if WIDE:
                col_off = (
                    ky.to(tl.int64) * (DIL_H * stride_xh)
                    + kx.to(tl.int64) * (DIL_W * stride_xw)
                    + c.to(tl.int64) * stride_xc
                )
            else:
                col_off = ky * (DIL_H * stride_xh) + kx * (DIL_W * stride_xw) + c * stride_xc
            col_bits = (1 << ky) | (1 << (kx + 16))
            if COL_RUN > 1:
                # Runs of COL_RUN channels of one tap, starting at multiples of COL_RUN
                # (the pack checked it; X_ALIGN makes the tap offsets multiples too).
                col_off = tl.max_contiguous(tl.multiple_of(col_off, COL_RUN), COL_RUN)
                col_bits = tl.max_constancy(col_bits, COL_RUN)
            if GATHER_TRANSPOSED:  # the same tile, built K-major (see gather_transposed)
                inside_t = (pix_bits[None, :] & col_bits[:, None]) == col_bits[:, None]
                a = tl.trans(
                    tl.load(x_ptr + x_pix[None, :] + col_off[:, None], mask=inside_t, other=0.0)
                )
            else:
                inside = (pix_bits[:, None] & col_bits[None, :]) == col_bits[None, :]
                a = tl.load(x_ptr + x_pix[:, None] + col_off[None, :], mask=inside, other=0.0)
            # Padded tiles: every (row, column) of the block exists, zero where padded.
            b = tl.load(val_ptr + v_base + v_rows + rk[:, None])
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        # Epilogue-only tile: output rows that belong to no group.
        rf = start + rr
        out_ch = tl.load(fill_idx_ptr + rf, mask=rf < N_FILL, other=-1)

    col_mask = out_ch >= 0
    # No position-dependent bias here: its pointer and strides are placeholders.
    store_with_epilogue(
        acc,
        y_ptr,
        bias_ptr,
        bias_ptr,
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
        0,
        0,
        0,
        HAS_BIAS,
        False,
        HAS_RES,
        RELU,
        WIDE,
    )


# Autotuning (GPU only). BLOCK_N is the pack's row tile, fixed by the format. Three
# config sets, by how the gathered operand loads (the static report compiles every config
# for sm_90a and sm_80; the test suite requires zero spills among those offered):
# - "tensor": scalar gathers (any columns). A thread keeps an offset and tap bits for
#   each of its pixels, so tiles of 32 pixels × 32 columns per warp (128×32 on 4 warps,
#   256×32 on 8) spill on sm_90a and cost 332–341 instructions per iteration where
#   64×32 costs 159 (Triton 3.6): they are not offered;
# - "tensor-run": column runs (COL_RUN = 8), 16-byte cp.async for both operands and a
#   few addresses per thread, so larger tiles fit;
# - "fma": exact fp32 (allow_tf32=False), tl.dot on CUDA cores, fragments in registers.
# The sets are data, in group_conv.json next to this file (BLOCK_N is the pack's block_n:
# "pack" in the ids), with the SPILLS table (see channel_conv.py) and the QUICK lists:
# the configs the static report ranks best on Triton 3.6 (fp16, sm_90a), and a
# BLOCK_K = 16 one for the converter's leftover packs (k_pad 16).
TABLE = configs.load_table(__file__)
CONFIG_IDS = TABLE.config_ids
CONFIG_SETS = {kind: [configs.config_from_id(c) for c in ids] for kind, ids in CONFIG_IDS.items()}
SPILLS = TABLE.spills
QUICK = TABLE.quick
# K_PAD and BLOCK_N are in the key because candidate_configs depends on them (a config
# tuned for one pack's column padding must never be reused for another's), and so is
# INPUT_PRECISION (it picks the config set).
AUTOTUNE_KEY = [
    "M",
    "H",
    "W",
    "OH",
    "OW",
    "N_FILL",
    "NUM_TILES",
    "MAX_COLS",
    "KH",
    "KW",
    "STRIDE_H",
    "STRIDE_W",
    "PAD_H",
    "PAD_W",
    "DIL_H",
    "DIL_W",
    "K_PAD",
    "COL_RUN",
    "X_ALIGN",
    "BLOCK_N",
    "INPUT_PRECISION",
]


def launch_class(dtype: torch.dtype, constexprs: dict) -> str:
    if constexprs.get("INPUT_PRECISION") == "ieee" and dtype == torch.float32:
        return "fma"
    return "tensor-run" if constexprs.get("COL_RUN", 1) > 1 else "tensor"


def candidate_configs(dtype: torch.dtype, constexprs: dict) -> list[triton.Config]:
    """The configs the autotuner may pick for a launch with these flags: BLOCK_K must
    divide the pack's column padding (tiles are padded to K_PAD), and none that spills
    on this Triton. K_PAD is a power of two ≥ 16, so the BLOCK_K = 16 configs always fit."""
    kind = launch_class(dtype, constexprs)
    spills = configs.known_spills(SPILLS, kind, dtype)
    k_pad = constexprs["K_PAD"]
    fitting = [c for c in CONFIG_SETS[kind] if k_pad % c.kwargs["BLOCK_K"] == 0]
    return configs.select_configs(fitting, spills, QUICK[kind])


group_conv_tuned, CONFIGS = configs.autotuned(
    group_conv_kernel, CONFIG_SETS, AUTOTUNE_KEY, candidate_configs
)

# What the kernel reads besides x, the residual and the bias (an out= may not overlap them).
GROUP_PACK_TENSORS = GroupPack.TENSOR_FIELDS[:-1]

INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_K": 16}


INTERPRETED = launch.is_interpreted(group_conv_kernel)


def gather_transposed(version: str | None = None) -> bool:
    """Whether the gathered tile is built as [BLOCK_K, BLOCK_M] and transposed. Scalar
    gathers have no contiguity on either axis, and Triton's coalescing breaks that tie
    towards the first axis before 3.9 and towards the last from 3.9 (compiled: 3.6 and
    3.9; 3.7 and 3.8 not measured). Either way the K axis must win, so that a warp walks
    one pixel's columns: a thread then decodes one column code and keeps its pixels'
    offsets, which halves the loop (309 → 159 SASS instructions per iteration, 3.6,
    sm_90a, 64×32 tile)."""
    minor = configs.triton_version(version)
    return minor is not None and minor < (3, 9)


def group_conv_launch(
    x: torch.Tensor,
    pack,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    out: torch.Tensor | None = None,
    allow_tf32: bool | None = None,
    check_device: bool = True,
    force_wide: bool | None = None,
) -> launch.KernelLaunch:
    """Check a call and build its launch (nothing runs); see
    :func:`kernels.channel_conv.channel_conv_launch`."""
    what = "group_conv"
    call = launch.check_group_call(x, pack, residual, what, INTERPRETED if check_device else None)
    n, _, h, w = x.shape
    block_n, k_pad = int(pack.block_n), int(pack.k_pad)
    if block_n < 16 or block_n & (block_n - 1) or k_pad < 16 or k_pad & (k_pad - 1):
        raise KernelInputError(
            f"{what}: pack block_n={block_n} and k_pad={k_pad} must be powers of two ≥ 16 "
            "(tensor-core tile edges)"
        )
    kh, kw = call.kernel
    if max(kh, kw) > MAX_TAPS_PER_AXIS:
        raise KernelInputError(
            f"{what}: kernel {kh}×{kw} has more than {MAX_TAPS_PER_AXIS} taps along an axis "
            "(the kernel keeps a pixel's in-image taps as bits of one int32)"
        )
    oh, ow = call.oh, call.ow
    y = launch.prepare_output(
        out,
        call.out_shape,
        x,
        what,
        {
            "residual": residual,
            "pack bias": pack.bias,
            **{f"pack {name}": getattr(pack, name) for name in GROUP_PACK_TENSORS},
        },
    )
    x = launch.channels_last(x)
    m, tiles = n * oh * ow, pack.tile_group.numel()
    # A pack records max_cols on the host (groups_meta); reading col_ptr would sync.
    max_cols = int(pack.max_cols)
    x_strides = launch.nhwc_strides(x)
    x_align = launch.alignment(*x_strides[:3])
    # Runs vectorise only if every tap offset is a multiple of the run too.
    col_run = COL_RUN if pack.col_run == COL_RUN and x_align == COL_RUN else 1
    args = (
        # A disabled feature's pointer is never read; the stand-ins only keep types right.
        x,
        pack.values,
        pack.bias if pack.bias is not None else launch.placeholder(x.device, torch.float32),
        residual if residual is not None else y,
        y,
        pack.row_idx,
        pack.row_ptr,
        pack.col_code,
        pack.col_ptr,
        pack.val_ptr,
        pack.tile_group,
        pack.tile_row,
        pack.fill_idx,
        m,
        h,
        w,
        oh,
        ow,
        pack.fill_idx.numel(),
        tiles,
        max_cols,
        *x_strides,
        *launch.nhwc_strides(y),
        *(launch.nhwc_strides(residual) if residual is not None else (0, 0, 0, 0)),
    )
    flags = {
        "KH": kh,
        "KW": kw,
        "STRIDE_H": call.stride[0],
        "STRIDE_W": call.stride[1],
        "PAD_H": call.padding[0],
        "PAD_W": call.padding[1],
        "DIL_H": call.dilation[0],
        "DIL_W": call.dilation[1],
        "HAS_BIAS": pack.bias is not None,
        "HAS_RES": residual is not None,
        "RELU": bool(relu),
        "INPUT_PRECISION": launch.input_precision(x.dtype, allow_tf32),
        "K_PAD": k_pad,
        "COL_RUN": col_run,
        "X_ALIGN": x_align,
        "BLOCK_N": block_n,
        "GATHER_TRANSPOSED": col_run == 1 and gather_transposed(),
        "WIDE": launch.needs_wide_offsets(dense=(x, y), views=(pack.values, residual))
        if force_wide is None
        else bool(force_wide),
    }

    def grid(meta):
        # One dimension, row tiles fastest (see the module docstring).
        return (launch.cdiv(m, meta["BLOCK_M"]) * tiles,)

    interpreter_meta = dict(INTERPRETER_CONFIG, BLOCK_K=min(INTERPRETER_CONFIG["BLOCK_K"], k_pad))
    return launch.KernelLaunch(
        group_conv_kernel,
        group_conv_tuned,
        args,
        flags,
        grid,
        interpreter_meta,
        y,
        m == 0 or tiles == 0,
    )


def group_conv(
    x: torch.Tensor,
    pack,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    out: torch.Tensor | None = None,
    allow_tf32: bool | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Run a :class:`~.formats.GroupPack` on ``x`` ([N, Cin, H, W]); returns
    [N, Cout, OH, OW], channels-last. The pack's values are in x's dtype. ``config`` forces one
    ``triton.Config`` (its BLOCK_K must divide the pack's ``k_pad``).
    """
    spec = group_conv_launch(x, pack, residual=residual, relu=relu, out=out, allow_tf32=allow_tf32)
    if config is not None and spec.constexprs["K_PAD"] % config.kwargs["BLOCK_K"]:
        raise KernelInputError(
            f"group_conv: BLOCK_K={config.kwargs['BLOCK_K']} must divide "
            f"k_pad={spec.constexprs['K_PAD']}"
        )
    return launch.run(spec, config, INTERPRETED)
