"""The static kernel report's cases and matrix: which launches to compile, in which
configs, dtypes and targets (``python -m sparse_ops_bench.scripts.kernel_static``).

Each case is a launch the product makes (the triton-dense baseline, converted channel
units with and without index maps, fill channels, bias maps and residuals, group packs
and the converter's leftover pack), built from CPU tensors with the specialisation a real
launch gets (:func:`build_launch`); :func:`matrix` lists the compiles of a ``full`` or
``ci`` run, and the kernels' SPILLS tables say which configs a Triton version withholds
(:func:`withheld`). torch, Triton and the kernels are imported inside the functions
that need them, as in the rest of the static report's modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparse_ops.packing import pack_channels, pack_groups

DTYPES = ("float16", "bfloat16", "float32", "float32-ieee")


@dataclass(frozen=True)
class Case:
    """One launch shape. ``mask``: for channel cases ``dense`` (no index maps: also a
    converted unit over physically narrowed activations), ``in`` (input gather),
    ``out`` (scattered rows + fill channels), ``both``; for group cases ``groups``
    (multi-row groups, rows in no group) or ``leftover`` (16-row chunks, no bias)."""

    name: str
    kernel: str  # "channel" or "group"
    n: int
    cin: int
    cout: int
    hw: tuple[int, int]
    k: int
    stride: int = 1
    padding: int = 0
    mask: str = "dense"
    bias: bool = True
    bias_map: bool = False
    residual: bool = False
    relu: bool = False
    block_n: int = 32
    k_pad: int = 32
    aligned: bool = False  # every row 16-byte aligned: the vector-load floors apply
    col_run: int = 1  # group cases: columns chosen in runs of 8 channels of one tap
    note: str = ""


CASES = [
    Case(
        "dense-3x3",
        "channel",
        64,
        64,
        64,
        (32, 32),
        3,
        1,
        1,
        relu=True,
        aligned=True,
        note="CIFAR ResNet-18 layer1 conv; the triton-dense baseline",
    ),
    Case(
        "dense-3x3-res",
        "channel",
        64,
        256,
        256,
        (8, 8),
        3,
        1,
        1,
        residual=True,
        relu=True,
        aligned=True,
        note="ResNet-18 layer3 second conv, residual and ReLU fused",
    ),
    Case(
        "dense-1x1-s2",
        "channel",
        64,
        128,
        256,
        (16, 16),
        1,
        2,
        0,
        aligned=True,
        note="downsampling shortcut",
    ),
    Case(
        "stem-7x7-s2",
        "channel",
        8,
        3,
        64,
        (224, 224),
        7,
        2,
        3,
        relu=True,
        note="ImageNet stem: 3 input channels cannot be 16-byte aligned",
    ),
    Case(
        "narrow-odd",
        "channel",
        64,
        307,
        203,
        (16, 16),
        3,
        1,
        1,
        relu=True,
        note="narrowed activations of odd width, as a plan built without alignment",
    ),
    Case(
        "narrow-aligned",
        "channel",
        64,
        312,
        208,
        (16, 16),
        3,
        1,
        1,
        relu=True,
        aligned=True,
        note="the same widths padded to a multiple of 8, as the converter stores them",
    ),
    Case(
        "gather-in",
        "channel",
        64,
        256,
        256,
        (8, 8),
        3,
        1,
        1,
        mask="in",
        residual=True,
        relu=True,
        note="input channels read through in_idx (residual-tied layout)",
    ),
    Case(
        "scatter-out",
        "channel",
        64,
        256,
        256,
        (8, 8),
        3,
        1,
        1,
        mask="out",
        relu=True,
        note="rows written through out_idx, constant channels by fill tiles",
    ),
    Case(
        "all-features",
        "channel",
        64,
        128,
        128,
        (16, 16),
        3,
        1,
        1,
        mask="both",
        bias_map=True,
        residual=True,
        relu=True,
        note="in_idx, out_idx, fill, bias map, residual, ReLU: the heaviest epilogue",
    ),
    Case(
        "batch1-odd-s2",
        "channel",
        1,
        17,
        33,
        (9, 7),
        3,
        2,
        1,
        mask="both",
        residual=True,
        note="batch 1, odd channels and sizes, stride 2",
    ),
    Case(
        "groups-3x3",
        "group",
        64,
        256,
        256,
        (8, 8),
        3,
        1,
        1,
        mask="groups",
        residual=True,
        relu=True,
        note="regroup pack: 32-row groups, rows in no group, residual, ReLU",
    ),
    Case(
        "groups-512",
        "group",
        64,
        512,
        512,
        (8, 8),
        3,
        1,
        1,
        mask="groups",
        relu=True,
        note="the floor case: 3x3 512→512, density 0.2, 32-row groups, arbitrary columns",
    ),
    Case(
        "groups-512-run8",
        "group",
        64,
        512,
        512,
        (8, 8),
        3,
        1,
        1,
        mask="groups",
        relu=True,
        col_run=8,
        aligned=True,
        note="the same with columns in runs of 8 channels (RegroupConfig(col_run=8))",
    ),
    Case(
        "groups-1x1-s2",
        "group",
        64,
        128,
        256,
        (16, 16),
        1,
        2,
        0,
        mask="groups",
        note="group-sparse downsampling 1x1",
    ),
    Case(
        "groups-7x7",
        "group",
        8,
        64,
        64,
        (28, 28),
        7,
        1,
        3,
        mask="groups",
        relu=True,
        note="7x7 group pack",
    ),
    Case(
        "groups-kpad64",
        "group",
        64,
        256,
        256,
        (8, 8),
        3,
        1,
        1,
        mask="groups",
        k_pad=64,
        note="k_pad 64: the only packs BLOCK_K=64 configs may run on",
    ),
    Case(
        "leftover",
        "group",
        64,
        256,
        256,
        (8, 8),
        3,
        1,
        1,
        mask="leftover",
        bias=False,
        residual=True,
        relu=True,
        block_n=16,
        k_pad=16,
        note="the converter's leftover pack: 16-row chunks, block_n = k_pad = 16",
    ),
    Case(
        "groups-batch1-odd",
        "group",
        1,
        17,
        33,
        (9, 7),
        3,
        2,
        1,
        mask="groups",
        note="batch 1, odd channels and sizes, stride 2",
    ),
]
CASE_BY_NAME = {c.name: c for c in CASES}


# ---------------------------------------------------------------------- building launches


def torch_dtype(dtype: str):
    """The torch dtype of a report dtype name (``float32-ieee`` is fp32 without TF32)."""
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype, torch.float32)


def build_launch(case: Case, dtype: str):
    """The KernelLaunch a real call of ``case`` makes (CPU tensors, nothing runs)."""
    import torch

    g = torch.Generator().manual_seed(0)
    dt = torch_dtype(dtype)
    allow_tf32 = dtype == "float32"
    n, (h, w), k = case.n, case.hw, case.k
    weight = torch.randn(case.cout, case.cin, k, k, generator=g)
    bias = torch.randn(case.cout, generator=g) if case.bias else None
    x = torch.empty(n, case.cin, h, w, dtype=dt).contiguous(memory_format=torch.channels_last)
    oh = (h + 2 * case.padding - k) // case.stride + 1
    ow = (w + 2 * case.padding - k) // case.stride + 1
    residual = None
    if case.residual:
        residual = torch.empty(n, case.cout, oh, ow, dtype=dt, memory_format=torch.channels_last)
    geometry = {"stride": case.stride, "padding": case.padding}
    if case.kernel == "channel":
        from sparse_ops_kernels.channel_conv import channel_conv_launch

        keep_out = torch.ones(case.cout, dtype=torch.bool)
        keep_in = torch.ones(case.cin, dtype=torch.bool)
        if case.mask in ("out", "both"):
            keep_out[torch.randperm(case.cout, generator=g)[: case.cout // 3]] = False
        if case.mask in ("in", "both"):
            keep_in[torch.randperm(case.cin, generator=g)[: case.cin // 3]] = False
        mask = (keep_out[:, None, None, None] & keep_in[None, :, None, None]).expand_as(weight)
        plan = pack_channels(weight, mask, bias, **geometry).to(dtype=dt)
        bias_map = torch.zeros(case.cout, oh, ow) if case.bias_map else None
        return channel_conv_launch(
            x,
            plan,
            residual=residual,
            relu=case.relu,
            allow_tf32=allow_tf32,
            bias_map=bias_map,
            check_device=False,
        )
    from sparse_ops_kernels.group_conv import group_conv_launch

    k_total = k * k * case.cin
    layout = []
    rows = torch.randperm(case.cout, generator=g).tolist()
    size = 16 if case.mask == "leftover" else 32
    keep = case.cout - case.cout // 8  # the rest belong to no group: fill rows
    for start in range(0, keep, size):
        if case.col_run > 1:  # whole aligned runs of col_run channels, density 1/5
            n_runs = k_total // case.col_run
            runs = torch.randperm(n_runs, generator=g)[: n_runs // 5]
            cols = (runs[:, None] * case.col_run + torch.arange(case.col_run)).flatten().tolist()
        else:
            cols = torch.randperm(k_total, generator=g)[: max(1, k_total // 5)].tolist()
        layout.append({"rows": rows[start : min(start + size, keep)], "cols": cols})
    pack = pack_groups(
        weight, None, layout, bias, block_n=case.block_n, k_pad=case.k_pad, **geometry
    ).to(dtype=dt)
    return group_conv_launch(
        x, pack, residual=residual, relu=case.relu, allow_tf32=allow_tf32, check_device=False
    )


def kernel_module(case: Case):
    """The ``sparse_ops_kernels`` module whose kernel runs ``case``."""
    if case.kernel == "channel":
        from sparse_ops_kernels import channel_conv as module
    else:
        from sparse_ops_kernels import group_conv as module
    return module


def candidate_configs(case: Case, dtype: str, spec=None) -> list:
    """The configs the autotuner may pick for this launch (after its pruning)."""
    spec = spec if spec is not None else build_launch(case, dtype)
    return kernel_module(case).candidate_configs(torch_dtype(dtype), spec.constexprs)


_SPILL_TABLES: dict[str, dict] = {}


def ignore_spill_tables() -> None:
    """Offer every config, also those the kernels' SPILLS tables withhold (to measure
    them again: ``--all-configs``); :func:`withheld` still reads the tables."""
    from sparse_ops_kernels import channel_conv, group_conv

    for name, module in (("channel", channel_conv), ("group", group_conv)):
        _SPILL_TABLES.setdefault(name, module.SPILLS)
        module.SPILLS = {}


def withheld(row: dict) -> bool:
    """Whether the kernels' SPILLS tables keep this row's config from its launches on
    the row's Triton version (so the autotuner never runs it there)."""
    from sparse_ops_kernels import channel_conv, configs, group_conv

    module = channel_conv if row["kernel"] == "channel" else group_conv
    table = _SPILL_TABLES.get(row["kernel"], module.SPILLS)
    dtype = torch_dtype(row["dtype"])
    return row.get("config_id") in configs.known_spills(
        table, row.get("launch_class", ""), dtype, row["triton"]
    )


# ---------------------------------------------------------------------- the matrix


def matrix(kind: str, targets, dtypes=DTYPES, kernels=("channel", "group"), cases=None):
    """``[(case name, dtype, config index, target)]`` to compile."""
    chosen = [c for c in CASES if c.kernel in kernels and (cases is None or c.name in cases)]
    jobs = []
    if kind == "full":
        for case in chosen:
            for dtype in dtypes:
                for i in range(len(candidate_configs(case, dtype))):
                    jobs += [(case.name, dtype, i, t) for t in targets]
        return jobs
    if kind != "ci":
        raise ValueError(f"matrix must be 'full' or 'ci', got {kind!r}")
    # Each launch class's config set is compiled in full on a case of that class: every
    # config × fp16/bf16/fp32 for the first target, × fp16 for the others (register use
    # barely differs between fp16 and bf16). Every other case once, fp16, with a config
    # that rotates so that each config meets several cases.
    first, others = targets[0], targets[1:]
    covered = set()
    for case_name, dtype_set, keep in CI_CLASS_CASES:
        case = CASE_BY_NAME[case_name]
        if case not in chosen:
            continue
        covered.add(case_name)
        for dtype in [d for d in dtype_set if d in dtypes]:
            for i, config in enumerate(candidate_configs(case, dtype)):
                if keep and not keep(config):
                    continue
                jobs.append((case.name, dtype, i, first))
                if dtype in ("float16", "float32-ieee"):
                    jobs += [(case.name, dtype, i, t) for t in others]
    rotate = 0
    for case in chosen:
        if case.name in covered or "float16" not in dtypes:
            continue
        n_configs = len(candidate_configs(case, "float16"))
        jobs += [(case.name, "float16", rotate % n_configs, t) for t in targets]
        rotate += 1
    return jobs


_TENSOR_DTYPES = ("float16", "bfloat16", "float32")
# (case, dtypes, config filter): one case per launch class, whose configs it compiles.
CI_CLASS_CASES = [
    ("dense-3x3-res", _TENSOR_DTYPES, None),  # channel "vector"
    ("scatter-out", _TENSOR_DTYPES, None),  # "vector-scatter"
    ("gather-in", _TENSOR_DTYPES, None),  # "scalar"
    ("all-features", _TENSOR_DTYPES, None),  # "scalar-scatter"
    ("dense-3x3", ("float32-ieee",), None),  # "fma"
    ("groups-3x3", (*_TENSOR_DTYPES, "float32-ieee"), None),  # group "tensor", "fma"
    ("groups-512-run8", _TENSOR_DTYPES, None),  # group "tensor-run"
    ("groups-kpad64", _TENSOR_DTYPES, lambda c: c.kwargs["BLOCK_K"] == 64),
    ("leftover", _TENSOR_DTYPES, None),  # block_n = k_pad = 16
]
