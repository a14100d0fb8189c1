"""Whole jobs behind CLI commands (and the demo): prune with IMP, restructure a ticket."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from . import checkpoint_io, distributed, imp, models
from . import data as datasets
from .errors import SparseOpsError
from .progress import Progress
from .structure.methods import METHODS
from .tables import format_table
from .tickets.loading import load_ticket
from .tickets.ticket import Ticket
from .training import TrainConfig, Trainer


def prune_job(
    arch: str,
    out: str | Path,
    *,
    data: str = "digits",
    data_dir: str | None = None,
    image_size: int | None = None,
    rounds: int = 4,
    rate: float = 0.2,
    scope: str = "global",
    post: str = "none",
    post_options: dict[str, Any] | None = None,
    train: TrainConfig | None = None,
    progress: Progress | None = None,
    device: str = "auto",
    workers: int = 0,
) -> dict[str, Any]:
    """IMP on a built-in architecture and dataset; one ticket file per round in ``out``.

    Returns (and writes as ``summary.json``) ``{"rounds": [{"round", "density",
    "accuracy", ...}], ...}`` with round 0 the dense network.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it joins the job's process group and trains
    data-parallel (:mod:`sparse_ops.distributed`): every rank returns the same summary,
    only rank 0 writes files and prints progress. ``device``: auto, cuda or cpu;
    ``workers``: DataLoader processes for datasets decoded per sample (imagefolder).
    """
    job = dict(
        arch=arch,
        out=out,
        data=data,
        data_dir=data_dir,
        image_size=image_size,
        rounds=rounds,
        rate=rate,
        scope=scope,
        post=post,
        post_options=post_options,
        train=train,
        progress=progress,
        device=device,
        workers=workers,
    )
    if not distributed.launched():
        return _prune_job(**job)
    own_group = not torch.distributed.is_initialized()
    try:
        summary = _prune_job(**job)
    except BaseException as exc:
        # No final barrier when failing: the other ranks may never reach it. torchrun
        # stops them once this process exits.
        if own_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if isinstance(exc, SparseOpsError):  # say which rank failed (torchrun's numbering)
            where = f"rank {distributed.rank()} of {os.environ.get('WORLD_SIZE')}"
            raise type(exc)(f"{where}: {exc}") from None
        raise
    if own_group:
        distributed.shutdown()  # barrier: nobody leaves while others still work
    return summary


def _prune_job(
    *,
    arch,
    out,
    data,
    data_dir,
    image_size,
    rounds,
    rate,
    scope,
    post,
    post_options,
    train,
    progress,
    device,
    workers,
) -> dict[str, Any]:
    """:func:`prune_job`'s work, inside the process group when there is one."""
    from .structure.refill import ACTIVATION_CRITERIA

    post_options = dict(post_options or {})
    # Activation criteria rank channels on a training batch, which this job supplies.
    needs_batch = (
        post.startswith("refill")
        and "batch" not in post_options
        and post_options.get("criterion") in ACTIVATION_CRITERIA
    )
    imp.resolve_post(post, {**post_options, "batch": ()} if needs_batch else post_options)
    imp._check_rate(rate)  # bad options fail before any training
    progress = progress or Progress()
    train = train or TrainConfig()
    info = models.info(arch)
    torch_device = distributed.init_from_env(device)
    main = distributed.is_main()
    if not main:
        progress = Progress(enabled=False)  # one status line per job, rank 0's
    dataset = datasets.load(data, data_dir, image_size=image_size, seed=train.seed)
    if needs_batch:
        size = train.batch_size
        post_options["batch"] = (dataset.train.images[:size], dataset.train.labels[:size])
    progress.line(f"data: {dataset.describe()}")
    torch.manual_seed(train.seed)
    model = models.create(info.name, dataset.num_classes)
    if dataset.normalized:
        _identity_normalize(model, progress)
    trainer = Trainer(dataset, train, progress=progress, device=torch_device, workers=workers)
    out = Path(out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    world = distributed.world_size()
    if world > 1:
        progress.line(
            f"distributed: {world} ranks ({torch.distributed.get_backend()}), batch "
            f"{train.batch_size} per rank, {train.batch_size * world} per step"
        )
    example = dataset.test.images[:1]
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    fits: dict[int, dict] = {}

    def train_fn(m, ctx):
        fits[ctx.round] = trainer.fit(m, ctx)

    for ticket in imp.run(
        model,
        rounds,
        train_fn,
        trainer.accuracy,
        rate=rate,
        scope=scope,
        post=post,
        post_options=post_options,
        example_input=example,
        arch=info.name,
    ):
        r = ticket.meta["round"]
        # Cheap guard (a fingerprint per tensor): DDP keeps the ranks' weights equal, and
        # masks come from rank 0; anything else is a bug worth stopping for.
        distributed.check_identical(ticket.masks, f"round {r} masks")
        distributed.check_identical(ticket.weights, f"round {r} trained weights")
        ticket.meta.update(data=data, train=train.as_dict(), world_size=world)
        path = out / f"round{r}.safetensors"
        if main:
            ticket.save(path)
        row = {
            "round": r,
            "density": ticket.density,
            "sparsity": ticket.sparsity,
            "imp_density": ticket.meta["imp_density"],
            "accuracy": ticket.meta["accuracy"],
            "val_accuracy": fits[r]["best_val"],
            "best_epoch": fits[r]["best_epoch"],
            "seconds": fits[r]["seconds"],
            "ticket": str(path),
        }
        rows.append(row)
        progress.line(
            f"round {r}: density {row['density']:.4f} (sparsity {100 * row['sparsity']:.2f}%), "
            f"test accuracy {row['accuracy']:.2f}% (val {row['val_accuracy']:.2f}%, "
            f"epoch {row['best_epoch']}), {row['seconds']:.0f}s"
        )
    dense = rows[0]["accuracy"]
    summary = {
        "arch": info.name,
        "data": data,
        "post": post,
        "post_options": {k: v for k, v in post_options.items() if k != "batch"},
        "rate": rate,
        "scope": scope,
        "train": train.as_dict(),
        "dense_accuracy": dense,
        "final": dict(rows[-1], accuracy_drop=dense - rows[-1]["accuracy"]),
        "rounds": rows,
        "seconds": time.perf_counter() - start,
        "out": str(out),
        "world_size": world,
        "device": str(torch_device),
    }
    if main:
        checkpoint_io.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _identity_normalize(model: torch.nn.Module, progress: Progress) -> None:
    """The data arrive mean/std-normalised (imagefolder): make the model's own
    ``normalize`` module (CIFAR statistics in Structure-LTH's models) a no-op rather
    than normalise twice."""
    norm = getattr(model, "normalize", None)
    if isinstance(getattr(norm, "mean", None), torch.Tensor):
        with torch.no_grad():
            norm.mean.zero_()
            norm.std.fill_(1.0)
        progress.line("data normalised with the ImageNet mean/std: model.normalize set to identity")


def render_prune(summary: dict[str, Any]) -> str:
    headers = ["round", "density", "sparsity", "test acc %", "val acc %", "IMP density", "time s"]
    rows = [
        [
            r["round"],
            r["density"],
            f"{100 * r['sparsity']:.2f}%",
            f"{r['accuracy']:.2f}",
            f"{r['val_accuracy']:.2f}",
            r["imp_density"],
            f"{r['seconds']:.0f}",
        ]
        for r in summary["rounds"]
    ]
    final = summary["final"]
    return (
        f"IMP on {summary['arch']} / {summary['data']}, rate {summary['rate']}, "
        f"post-processing: {summary['post']}\n"
        + format_table(headers, rows, align="rrrrrrr")
        + f"\n\nfinal: sparsity {100 * final['sparsity']:.2f}%, test accuracy "
        f"{final['accuracy']:.2f}% ({_versus_dense(final['accuracy_drop'])})"
        f"\ntickets and summary.json in {summary['out']}/"
    )


def restructure_job(
    source: str | Path,
    out: str | Path,
    method: str,
    *,
    arch: str | None = None,
    options: dict[str, Any] | None = None,
    batch: tuple[torch.Tensor, ...] | None = None,
) -> tuple[Ticket, dict[str, Any]]:
    """Apply one structuring step to a ticket in any readable format; save ours."""
    ticket = load_ticket(source, arch=arch)
    options = dict(options or {})
    if batch is not None and method.startswith("refill"):
        options["batch"] = batch  # only refill's feature criteria read activations
    post = imp.resolve_post(method, options)
    if post is None:
        raise imp.IMPError(f"restructure needs a method: {', '.join(METHODS)}")
    result = post(ticket, None)
    path = result.save(out)
    report = result.meta["structure_report"]
    summary = {
        "input": str(source),
        "output": str(path),
        "arch": result.arch,
        "method": report["method"],
        "params": report["params"],
        "density_before": ticket.density,
        "density_after": result.density,
        "layers": report["layers"],
    }
    return result, summary


def convert_job(
    source: str | Path,
    out: str | Path,
    *,
    arch: str | None = None,
    mode: str = "auto",
    dtype: str | None = None,
    on_unstructured: str = "error",
    target: str = "cuda",
    batch: int = 2,
    tune_batch: int | None = None,
    tune_cache: str | Path | None = "default",
    progress: bool = False,
):
    """Load a ticket, convert its architecture, check the result, save it. ``target``
    (cuda or cpu) is the device ``mode="auto"`` prices the layers for; with
    ``tune_batch`` the layers are also timed there, at that batch size (``convert(tune=)``;
    the target must then be this machine's)."""
    from .convert import CostModel, TuneOptions, convert, masked_model, save_converted
    from .errors import SparseOpsError

    if tune_batch is not None and tune_batch < 1:
        raise SparseOpsError(f"--tune-batch must be ≥ 1, got {tune_batch}")
    if tune_batch is not None and target == "cuda" and not torch.cuda.is_available():
        raise SparseOpsError(
            "--tune times the layers on the target: --target cuda needs a GPU "
            "here (or tune for this machine with --target cpu)"
        )
    ticket = load_ticket(source, arch=arch)
    if ticket.arch is None or not models.is_known(ticket.arch):
        raise SparseOpsError(f"{source}: the ticket names no built-in architecture; pass --arch")
    model = ticket.create_model().eval()
    torch_dtype = getattr(torch, dtype) if dtype else None
    tuning = {}
    if tune_batch is not None:
        size = models.info(ticket.arch).input_size
        example = torch.randn(tune_batch, *size, generator=torch.Generator().manual_seed(1))
        tuning = {
            "tune": example,
            "device": target,
            "tune_options": TuneOptions(cache=tune_cache, progress=progress),
        }
    fast, report = convert(
        model,
        ticket,
        mode=mode,
        dtype=torch_dtype,
        on_unstructured=on_unstructured,
        return_report=True,
        cost=CostModel.for_device(target),
        **tuning,
    )
    fast = fast.cpu()  # checked and saved from the CPU: the file runs on either device
    reference = masked_model(model, ticket)
    x = torch.randn(batch, *report.input_shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)
        got = fast(x.to(torch_dtype) if torch_dtype else x).float()
    path = save_converted(fast, out)
    summary = {
        "input": str(source),
        "output": str(path),
        "arch": ticket.arch,
        "mode": mode,
        "target": target,
        "dtype": dtype or "float32",
        "has_trained_weights": ticket.weights is not None,
        "max_abs_diff": float((expected - got).abs().max()),
        "max_abs_output": float(expected.abs().max()),
        "tuned": tune_batch is not None,
        "report": report.as_dict(),
    }
    return summary, report


def _versus_dense(drop: float) -> str:
    """``drop`` = dense accuracy − ticket accuracy, in words (a ticket may beat dense)."""
    if round(drop, 2) == 0:
        return "same as dense"
    return f"{abs(drop):.2f} points {'below' if drop > 0 else 'above'} dense"
