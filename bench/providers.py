"""What a benchmark compares: one way each of running a network (or one conv layer).

``cudnn``         the dense network on cuDNN (``benchmark=True``), channels-last. CUDA.
``dense``         the dense network on oneDNN, channels-last: the CPU's ``cudnn``.
``masked``        torch.nn.utils.prune hooks (``W_orig ⊙ M`` every call), channels-last:
                  what a prune user runs. Masked function.
``narrow``        converted in channel mode, run on the torch path (cuDNN / oneDNN):
                  pruned channels physically removed, other masks as masked dense convs.
                  Masked function.
``folded``        the dense network with BatchNorm folded into the convs, on the torch
                  path (cuDNN / oneDNN): the fair dense baseline for fusion, since
                  ``ours`` folds BatchNorm too. Dense function.
``compile``       ``torch.compile(mode="max-autotune-no-cudagraphs")`` of the dense
                  network (graph replay is ``--graph``'s job, for all alike). CUDA by
                  default; on the CPU only when asked (needs a C++ toolchain).
``triton-dense``  the dense network through our channel kernel, every channel kept. CUDA.
``ours``          ``convert(mode="auto", on_unstructured="regroup", tune=x)``: each layer
                  timed in every representation on the benchmark's device, at its input
                  shape, the fastest kept, the whole network checked against ``folded``
                  and ``narrow`` (docs/CONVERT.md, "Tuning"). Our kernels on CUDA, the
                  torch paths of our units on the CPU. Masked function.

Every provider runs in the benchmark's dtype. Before any timing, each provider's output
is compared with the function it claims to compute (the dense or the masked network in
fp32, by the one check policy of :mod:`.checks`), so a fast wrong answer is reported as an
error, never as a speedup.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sparse_ops import Ticket, convert, ops
from sparse_ops.convert import TuneOptions
from sparse_ops.convert.tune import tuning_table

from . import BenchError

CHANNELS_LAST = torch.channels_last


@dataclass(frozen=True)
class Case:
    """One network (or single conv) + ticket + input, on a device, in a dtype."""

    model: nn.Module  # eval mode, fp32, CPU: providers copy it
    ticket: Ticket
    input_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


@dataclass
class Built:
    run: Callable[[torch.Tensor], torch.Tensor]
    computes: str  # "dense" or "masked"
    note: str = ""
    details: dict | None = None  # JSON-able, kept in the provider's result row


@dataclass(frozen=True)
class Provider:
    name: str
    devices: tuple[str, ...]
    build: Callable[[Case], Built]
    description: str
    default: bool = True  # in the default provider list of a device it supports


def _dense_copy(case: Case) -> nn.Module:
    model = copy.deepcopy(case.model)
    return model.to(case.device, case.dtype, memory_format=CHANNELS_LAST).eval()


def _dense(case: Case) -> Built:
    model = _dense_copy(case)
    return Built(model, "dense")


def _masked(case: Case) -> Built:
    model = copy.deepcopy(case.model)
    case.ticket.apply(model, None, hooks=True)  # weights are the model's: same as the others
    model = model.to(case.device, case.dtype, memory_format=CHANNELS_LAST).eval()
    return Built(model, "masked")


def _on_backend(name: str, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with ops.backend(name):
            return module(x)

    return run


def _narrow(case: Case) -> Built:
    fast = convert(
        case.model,
        unweighted(case.ticket),
        mode="channel",
        dtype=case.dtype,
        device=case.device,
        on_unstructured="dense",
        input_size=case.input_shape[1:],
    )
    return Built(_on_backend("torch", fast), "masked")


def _ours(case: Case) -> Built:
    # Tuned afresh (no cache): a benchmark measures this machine as it is now.
    example = torch.randn(case.input_shape, generator=torch.Generator().manual_seed(1))
    fast, report = convert(
        case.model,
        unweighted(case.ticket),
        mode="auto",
        dtype=case.dtype,
        device=case.device,
        on_unstructured="regroup",
        input_size=case.input_shape[1:],
        return_report=True,
        tune=example,
        tune_options=TuneOptions(cache=None),
    )
    kinds = sorted({r.representation for r in report.layers if r.kind == "conv"})
    tuning = report.notes["tuning"]
    note = (
        f"{'/'.join(kinds)}; FLOPs {100 * report.flops_after / report.flops_dense:.1f}%; "
        f"tuned in {tuning['seconds']:.1f} s"
    )
    details = {
        "tuning": tuning,
        "tuning_table": tuning_table(report.layers, tuning),
        "layers": [{"name": r.name, "representation": r.representation} for r in report.layers],
    }
    return Built(fast, "masked", note, details)


def _dense_converted(case: Case, backend: str) -> Built:
    """The dense network converted (BatchNorm folded, epilogues fused), run on ``backend``:
    the same module for triton-dense (our kernel) and folded (torch / cuDNN)."""
    dense_ticket = Ticket({}, None, case.ticket.arch)
    fast = convert(
        case.model,
        dense_ticket,
        mode="channel",
        dtype=case.dtype,
        device=case.device,
        input_size=case.input_shape[1:],
    )
    return Built(_on_backend(backend, fast), "dense")


def _triton_dense(case: Case) -> Built:
    return _dense_converted(case, "triton")


def _folded(case: Case) -> Built:
    return _dense_converted(case, "torch")


def _compile(case: Case) -> Built:
    model = _dense_copy(case)
    # "max-autotune" would also turn on CUDA graphs for this provider alone; graph replay
    # is the harness's choice (--graph), the same for every provider.
    compiled = torch.compile(model, mode="max-autotune-no-cudagraphs")
    return Built(compiled, "dense", "max-autotune-no-cudagraphs")


def unweighted(ticket: Ticket) -> Ticket:
    """The ticket's masks over the model's own weights (every provider uses the same ones)."""
    return Ticket(ticket.masks, None, ticket.arch, meta=ticket.meta)


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("cudnn", ("cuda",), _dense, "dense network on cuDNN (benchmark=True)"),
        Provider("dense", ("cpu",), _dense, "dense network on oneDNN"),
        Provider("folded", ("cuda", "cpu"), _folded, "dense network, BatchNorm folded"),
        Provider("masked", ("cuda", "cpu"), _masked, "torch.nn.utils.prune hooks"),
        Provider("narrow", ("cuda", "cpu"), _narrow, "channel-narrowed network on torch convs"),
        Provider("compile", ("cuda", "cpu"), _compile, "torch.compile max-autotune, dense"),
        Provider("triton-dense", ("cuda",), _triton_dense, "dense network on our channel kernel"),
        Provider("ours", ("cuda", "cpu"), _ours, "converted: our kernels"),
    )
}
# torch.compile on the CPU needs a C++ toolchain and minutes per model: opt-in there.
_CPU_DEFAULT = ("dense", "folded", "masked", "narrow", "ours")
_CUDA_DEFAULT = ("cudnn", "folded", "masked", "narrow", "compile", "triton-dense", "ours")


def default_providers(device: torch.device) -> tuple[str, ...]:
    return _CUDA_DEFAULT if device.type == "cuda" else _CPU_DEFAULT


def baseline_provider(device: torch.device) -> str:
    """The dense baseline every speedup is relative to."""
    return "cudnn" if device.type == "cuda" else "dense"


def check_providers(names: list[str], device: torch.device) -> list[str]:
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise BenchError(f"unknown providers {unknown}; known: {sorted(PROVIDERS)}")
    wrong = [n for n in names if device.type not in PROVIDERS[n].devices]
    if wrong:
        raise BenchError(f"providers {wrong} do not run on {device.type}")
    return names
