"""Channel-pruned convolution: implicit GEMM on NHWC with fused gather/scatter and epilogue.

Math. For output pixel ``m = (n, oh, ow)`` and compact output row ``j`` (written to
channel ``out_idx[j]``):

    acc[m, j] = Σ_{ky, kx, i} x[n, oh·sh − ph + ky·dh, ow·sw − pw + kx·dw, in_idx[i]]
                             · w[j, ky, kx, i]                  (out-of-image taps: 0)
    y[m, out_idx[j]] = cast( relu?( acc[m, j] + bias[out_idx[j]] + bmap[out_idx[j], oh, ow]
                                    + res[m, out_idx[j]] ) )

and every output channel in ``fill_idx`` (no kept weight) gets the same epilogue of a
zero accumulator. ``bmap`` (optional, shared by the batch) is a position-dependent bias:
the converter uses it for input channels that are constant and physically removed,
whose contribution varies near the borders because of zero padding.
With ``in_idx = out_idx = None`` this is a plain dense conv: the ``triton-dense``
baseline.

GEMM view. M = N·OH·OW pixels, N = Cout' compact rows, K = kh·kw·Cin' in (ky, kx, c)
order, walked as nested loops over ky, kx and blocks of ``BLOCK_K`` input channels (or,
with ``FLAT``, one loop over (tap, block) steps; see the configs below for why both).

Shapes and layout:
    x        [N, Cin, H, W] logical, channels innermost (strides passed explicitly)
    w        [Cout', kh, kw, Cin'] contiguous: row j is output channel out_idx[j]
    bias     [Cout] float32 (full output channel space) · bmap [Cout, OH, OW] float32
    res, y   [N, Cout, OH, OW] logical, channels innermost
    in_idx   [Cin'] int32 · out_idx [Cout'] int32 · fill_idx [Cout − Cout'] int32

Vector memory access. With channels innermost, a pixel's Cin' inputs are contiguous, so
when x's pixel strides and Cin' are multiples of 8 (``X_ALIGN``/``W_ALIGN``, checked by
the launcher and stated to the compiler with ``multiple_of``) both operands arrive by
16-byte asynchronous copies; when the output strides and Cout' are too (``Y_ALIGN``)
and there is no ``out_idx``, stores and residual loads are 16-byte vectors. Fill tiles
run a separate epilogue so the GEMM tiles' channel numbers stay one contiguous run. A
gather through ``in_idx`` or an odd channel count falls back to element loads.

Accumulation in fp32; inputs fp16, bf16 or fp32 (tf32 when allowed). Offsets are int32
unless a tensor spans 2^30 elements or more (``WIDE``: int64), which halves the address
arithmetic of the common case. Grid: (pixel tiles, row tiles of the compact GEMM
followed by epilogue-only tiles over ``fill_idx``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs, launch
from .channel_tile import conv_tile
from .epilogue import multiple_of, store_with_epilogue


@triton.jit
def channel_conv_kernel(
    # tensors: input, plan weight, bias, bias map, residual, output; plan index maps
    x_ptr,
    w_ptr,
    bias_ptr,
    bmap_ptr,
    res_ptr,
    y_ptr,
    in_idx_ptr,
    out_idx_ptr,
    fill_idx_ptr,
    # problem size (M = N·OH·OW output pixels)
    M,
    H,
    W,
    OH,
    OW,
    C_IN,
    C_OUT,
    N_FILL,
    # strides, in elements: input, output, residual (NHWC order), bias map
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
    stride_bc,
    stride_bh,
    stride_bw,
    # conv geometry (runtime: one compiled kernel serves every stride/padding)
    STRIDE_H,
    STRIDE_W,
    PAD_H,
    PAD_W,
    DIL_H,
    DIL_W,
    # kernel taps and the plan's features
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_IN_IDX: tl.constexpr,
    HAS_OUT_IDX: tl.constexpr,
    HAS_FILL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_BIAS_MAP: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    # numerics and the alignment the launcher proved
    INPUT_PRECISION: tl.constexpr,
    X_ALIGN: tl.constexpr,
    W_ALIGN: tl.constexpr,
    Y_ALIGN: tl.constexpr,
    WIDE: tl.constexpr,
    FLAT: tl.constexpr,
    # tile (autotuned)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Alignment the launcher checked, stated so that loads and stores become vectors.
    stride_xn = multiple_of(stride_xn, X_ALIGN)
    stride_xh = multiple_of(stride_xh, X_ALIGN)
    stride_xw = multiple_of(stride_xw, X_ALIGN)
    C_IN = multiple_of(C_IN, W_ALIGN)
    stride_yn = multiple_of(stride_yn, Y_ALIGN)
    stride_yh = multiple_of(stride_yh, Y_ALIGN)
    stride_yw = multiple_of(stride_yw, Y_ALIGN)
    stride_rn = multiple_of(stride_rn, Y_ALIGN)
    stride_rh = multiple_of(stride_rh, Y_ALIGN)
    stride_rw = multiple_of(stride_rw, Y_ALIGN)
    C_OUT = multiple_of(C_OUT, Y_ALIGN)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    ow = rm % OW
    oh = (rm // OW) % OH
    nb = (rm // OW) // OH
    gemm_tiles = tl.cdiv(C_OUT, BLOCK_N)
    # Fill tiles (output channels no kept weight reaches) run their own epilogue, so the
    # GEMM tiles' channel numbers stay a contiguous run the compiler can vectorise.
    if HAS_FILL and pid_n >= gemm_tiles:
        rf = (pid_n - gemm_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        fill_mask = rf < N_FILL
        fill_ch = tl.load(fill_idx_ptr + rf, mask=fill_mask, other=0)
        store_with_epilogue(
            tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
            y_ptr,
            bias_ptr,
            bmap_ptr,
            res_ptr,
            fill_ch,
            fill_mask,
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
            HAS_BIAS,
            HAS_BIAS_MAP,
            HAS_RES,
            RELU,
            WIDE,
        )
    else:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < C_OUT
        acc = conv_tile(
            x_ptr,
            w_ptr,
            in_idx_ptr,
            rm,
            m_mask,
            nb,
            oh,
            ow,
            rn,
            n_mask,
            H,
            W,
            C_IN,
            stride_xn,
            stride_xh,
            stride_xw,
            stride_xc,
            STRIDE_H,
            STRIDE_W,
            PAD_H,
            PAD_W,
            DIL_H,
            DIL_W,
            KH,
            KW,
            HAS_IN_IDX,
            INPUT_PRECISION,
            WIDE,
            FLAT,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
        )
        if HAS_OUT_IDX:
            out_ch = tl.load(out_idx_ptr + rn, mask=n_mask, other=0)
        else:
            out_ch = rn
        store_with_epilogue(
            acc,
            y_ptr,
            bias_ptr,
            bmap_ptr,
            res_ptr,
            out_ch,
            n_mask,
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
            HAS_BIAS,
            HAS_BIAS_MAP,
            HAS_RES,
            RELU,
            WIDE,
        )


# Autotuning (GPU only). Two config sets, because what a tile can afford depends on how
# its input loads (the static report, bench/scripts/kernel_static.py, compiles every
# config of both for sm_90a and sm_80 and requires zero spills):
# - vector launches (no input gather, 16-byte aligned rows): operands arrive by 16-byte
#   cp.async, a few address registers per thread, so large tiles fit;
# - scalar launches (input channels gathered through in_idx, or rows that are not
#   16-byte aligned, e.g. a 3-channel stem): every element is a 2- or 4-byte load with
#   an address of its own, and tiles above 128×32×32 spill.
# FLAT selects one K loop over (tap, channel block) instead of nested (ky, kx, block)
# loops. It pipelines copies across taps, but decoding the step costs a division per
# iteration (182 vs 92 SASS instructions per iteration, sm_90a, 128×64×32): the static
# count favours the nested loop whenever a tap has two or more channel blocks, so only
# two configs offer it, for the autotuner to measure whether hiding the per-tap pipeline
# drain pays on the device. The sets, the QUICK lists and the SPILLS table are data, in
# channel_conv.json next to this file.
TABLE = configs.load_table(__file__)
CONFIG_IDS = TABLE.config_ids
# A scattered epilogue (rows written through out_idx) holds a 64-bit address per
# accumulator element: only tiles of at most 32 accumulators per thread.
_SCATTER_ACCUMULATORS = 32


def _fits_scatter(config: triton.Config) -> bool:
    kw = config.kwargs
    return kw["BLOCK_M"] * kw["BLOCK_N"] <= _SCATTER_ACCUMULATORS * 32 * config.num_warps


_vector = [configs.config_from_id(c) for c in CONFIG_IDS["vector"]]
CONFIG_SETS = {
    "vector": _vector,
    "vector-scatter": [c for c in _vector if _fits_scatter(c)],
    **{
        kind: [configs.config_from_id(c) for c in CONFIG_IDS[kind]]
        for kind in ("scalar", "scalar-scatter", "fma")
    },
}
# SPILLS: configs on which ptxas spills registers, by Triton (major, minor), launch class
# and operand dtype: what `python -m sparse_ops_bench.scripts.kernel_static --all-configs
# --matrix full` found (every case, dtype and target; `--spill-table` prints the JSON), on
# Triton 3.6 (the GPU machine's) and 3.9 (CI's). They are not offered on that version; a
# version never measured gets every exclusion known. The test suite re-checks the installed version.
SPILLS = TABLE.spills
# QUICK (SPARSE_OPS_TUNING=quick): per set, two configs the static report ranks best on Triton 3.6
# (mean issue ceiling over the set's cases, fp16, sm_90a). Where several reach 100% the
# count cannot tell them apart: one large and one small tile, the small one for layers
# that fill few waves.
QUICK = TABLE.quick
# Every shape quantity of the problem, and the flags candidate_configs reads: a config
# tuned for one launch class must never be reused for another of the same shape.
AUTOTUNE_KEY = [
    "M",
    "H",
    "W",
    "OH",
    "OW",
    "C_IN",
    "C_OUT",
    "N_FILL",
    "KH",
    "KW",
    "STRIDE_H",
    "STRIDE_W",
    "PAD_H",
    "PAD_W",
    "DIL_H",
    "DIL_W",
    "HAS_IN_IDX",
    "HAS_OUT_IDX",
    "X_ALIGN",
    "W_ALIGN",
    "INPUT_PRECISION",
]


def vector_loads(dtype: torch.dtype, constexprs: dict) -> bool:
    """Whether both GEMM operands of this launch load as 16-byte vectors."""
    size = launch.ELEMENT_BYTES[dtype]
    return (
        not constexprs["HAS_IN_IDX"]
        and constexprs["X_ALIGN"] * size >= 16
        and constexprs["W_ALIGN"] * size >= 16
    )


def launch_class(dtype: torch.dtype, constexprs: dict) -> str:
    """``vector``, ``vector-scatter``, ``scalar`` or ``scalar-scatter`` by how the operands
    load and the output is written; ``fma:<that>`` for exact fp32 (its own config set,
    but spills still depend on the loads and stores)."""
    loads = "vector" if vector_loads(dtype, constexprs) else "scalar"
    kind = loads + ("-scatter" if constexprs["HAS_OUT_IDX"] else "")
    if constexprs.get("INPUT_PRECISION") == "ieee" and dtype == torch.float32:
        return "fma:" + kind
    return kind


def candidate_configs(dtype: torch.dtype, constexprs: dict) -> list[triton.Config]:
    """The configs the autotuner may pick for a launch with these feature flags."""
    kind = launch_class(dtype, constexprs)
    spills = configs.known_spills(SPILLS, kind, dtype)
    config_set = kind.split(":")[0]
    return configs.select_configs(CONFIG_SETS[config_set], spills, QUICK[config_set])


channel_conv_tuned, CONFIGS = configs.autotuned(
    channel_conv_kernel, CONFIG_SETS, AUTOTUNE_KEY, candidate_configs
)

# Under the interpreter (CPU) one small config: tuning there would only cost time.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "FLAT": False}


INTERPRETED = launch.is_interpreted(channel_conv_kernel)


def channel_conv_launch(
    x: torch.Tensor,
    plan,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    out: torch.Tensor | None = None,
    allow_tf32: bool | None = None,
    bias_map: torch.Tensor | None = None,
    check_device: bool = True,
    force_wide: bool | None = None,
) -> launch.KernelLaunch:
    """Check a call and build its launch (nothing runs). ``check_device=False`` accepts
    tensors on any device: ``sparse_ops_bench.static_cases`` builds launches from CPU tensors to
    compile them for a GPU target. ``force_wide`` forces (or forbids) 64-bit offsets,
    which are otherwise used only for tensors spanning 2^30 elements or more (tests use it to
    run the 64-bit path on small tensors)."""
    what = "channel_conv"
    call = launch.check_channel_call(
        x, plan, residual, bias_map, what, INTERPRETED if check_device else None
    )
    weight, in_idx, out_idx, fill_idx = plan.weight, plan.in_idx, plan.out_idx, plan.fill_idx
    bias = plan.bias
    c_out, kh, kw, c_in = weight.shape
    n, h, w, oh, ow = call.n, call.h, call.w, call.oh, call.ow
    n_fill = 0 if fill_idx is None else fill_idx.numel()
    y = launch.prepare_output(
        out,
        call.out_shape,
        x,
        what,
        {
            "residual": residual,
            "bias_map": bias_map,
            "plan weight": weight,
            "plan bias": bias,
            "plan in_idx": in_idx,
            "plan out_idx": out_idx,
            "plan fill_idx": fill_idx,
        },
    )
    x = launch.channels_last(x)
    m = n * oh * ow
    x_strides, y_strides = launch.nhwc_strides(x), launch.nhwc_strides(y)
    r_strides = launch.nhwc_strides(residual) if residual is not None else (0, 0, 0, 0)
    # Pointers of disabled features are never read; typed placeholders keep every
    # branch of the kernel well-typed (an fp16 stand-in for an int32 index map made
    # the kernel fail to compile whenever the plan had no fill channels).
    index_stub = launch.placeholder(x.device, torch.int32)
    float_stub = launch.placeholder(x.device, torch.float32)
    args = (
        x,
        weight,
        bias if bias is not None else float_stub,
        bias_map if bias_map is not None else float_stub,
        residual if residual is not None else y,
        y,
        in_idx if in_idx is not None else index_stub,
        out_idx if out_idx is not None else index_stub,
        fill_idx if fill_idx is not None else index_stub,
        m,
        h,
        w,
        oh,
        ow,
        c_in,
        c_out,
        n_fill,
        *x_strides,
        *y_strides,
        *r_strides,
        *(bias_map.stride() if bias_map is not None else (0, 0, 0)),
        *call.stride,
        *call.padding,
        *call.dilation,
    )
    wide = launch.needs_wide_offsets(dense=(x, y, weight), views=(residual, bias_map))
    flags = {
        "KH": kh,
        "KW": kw,
        "HAS_IN_IDX": in_idx is not None,
        "HAS_OUT_IDX": out_idx is not None,
        "HAS_FILL": n_fill > 0,
        "HAS_BIAS": bias is not None,
        "HAS_BIAS_MAP": bias_map is not None,
        "HAS_RES": residual is not None,
        "RELU": bool(relu),
        "INPUT_PRECISION": launch.input_precision(x.dtype, allow_tf32),
        "X_ALIGN": launch.alignment(*x_strides[:3]),
        "W_ALIGN": launch.alignment(c_in),
        "Y_ALIGN": launch.alignment(c_out, *y_strides[:3], *r_strides[:3]),
        "WIDE": wide if force_wide is None else bool(force_wide),
    }

    def grid(meta):
        block_n = meta["BLOCK_N"]
        return (
            launch.cdiv(m, meta["BLOCK_M"]),
            launch.cdiv(c_out, block_n) + launch.cdiv(n_fill, block_n),
        )

    return launch.KernelLaunch(
        channel_conv_kernel, channel_conv_tuned, args, flags, grid, INTERPRETER_CONFIG, y, m == 0
    )


def channel_conv(
    x: torch.Tensor,
    plan,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    out: torch.Tensor | None = None,
    allow_tf32: bool | None = None,
    config: triton.Config | None = None,
    bias_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run a :class:`~.formats.ChannelPlan` on ``x`` ([N, Cin, H, W]); returns
    [N, Cout, OH, OW], channels-last. The plan's weight is in x's dtype. ``config``
    forces one ``triton.Config`` instead of autotuning.
    """
    spec = channel_conv_launch(
        x, plan, residual=residual, relu=relu, out=out, allow_tf32=allow_tf32, bias_map=bias_map
    )
    return launch.run(spec, config, INTERPRETED)
