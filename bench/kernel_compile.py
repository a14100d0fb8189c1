"""Compile a kernel launch for a GPU this machine does not have, and read what came out.

:func:`compile_launch` takes a :class:`kernels.launch.KernelLaunch` (what a launcher
would launch, built from CPU tensors with ``check_device=False``) and a
``triton.Config`` and compiles it for a target such as sm_90a, with the signature and
specialisation Triton's own JIT derives at a launch: its binder decides which pointers
are 16-byte aligned, which integers are divisible by 16 and which equal 1 (those become
constants), exactly as on the GPU.

:func:`analyse` reads the compiled kernel: registers, spills and stack (ptxas), shared
memory (Triton), the MMA instruction kind (PTX), and from the SASS the innermost loop
that contains an MMA: its instructions per iteration per warp, asynchronous copies
(``LDGSTS`` = cp.async, ``UTMALDG`` = TMA) and the width of every global load and store.

What this gives is a *bound*, not a time: the issue-bound ceiling counts instruction
issue slots only (4 schedulers per SM, one instruction per cycle each), and ignores
memory bandwidth, latency, occupancy and the work outside the innermost loop.

Runs only where Triton's JIT is real: without ``TRITON_INTERPRET=1`` (which turns
every kernel into a Python function).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field

import triton

# Peak dense FLOP per clock per SM, by (architecture, MMA input type): the vendor peak
# divided by SM count and boost clock (H100/H200 SXM: 989 TFLOP/s fp16 over 132 SMs at
# 1.83 GHz; A100: 312 over 108 at 1.41 GHz). "fma" is the CUDA-core fp32 rate.
PEAK_FLOP_PER_CLOCK = {
    (90, "fp16"): 4096,
    (90, "bf16"): 4096,
    (90, "tf32"): 2048,
    (90, "fma"): 256,
    (80, "fp16"): 2048,
    (80, "bf16"): 2048,
    (80, "tf32"): 1024,
    (80, "fma"): 128,
}
SCHEDULERS_PER_SM = 4
TARGETS = {"sm_90a": 90, "sm_80": 80}


class NotCompilable(RuntimeError):
    """This process cannot compile for a GPU (interpreter on, or no toolchain)."""


def gpu_target(name: str):
    from triton.backends.compiler import GPUTarget

    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    return GPUTarget("cuda", TARGETS[name], 32)


def _jit_function(kernel):
    if type(kernel).__name__ != "JITFunction":
        raise NotCompilable(
            f"{getattr(kernel, '__name__', kernel)} is a {type(kernel).__name__}, not a "
            "JITFunction: unset TRITON_INTERPRET to compile kernels"
        )
    return kernel


def _launch_kwargs(fn, constexprs: dict, config) -> dict:
    """What ``JITFunction.run`` adds to the keyword arguments before binding them."""
    from triton import knobs

    kwargs = {**constexprs, **config.all_kwargs()}
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    return kwargs


def compile_launch(spec, config, target: str):
    """``(compiled kernel, ptxas log)`` of ``spec`` under ``config`` for ``target``."""
    from triton import knobs
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(spec.kernel)
    gpu = gpu_target(target)
    backend = make_backend(gpu)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = _launch_kwargs(fn, spec.constexprs, config)
    bound, specialization, options = binder(*spec.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )
    source = ASTSource(fn, signature, constexprs, attrs)
    log = io.StringIO()
    # The ptxas log (registers, spills) is only printed when asked for, and only when
    # ptxas runs: a cache hit skips it, so callers point TRITON_CACHE_DIR at a fresh
    # folder (see fresh_cache).
    saved = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=gpu, options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log = saved
    return compiled, log.getvalue()


@contextlib.contextmanager
def fresh_cache():
    """A private, empty Triton cache for the block (so ptxas runs and logs)."""
    old = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="sparse-ops-aot-") as folder:
        os.environ["TRITON_CACHE_DIR"] = folder
        try:
            yield folder
        finally:
            if old is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = old


# ---------------------------------------------------------------------- analysis


@dataclass
class LoopStats:
    """The innermost loop that holds an MMA, per iteration per warp."""

    instructions: int
    mma: int
    async_copies: int  # LDGSTS (cp.async) + UTMALDG (TMA)
    tma: int
    global_loads: int  # synchronous LDG
    shared_loads: int  # LDS / LDSM
    integer: int  # address arithmetic, compares, selects, moves
    barriers: int
    load_bits: dict[str, int] = field(default_factory=dict)  # width → count (LDG + LDGSTS)


@dataclass
class KernelStats:
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes
    shared: int  # bytes of shared memory the kernel needs (Triton's dynamic allocation)
    mma_kind: str  # "wgmma", "mma.sync" or "fma"
    ptx_async: list[str]
    sass_instructions: int
    store_bits: dict[str, int]  # global stores: width → count, whole kernel
    loop: LoopStats | None

    def to_json(self) -> dict:
        return asdict(self)


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA(?:\.[A-Z0-9.]+)?\s+(?:`?\()?0x([0-9a-f]+)")
_INTEGER = (
    "IMAD",
    "IADD",
    "ISETP",
    "LEA",
    "SHF",
    "LOP",
    "SEL",
    "MOV",
    "IABS",
    "I2F",
    "F2I",
    "PRMT",
    "SGXT",
    "ISCADD",
    "IMNMX",
    "VIMNMX",
    "R2UR",
    "S2R",
    "S2UR",
    "U",
    "P2R",
    "R2P",
    "PLOP3",
    "CS2R",
    "FSEL",
)


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Registers, stack and spill bytes (the largest over the log's functions). A log
    without a register count means ptxas did not run (a cache hit): an error, never a
    silent "0 spills"."""
    if not _PTXAS["registers"].search(log):
        raise NotCompilable("no ptxas log (a Triton cache hit?): compile in fresh_cache()")
    found = {}
    for key, pattern in _PTXAS.items():
        values = [int(v) for v in pattern.findall(log)]
        found[key] = max(values) if values else 0
    return found


def sass_instructions(cubin: bytes) -> list[tuple[int, str]]:
    """``[(address, instruction text)]`` of a cubin, from ``cuobjdump --dump-sass``."""
    tool = _nvidia_tool("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run(
            [tool, "--dump-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    return [(int(a, 16), text) for a, text in _SASS_LINE.findall(sass)]


def _nvidia_tool(name: str) -> str:
    from triton import knobs

    tool = getattr(knobs.nvidia, name, None)
    path = getattr(tool, "path", None)
    if path and os.path.exists(path):
        return path
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(bundled):
        return bundled
    raise NotCompilable(f"{name} not found (it ships in triton/backends/nvidia/bin)")


def _opcode(text: str) -> str:
    parts = text.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def _bits(opcode: str) -> str:
    for width in ("128", "64"):
        if f".{width}" in opcode:
            return width
    if ".U16" in opcode or ".S16" in opcode:
        return "16"
    if ".U8" in opcode or ".S8" in opcode:
        return "8"
    return "32"


def _is_mma(op: str) -> bool:
    return op.startswith(("HGMMA", "HMMA", "IMMA"))


def innermost_mma_loop(instrs: list[tuple[int, str]], fma: bool = False):
    """``(start, end)`` addresses of the smallest backward-branch range holding an MMA
    (or, for an fp32 ``fma`` kernel, an FFMA); None if there is none."""
    mma_at = [a for a, t in instrs if (_opcode(t) == "FFMA" if fma else _is_mma(_opcode(t)))]
    best = None
    for address, text in instrs:
        m = _BRANCH.search(text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target > address:
            continue
        if any(target <= a <= address for a in mma_at) and (
            best is None or address - target < best[1] - best[0]
        ):
            best = (target, address)
    return best


def loop_stats(instrs, bounds) -> LoopStats:
    start, end = bounds
    body = [_opcode(t) for a, t in instrs if start <= a <= end]
    count = Counter()
    load_bits: Counter = Counter()
    for op in body:
        if _is_mma(op) or op == "FFMA":
            count["mma"] += 1
        elif op.startswith("LDGSTS") or op.startswith("UTMALDG"):
            count["async"] += 1
            if op.startswith("UTMALDG"):
                count["tma"] += 1
            else:
                load_bits[_bits(op)] += 1
        elif op.startswith(
            ("BAR", "SYNCS", "WARPGROUP", "DEPBAR", "LDGDEPBAR", "WARPSYNC", "MEMBAR", "FENCE")
        ):
            count["bar"] += 1
        elif op.startswith("LDG"):
            count["ldg"] += 1
            load_bits[_bits(op)] += 1
        elif op.startswith(("LDS", "LDSM")):
            count["lds"] += 1
        elif op.startswith(_INTEGER):
            count["int"] += 1
    return LoopStats(
        instructions=len(body),
        mma=count["mma"],
        async_copies=count["async"],
        tma=count["tma"],
        global_loads=count["ldg"],
        shared_loads=count["lds"],
        integer=count["int"],
        barriers=count["bar"],
        load_bits=dict(sorted(load_bits.items())),
    )


def mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma.sync"
    return "fma"


def analyse(compiled, ptxas_log: str) -> KernelStats:
    ptxas = parse_ptxas_log(ptxas_log)
    ptx = compiled.asm["ptx"]
    kind = mma_kind(ptx)
    instrs = sass_instructions(compiled.asm["cubin"])
    stores = Counter(_bits(_opcode(t)) for _, t in instrs if _opcode(t).startswith("STG"))
    bounds = innermost_mma_loop(instrs, fma=kind == "fma")
    ptx_async = sorted({m for m in re.findall(r"\b(cp\.async(?:\.bulk(?:\.tensor)?)?)\b", ptx)})
    return KernelStats(
        registers=ptxas["registers"],
        spill_stores=ptxas["spill_stores"],
        spill_loads=ptxas["spill_loads"],
        stack=ptxas["stack"],
        shared=int(getattr(compiled.metadata, "shared", 0)),
        mma_kind=kind,
        ptx_async=ptx_async,
        sass_instructions=len(instrs),
        store_bits=dict(sorted(stores.items())),
        loop=loop_stats(instrs, bounds) if bounds else None,
    )


def issue_ceiling(
    stats: KernelStats, tiles: dict, num_warps: int, arch: int, operand: str
) -> float | None:
    """Fraction of the SM's peak rate the innermost loop can reach if issue were the only
    limit: FLOP per iteration ÷ (instructions × warps ÷ 4 schedulers) ÷ peak per clock.
    ``tiles`` holds BLOCK_M, BLOCK_N and BLOCK_K (one iteration's tile); ``operand`` is
    "fp16", "bf16" or "tf32" (ignored for an "fma" kernel)."""
    loop = stats.loop
    if loop is None or loop.instructions == 0:
        return None
    flop = 2 * tiles["BLOCK_M"] * tiles["BLOCK_N"] * tiles["BLOCK_K"]
    cycles = loop.instructions * num_warps / SCHEDULERS_PER_SM
    peak = PEAK_FLOP_PER_CLOCK[(arch, "fma" if stats.mma_kind == "fma" else operand)]
    return min(1.0, flop / cycles / peak)
