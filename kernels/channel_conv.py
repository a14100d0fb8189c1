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
order, walked as nested loops over ky, kx and blocks of ``BLOCK_K`` input channels
(nested rather than one flattened K loop: flattened (ky, kx, c-block) conv loops have
miscompiled at num_warps=8 on some Triton versions).

Shapes and layout:
    x        [N, Cin, H, W] logical, channels innermost (strides passed explicitly)
    w        [Cout', kh, kw, Cin'] contiguous: row j is output channel out_idx[j]
    bias     [Cout] float32 (full output channel space) · bmap [Cout, OH, OW] float32
    res, y   [N, Cout, OH, OW] logical, channels innermost
    in_idx   [Cin'] int32 · out_idx [Cout'] int32 · fill_idx [Cout − Cout'] int32

Accumulation in fp32; inputs fp16, bf16 or fp32 (tf32 when allowed). Offsets are
int64, so tensors beyond 2^31 elements are addressed correctly. Grid: (pixel tiles,
row tiles of the compact GEMM followed by epilogue-only tiles over ``fill_idx``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .epilogue import store_with_epilogue

SUPPORTED_FORMAT_VERSION = 1


@triton.jit
def channel_conv_kernel(
    x_ptr, w_ptr, bias_ptr, bmap_ptr, res_ptr, y_ptr, in_idx_ptr, out_idx_ptr, fill_idx_ptr,
    M, H, W, OH, OW, C_IN, C_OUT, N_FILL,
    stride_xn, stride_xh, stride_xw, stride_xc,
    stride_yn, stride_yh, stride_yw, stride_yc,
    stride_rn, stride_rh, stride_rw, stride_rc,
    stride_bc, stride_bh, stride_bw,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_IN_IDX: tl.constexpr, HAS_OUT_IDX: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_BIAS_MAP: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    gemm_tiles = tl.cdiv(C_OUT, BLOCK_N)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    ow = rm % OW
    oh = (rm // OW) % OH
    nb = (rm // OW) // OH
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if pid_n < gemm_tiles:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < C_OUT
        ih0 = oh * STRIDE_H - PAD_H
        iw0 = ow * STRIDE_W - PAD_W
        x_img = nb.to(tl.int64) * stride_xn
        w_row = rn.to(tl.int64) * (KH * KW * C_IN)
        for ky in range(KH):
            ih = ih0 + ky * DIL_H
            for kx in range(KW):
                iw = iw0 + kx * DIL_W
                inside = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                x_pix = x_img + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
                w_tap = w_row + (ky * KW + kx) * C_IN
                for c0 in range(0, C_IN, BLOCK_K):
                    rk = c0 + tl.arange(0, BLOCK_K)
                    k_mask = rk < C_IN
                    if HAS_IN_IDX:
                        ch = tl.load(in_idx_ptr + rk, mask=k_mask, other=0)
                    else:
                        ch = rk
                    a = tl.load(
                        x_ptr + x_pix[:, None] + ch.to(tl.int64)[None, :] * stride_xc,
                        mask=inside[:, None] & k_mask[None, :],
                        other=0.0,
                    )
                    b = tl.load(
                        w_ptr + w_tap[None, :] + rk[:, None],
                        mask=n_mask[None, :] & k_mask[:, None],
                        other=0.0,
                    )
                    acc += tl.dot(a, b, input_precision=INPUT_PRECISION)
        if HAS_OUT_IDX:
            out_ch = tl.load(out_idx_ptr + rn, mask=n_mask, other=0)
        else:
            out_ch = rn
        col_mask = n_mask
    else:
        # Epilogue-only tile: output channels no kept weight reaches.
        rf = (pid_n - gemm_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = rf < N_FILL
        out_ch = tl.load(fill_idx_ptr + rf, mask=col_mask, other=0)

    store_with_epilogue(
        acc, y_ptr, bias_ptr, bmap_ptr, res_ptr, out_ch, col_mask, m_mask, nb, oh, ow,
        stride_yn, stride_yh, stride_yw, stride_yc, stride_rn, stride_rh, stride_rw, stride_rc,
        stride_bc, stride_bh, stride_bw, HAS_BIAS, HAS_BIAS_MAP, HAS_RES, RELU,
    )  # fmt: skip


# Autotuning (GPU only). The key holds every shape quantity of the problem.
CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
    for bm, bn, bk, nw, ns in [
        (128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 64, 4, 2),
        (64, 64, 64, 4, 3), (128, 32, 32, 4, 4), (64, 32, 32, 4, 4), (256, 64, 32, 8, 3),
    ]
]  # fmt: skip
AUTOTUNE_KEY = ["M", "H", "W", "OH", "OW", "C_IN", "C_OUT", "N_FILL",
                "STRIDE_H", "STRIDE_W", "PAD_H", "PAD_W", "DIL_H", "DIL_W"]  # fmt: skip


def candidate_configs(dtype: torch.dtype, constexprs: dict) -> list[triton.Config]:
    """The configs the autotuner may pick for a launch with these feature flags."""
    return list(CONFIGS)


def _prune_configs(configs, named_args, **kwargs):
    return candidate_configs(named_args["x_ptr"].dtype, kwargs)


channel_conv_tuned = triton.autotune(
    configs=CONFIGS, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs}
)(channel_conv_kernel)

# Under the interpreter (CPU) one small config: tuning there would only cost time.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}


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
) -> launch.KernelLaunch:
    """Check a call and build its launch (nothing runs). ``check_device=False`` accepts
    tensors on any device: ``bench.kernel_static`` builds launches from CPU tensors to
    compile them for a GPU target."""
    what = "channel_conv2d"
    call = launch.check_channel_call(x, plan, residual, bias_map, what, SUPPORTED_FORMAT_VERSION,
                                     INTERPRETED if check_device else None)  # fmt: skip
    weight, in_idx, out_idx, fill_idx = plan.weight, plan.in_idx, plan.out_idx, plan.fill_idx
    c_out, kh, kw, c_in = weight.shape
    n, h, w, oh, ow = call.n, call.h, call.w, call.oh, call.ow
    n_fill = 0 if fill_idx is None else fill_idx.numel()
    y = launch.prepare_output(out, call.out_shape, x, what)
    x = launch.channels_last(x)
    m = n * oh * ow
    dummy = y  # any tensor: pointers of disabled features are never read
    args = (
        x, weight, plan.bias if plan.bias is not None else dummy,
        bias_map if bias_map is not None else dummy,
        residual if residual is not None else dummy, y,
        in_idx if in_idx is not None else dummy, out_idx if out_idx is not None else dummy,
        fill_idx if fill_idx is not None else dummy,
        m, h, w, oh, ow, c_in, c_out, n_fill,
        *launch.nhwc_strides(x), *launch.nhwc_strides(y),
        *(launch.nhwc_strides(residual) if residual is not None else (0, 0, 0, 0)),
        *(bias_map.stride() if bias_map is not None else (0, 0, 0)),
        *call.stride, *call.padding, *call.dilation,
    )  # fmt: skip
    flags = {
        "KH": kh, "KW": kw, "HAS_IN_IDX": in_idx is not None, "HAS_OUT_IDX": out_idx is not None,
        "HAS_BIAS": plan.bias is not None, "HAS_BIAS_MAP": bias_map is not None,
        "HAS_RES": residual is not None, "RELU": bool(relu),
        "INPUT_PRECISION": launch.input_precision(x.dtype, allow_tf32),
    }  # fmt: skip

    def grid(meta):
        block_n = meta["BLOCK_N"]
        return (launch.cdiv(m, meta["BLOCK_M"]), launch.cdiv(c_out, block_n)
                + launch.cdiv(n_fill, block_n))  # fmt: skip

    return launch.KernelLaunch(channel_conv_kernel, channel_conv_tuned, args, flags, grid,
                               INTERPRETER_CONFIG, y, m == 0)  # fmt: skip


def channel_conv2d(
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
    """Run a ChannelPlan-like ``plan`` on ``x`` ([N, Cin, H, W]); returns [N, Cout, OH, OW].

    ``plan`` provides ``weight`` ([Cout', kh, kw, Cin'], x's dtype), ``bias``,
    ``in_idx``, ``out_idx``, ``fill_idx``, ``in_channels``, ``out_channels``,
    ``stride``, ``padding``, ``dilation`` and ``format_version`` (see
    :class:`sparse_ops.formats.ChannelPlan`). The output is channels-last. ``config``
    forces one ``triton.Config`` instead of autotuning.
    """
    spec = channel_conv_launch(x, plan, residual=residual, relu=relu, out=out,
                               allow_tf32=allow_tf32, bias_map=bias_map)  # fmt: skip
    return launch.run(spec, config, INTERPRETED)
