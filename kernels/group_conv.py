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
the most columns first — followed by epilogue-only tiles. The grid is (pixel tiles,
schedule tiles), pixel tiles varying fastest, so the longest K loops start first.
Each tile's K loop walks its group's columns in blocks of ``BLOCK_K``, gathering
``x`` at the decoded (ky, kx, c) of each column. The group's values are a dense,
zero-padded ``[rows_pad, cols_pad]`` tile, so loading them needs no mask.

Shapes and layout:
    x         [N, Cin, H, W] logical, channels innermost (strides passed explicitly)
    values    flat; group g's tile row-major at val_ptr[g], x's dtype
    row_idx   int32, −1 padded per group to BLOCK_N · row_ptr [G+1]
    col_idx   int32, −1 padded per group to k_pad · col_ptr [G+1]
    tile_group, tile_row  int32 [T] · fill_idx int32 · bias [Cout] float32
    res, y    [N, Cout, OH, OW] logical, channels innermost

fp32 accumulation; int32 offsets, int64 (``WIDE``) once a tensor spans 2^30 elements;
fp16, bf16 or fp32 (tf32 when allowed) inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .epilogue import store_with_epilogue
from .errors import KernelInputError
from .launch import config_id

SUPPORTED_FORMAT_VERSION = 1


@triton.jit
def group_conv_kernel(
    x_ptr, val_ptr, bias_ptr, res_ptr, y_ptr,
    row_idx_ptr, row_ptr_ptr, col_idx_ptr, col_ptr_ptr, vptr_ptr,
    tile_group_ptr, tile_row_ptr, fill_idx_ptr,
    M, H, W, OH, OW, C_IN, KW, N_FILL, NUM_TILES, MAX_COLS,
    stride_xn, stride_xh, stride_xw, stride_xc,
    stride_yn, stride_yh, stride_yw, stride_yc,
    stride_rn, stride_rh, stride_rw, stride_rc,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, K_PAD: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
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
        col_begin = tl.load(col_ptr_ptr + group)
        col_end = tl.load(col_ptr_ptr + group + 1)
        cols_pad = col_end - col_begin
        row_in_group = start - tl.load(row_ptr_ptr + group)
        ih0 = oh * STRIDE_H - PAD_H
        iw0 = ow * STRIDE_W - PAD_W
        if WIDE:
            v_base = tl.load(vptr_ptr + group) + row_in_group.to(tl.int64) * cols_pad
            x_img = nb.to(tl.int64) * stride_xn
            v_rows = rr.to(tl.int64)[None, :] * cols_pad
        else:
            # int32 offsets (the launcher checked every tensor spans < 2^30 elements):
            # 64-bit arithmetic on every gathered element costs twice the instructions.
            v_base = (tl.load(vptr_ptr + group) + row_in_group * cols_pad).to(tl.int32)
            x_img = nb * stride_xn
            v_rows = rr[None, :] * cols_pad
        for k0 in range(0, cols_pad, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            col = tl.load(col_idx_ptr + col_begin + rk)  # −1 marks padding columns
            c = col % C_IN
            tap = col // C_IN
            ky = tap // KW
            kx = tap % KW
            ih = ih0[:, None] + (ky * DIL_H)[None, :]
            iw = iw0[:, None] + (kx * DIL_W)[None, :]
            inside = (
                m_mask[:, None] & (col >= 0)[None, :]
                & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            )  # fmt: skip
            if WIDE:
                x_off = (
                    x_img[:, None]
                    + ih.to(tl.int64) * stride_xh
                    + iw.to(tl.int64) * stride_xw
                    + c.to(tl.int64)[None, :] * stride_xc
                )
            else:
                x_off = x_img[:, None] + ih * stride_xh + iw * stride_xw + c[None, :] * stride_xc
            a = tl.load(x_ptr + x_off, mask=inside, other=0.0)
            # Padded tiles: every (row, column) of the block exists, zero where padded.
            b = tl.load(val_ptr + v_base + v_rows + rk[:, None])
            acc += tl.dot(a, b, input_precision=INPUT_PRECISION)
    else:
        # Epilogue-only tile: output rows that belong to no group.
        rf = start + rr
        out_ch = tl.load(fill_idx_ptr + rf, mask=rf < N_FILL, other=-1)

    col_mask = out_ch >= 0
    # No position-dependent bias here: its pointer and strides are placeholders.
    store_with_epilogue(
        acc, y_ptr, bias_ptr, bias_ptr, res_ptr, out_ch, col_mask, m_mask, nb, oh, ow,
        stride_yn, stride_yh, stride_yw, stride_yc, stride_rn, stride_rh, stride_rw, stride_rc,
        0, 0, 0, HAS_BIAS, False, HAS_RES, RELU, WIDE,
    )  # fmt: skip


# Autotuning (GPU only). BLOCK_N is the pack's row tile, fixed by the format. Every
# column of a group is gathered element by element (its (ky, kx, c) decoded in the loop),
# so each element holds an address of its own and large tiles spill: bench.kernel_static
# compiles every config for sm_90a and sm_80 and the test suite requires zero spills.
def _config(bm, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


CONFIG_SETS = {
    "tensor": [
        _config(64, 32, 4, 4), _config(128, 32, 4, 3), _config(256, 32, 8, 3),
        _config(128, 16, 4, 4), _config(64, 16, 2, 4), _config(32, 32, 4, 3),
        _config(32, 16, 2, 3), _config(64, 64, 4, 3), _config(64, 64, 4, 2),
        _config(32, 64, 4, 2),
    ],
    # Exact fp32 (allow_tf32=False): tl.dot on CUDA cores, fragments in registers.
    "fma": [_config(32, 32, 4, 2), _config(64, 16, 4, 2), _config(32, 16, 4, 2),
            _config(64, 16, 2, 2)],
}  # fmt: skip
CONFIGS = list({config_id(c): c for s in CONFIG_SETS.values() for c in s}.values())
# Configs ptxas spills on, by Triton (major, minor) and "class" or "class/dtype"; see
# kernels.channel_conv.SPILLS.
SPILLS: dict[tuple[int, int], dict[str, set[str]]] = {
    (3, 6): {},  # measured: nothing spills
    (3, 9): {
        'fma/float32': {'32xpackx16 w4 s2', '64xpackx16 w2 s2'},
        'tensor/bfloat16': {'128xpackx32 w4 s3', '256xpackx32 w8 s3'},
        'tensor/float16': {'128xpackx32 w4 s3', '256xpackx32 w8 s3'},
        'tensor/float32': {
            '128xpackx32 w4 s3', '256xpackx32 w8 s3', '32xpackx64 w4 s2', '64xpackx64 w4 s2',
            '64xpackx64 w4 s3',
        },
    },
}  # fmt: skip
# SPARSE_OPS_TUNING=quick: the configs the static report ranks best on Triton 3.6 (fp16,
# sm_90a), and a BLOCK_K = 16 one for the converter's leftover packs (k_pad 16).
QUICK = {
    "tensor": ["64xpackx32 w4 s4", "128xpackx32 w4 s3", "128xpackx16 w4 s4"],
    "fma": ["64xpackx16 w4 s2", "32xpackx32 w4 s2"],
}
# K_PAD and BLOCK_N are in the key because candidate_configs depends on them (a config
# tuned for one pack's column padding must never be reused for another's), and so is
# INPUT_PRECISION (it picks the config set).
AUTOTUNE_KEY = ["M", "H", "W", "OH", "OW", "C_IN", "KW", "N_FILL", "NUM_TILES", "MAX_COLS",
                "STRIDE_H", "STRIDE_W", "PAD_H", "PAD_W", "DIL_H", "DIL_W", "K_PAD",
                "BLOCK_N", "INPUT_PRECISION"]  # fmt: skip


def launch_class(dtype: torch.dtype, constexprs: dict) -> str:
    fma = constexprs.get("INPUT_PRECISION") == "ieee" and dtype == torch.float32
    return "fma" if fma else "tensor"


def candidate_configs(dtype: torch.dtype, constexprs: dict) -> list[triton.Config]:
    """The configs the autotuner may pick for a launch with these flags: BLOCK_K must
    divide the pack's column padding (tiles are padded to K_PAD), and none that spills
    on this Triton. K_PAD is a power of two ≥ 16, so the BLOCK_K = 16 configs always fit."""
    kind = launch_class(dtype, constexprs)
    spills = launch.known_spills(SPILLS, kind, dtype)
    k_pad = constexprs["K_PAD"]
    fitting = [c for c in CONFIG_SETS[kind] if k_pad % c.kwargs["BLOCK_K"] == 0]
    return launch.select_configs(fitting, spills, QUICK[kind])


def _prune_configs(configs, named_args, **kwargs):
    return candidate_configs(named_args["x_ptr"].dtype, kwargs)


group_conv_tuned = triton.autotune(
    configs=CONFIGS, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs}
)(group_conv_kernel)

INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_K": 16}


INTERPRETED = launch.is_interpreted(group_conv_kernel)


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
    what = "group_conv2d"
    call = launch.check_group_call(x, pack, residual, what, SUPPORTED_FORMAT_VERSION,
                                   INTERPRETED if check_device else None)  # fmt: skip
    n, c, h, w = x.shape
    block_n, k_pad = int(pack.block_n), int(pack.k_pad)
    if block_n < 16 or block_n & (block_n - 1) or k_pad < 16 or k_pad & (k_pad - 1):
        raise KernelInputError(
            f"{what}: pack block_n={block_n} and k_pad={k_pad} must be powers of two ≥ 16 "
            "(tensor-core tile edges)"
        )
    kw = call.kernel[1]
    oh, ow = call.oh, call.ow
    y = launch.prepare_output(out, call.out_shape, x, what)
    x = launch.channels_last(x)
    m, tiles = n * oh * ow, pack.tile_group.numel()
    # A pack records max_cols on the host (groups_meta); reading col_ptr would sync.
    max_cols = int(pack.max_cols) if hasattr(pack, "max_cols") else 0
    args = (
        # A disabled feature's pointer is never read; the stand-ins only keep types right.
        x, pack.values,
        pack.bias if pack.bias is not None else launch.placeholder(x.device, torch.float32),
        residual if residual is not None else y, y,
        pack.row_idx, pack.row_ptr, pack.col_idx, pack.col_ptr, pack.val_ptr,
        pack.tile_group, pack.tile_row, pack.fill_idx,
        m, h, w, oh, ow, c, kw, pack.fill_idx.numel(), tiles, max_cols,
        *launch.nhwc_strides(x), *launch.nhwc_strides(y),
        *(launch.nhwc_strides(residual) if residual is not None else (0, 0, 0, 0)),
        *call.stride, *call.padding, *call.dilation,
    )  # fmt: skip
    flags = {
        "HAS_BIAS": pack.bias is not None, "HAS_RES": residual is not None, "RELU": bool(relu),
        "INPUT_PRECISION": launch.input_precision(x.dtype, allow_tf32), "K_PAD": k_pad,
        "BLOCK_N": block_n,
        "WIDE": launch.needs_wide_offsets(dense=(x, y), views=(pack.values, residual))
        if force_wide is None else bool(force_wide),
    }  # fmt: skip

    def grid(meta):
        return (launch.cdiv(m, meta["BLOCK_M"]), tiles)

    interpreter_meta = dict(INTERPRETER_CONFIG, BLOCK_K=min(INTERPRETER_CONFIG["BLOCK_K"], k_pad))
    return launch.KernelLaunch(group_conv_kernel, group_conv_tuned, args, flags, grid,
                               interpreter_meta, y, m == 0 or tiles == 0)  # fmt: skip


def group_conv2d(
    x: torch.Tensor,
    pack,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    out: torch.Tensor | None = None,
    allow_tf32: bool | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Run a GroupPack-like ``pack`` on ``x`` ([N, Cin, H, W]); returns [N, Cout, OH, OW].

    ``pack`` provides the fields of :class:`sparse_ops.formats.GroupPack` (values in
    x's dtype, int32 indices, int64 ``val_ptr``, ``block_n``, ``k_pad``, geometry and
    ``format_version``). The output is channels-last. ``config`` forces one
    ``triton.Config`` (its BLOCK_K must divide the pack's ``k_pad``).
    """
    spec = group_conv_launch(x, pack, residual=residual, relu=relu, out=out,
                             allow_tf32=allow_tf32)  # fmt: skip
    if config is not None and spec.constexprs["K_PAD"] % config.kwargs["BLOCK_K"]:
        raise KernelInputError(
            f"group_conv2d: BLOCK_K={config.kwargs['BLOCK_K']} must divide "
            f"k_pad={spec.constexprs['K_PAD']}"
        )
    return launch.run(spec, config, INTERPRETED)
