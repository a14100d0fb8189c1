"""``sparse-ops demo``: the whole story on the embedded default, in a few minutes.

No download, no user data: the 8×8 digits shipped inside scikit-learn, upsampled to
16×16, and a CIFAR ResNet-20 (``res20s``).

1. **Find structured tickets.** Structure-LTH's IMP (global magnitude pruning of 20%
   of the remaining conv weights per round, stem and classifier kept, rewind to
   the start of training) with *refill* after every round, and again with *regroup*
   after every round (group-aware IMP). Test accuracy per round.
2. **Convert** the last ticket of each run: refill → channel-pruned convs,
   regroup → group-wise block-sparse convs; BatchNorm folded, ReLU and residual adds
   fused. Check that the converted module computes the masked network: max |Δ| on
   the test set, same predictions, same accuracy.
3. **Measure** latency at the CIFAR shape (batch 64, 3×32×32) against the dense
   baselines: on the GPU when there is one (cuDNN, our kernels, ...), else on the CPU
   (oneDNN, the torch paths of our modules). Same harness as ``sparse-ops bench``.
4. **Report**: printed tables (latency per final ticket; sparsity and accuracy per IMP
   round; each method's *winning ticket*, the sparsest round within
   ``WINNING_MARGIN`` points of the dense accuracy, as ``summary["winning"]``),
   ``summary.json``, ``results.md``, and plots ``accuracy.png`` (accuracy vs sparsity
   per round) and ``latency.png``; the tickets (``*.safetensors``, our format) and the
   converted modules.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sparse_ops import data as datasets
from sparse_ops import imp, models
from sparse_ops.checkpoint_io import atomic_output, write_text
from sparse_ops.convert import convert, masked_model, save_converted
from sparse_ops.progress import Progress
from sparse_ops.tables import format_table
from sparse_ops.tickets import Ticket
from sparse_ops.training import TrainConfig, Trainer

from . import harness
from .checks import compare_predictions, converted_ok
from .env import environment, resolve_device
from .providers import baseline_provider, default_providers


@dataclass(frozen=True)
class DemoConfig:
    arch: str = "res20s"
    image_size: int = 16
    rounds: int = 4
    rate: float = 0.2
    epochs: int = 4
    latency_batch: int = 64
    latency_size: int = 32
    warmup: int = 3
    repeats: int = 25
    seed: int = 0


# Same pipeline, seconds instead of minutes: for tests and smoke runs.
QUICK = DemoConfig(rounds=1, epochs=1, latency_batch=8, latency_size=16, warmup=1, repeats=2)

# What each structuring method converts to.
METHODS = {"refill": "channel", "regroup": "group"}

# A winning ticket keeps the dense accuracy; on a 360-image test set one image is 0.28
# points, so "within 1 point" allows three images of noise.
WINNING_MARGIN = 1.0


def run_demo(
    out: str | Path = "sparse-ops-out",
    *,
    quiet: bool = False,
    config: DemoConfig = DemoConfig(),
    device: str | None = None,
) -> dict[str, Any]:
    device_ = resolve_device(device)  # a bad device fails now, not after the training
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(enabled=not quiet)
    start = time.perf_counter()

    def step(i: int, text: str) -> None:
        progress.line(f"[{i}/4] {text} (t={time.perf_counter() - start:.0f}s)")

    dataset = datasets.load("digits", image_size=config.image_size, seed=config.seed)
    train = TrainConfig(epochs=config.epochs, batch_size=64, weight_decay=5e-4, seed=config.seed)
    trainer = Trainer(dataset, train, progress=progress)
    step(
        1,
        f"IMP on {dataset.describe()} with {config.arch}: {config.rounds} rounds of "
        f"{config.rate:.0%}, refill / regroup after every round",
    )
    runs: dict[str, list[Ticket]] = {}
    for method in METHODS:
        runs[method] = _imp(config, method, dataset, trainer, progress)
    finals = {m: tickets[-1] for m, tickets in runs.items()}
    for method, ticket in finals.items():
        ticket.save(out / f"{config.arch}_{method}.safetensors")

    step(2, "convert the final tickets and check them against the masked network")
    test_x, test_y = dataset.test.images, dataset.test.labels
    converted, checks = {}, {}
    for method, ticket in finals.items():
        model = models.create(config.arch, dataset.num_classes).eval()
        fast, report = convert(
            model,
            ticket,
            mode=METHODS[method],
            return_report=True,
            input_size=(3, config.image_size, config.image_size),
        )
        reference = masked_model(model, ticket)
        with torch.inference_mode():
            y_ref, y_fast = reference(test_x), fast(test_x)
        checks[method] = {
            "mode": METHODS[method],
            **compare_predictions(y_fast, y_ref, test_y),
            "flops_ratio": report.flops_after / report.flops_dense,
            "params_ratio": report.params_after / report.params_dense,
            "representations": sorted({r.representation for r in report.layers}),
        }
        converted[method] = fast
        save_converted(fast, out / f"{config.arch}_{method}_converted.safetensors")
        c = checks[method]
        progress.line(
            f"      {method}: {c['mode']} units {c['representations']}, FLOPs "
            f"{100 * c['flops_ratio']:.1f}% of dense, max |Δ| {c['max_abs_diff']:.2e}, "
            f"same predictions: {c['same_predictions']}"
        )

    shape = (config.latency_batch, 3, config.latency_size, config.latency_size)
    step(
        3,
        f"latency on {_where(device_)} at input {tuple(shape)}, "
        f"median of {config.repeats} runs after {config.warmup} warm-up",
    )
    latency = _latency(config, finals, dataset.num_classes, shape, device_, progress)

    step(4, f"write the table, plots and JSON to {out}/")
    summary = _summary(config, dataset, runs, checks, latency, device_, start)
    table = render(summary)
    write_text(out / "results.md", table + "\n")
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    summary["plots"] = [str(p) for p in _plots(summary, out)]
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    verdict = "all checks passed" if summary["ok"] else "CHECKS FAILED"
    if not quiet:  # the result on stdout (progress went to stderr), so it can be piped
        print(
            f"\n{table}\n\n{verdict} in {time.perf_counter() - start:.0f}s; outputs in {out}/",
            flush=True,
        )
    return summary


def _imp(config, method, dataset, trainer, progress) -> list[Ticket]:
    torch.manual_seed(config.seed)
    model = models.create(config.arch, dataset.num_classes)
    tickets = []
    for ticket in imp.run(
        model,
        config.rounds,
        trainer.fit,
        trainer.accuracy,
        rate=config.rate,
        post=method,
        example_input=dataset.test.images[:1],
        arch=config.arch,
    ):
        tickets.append(ticket)
        progress.line(
            f"      {method} round {ticket.meta['round']}: sparsity "
            f"{100 * ticket.sparsity:.1f}%, test accuracy "
            f"{ticket.meta['accuracy']:.2f}%"
        )
    return tickets


def _where(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"


def _latency(config, finals, num_classes, shape, device, progress) -> dict[str, list[dict]]:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(config.seed))
    timing = {"warmup": config.warmup, "repeats": config.repeats}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        timing["flush_l2"] = True
    providers = list(default_providers(device))
    if "compile" in providers:  # minutes of autotuning: `sparse-ops bench` covers it
        providers.remove("compile")
    result = {}
    for method, ticket in finals.items():
        model = models.create(config.arch, num_classes).eval()
        rows = harness.measure_case(model, ticket, x, providers, device=device, timing=timing)
        result[method] = rows
        for r in rows:
            if r["status"] != "ok":
                progress.line(f"      {method} {r['provider']}: {r['status']}")
    return result


def _summary(config, dataset, runs, checks, latency, device, start) -> dict[str, Any]:
    base = baseline_provider(device)
    ok = all(converted_ok(c) for c in checks.values())
    ok = ok and all(r["status"] == "ok" for rows in latency.values() for r in rows)
    imp_rows = {method: [_round_row(t) for t in tickets] for method, tickets in runs.items()}
    return {
        "ok": ok,
        "config": asdict(config),
        "data": dataset.describe(),
        "device": device.type,
        "baseline": base,
        "imp": imp_rows,
        "winning": {method: winning_ticket(rows) for method, rows in imp_rows.items()},
        "winning_margin": WINNING_MARGIN,
        "conversion": checks,
        "latency": latency,  # per ticket: one row per provider, raw samples included
        "environment": environment(),
        "seconds": time.perf_counter() - start,
    }


def _round_row(ticket: Ticket) -> dict[str, Any]:
    return {
        "round": ticket.meta["round"],
        "sparsity": ticket.sparsity,
        "density": ticket.density,
        "accuracy": ticket.meta["accuracy"],
    }


def winning_ticket(rounds: list[dict[str, Any]], margin: float = WINNING_MARGIN) -> dict:
    """The sparsest round (``round``, ``sparsity``, ``accuracy``) whose test accuracy is
    within ``margin`` points of round 0's (the dense network); round 0 if none is."""
    floor = rounds[0]["accuracy"] - margin
    best = max((r for r in rounds if r["accuracy"] >= floor), key=lambda r: r["sparsity"])
    return {k: best[k] for k in ("round", "sparsity", "accuracy")}


def render(summary: dict[str, Any]) -> str:
    """The demo's table: one row per ticket, latency per provider, speedup vs dense."""
    base = summary["baseline"]
    providers = [r["provider"] for r in next(iter(summary["latency"].values()))]
    dense_acc = next(iter(summary["imp"].values()))[0]["accuracy"]
    rows = []
    for method, rows_ in summary["latency"].items():
        final = summary["imp"][method][-1]
        check = summary["conversion"][method]
        by = {r["provider"]: r for r in rows_}
        t0 = by[base].get("median_ms")
        cells = [
            f"{by[p]['median_ms']:.1f}" if by[p]["status"] == "ok" else "error" for p in providers
        ]
        ours = by.get("ours", {}).get("median_ms")
        folded = by.get("folded", {}).get("median_ms")
        speedup = f"{t0 / ours:.2f}×" if t0 and ours else ""
        vs_folded = f"{folded / ours:.2f}×" if folded and ours else ""
        same = "yes" if check["same_predictions"] else "NO"
        rows.append(
            [
                method,
                f"{100 * final['sparsity']:.1f}%",
                f"{final['accuracy']:.2f}%",
                f"{100 * check['flops_ratio']:.1f}%",
                *cells,
                speedup,
                vs_folded,
                _versus_best(by, base),
                same,
            ]
        )
    head = [
        "ticket",
        "sparsity",
        "accuracy",
        "FLOPs",
        *[f"{p} ms" for p in providers],
        f"ours vs {base}",
        "ours vs folded",
        "ours / best other",
        "converted == masked",
    ]
    env = summary["environment"]
    where = env.get("gpu") or f"{env.get('cpu')}, {env.get('torch_threads')} threads"
    first = next(iter(summary["latency"].values()))[0]
    # FLOPs are those of the conversion checked above (channel / group units); `ours`
    # is tuned on the timing device: each layer's fastest representation there.
    notes, tables = [], []
    for method, rows_ in summary["latency"].items():
        for r in rows_:
            if r["provider"] == "ours" and r.get("note"):
                notes.append(f"- ours for {method}: {r['note']}")
            if r["provider"] == "ours" and r.get("details", {}).get("tuning_table"):
                tables.append(
                    f"ours for {method}, per layer:\n\n```text\n{r['details']['tuning_table']}\n```"
                )
    return (
        f"{summary['config']['arch']} on {summary['data']}; dense accuracy {dense_acc:.2f}%.\n"
        f"Latency: median ms at input {tuple(first['input'])} on {where}.\n\n"
        + format_table(head, rows, markdown=True)
        + "\n\nFLOPs: the refill ticket as channel units, the regroup ticket as group units. "
        "`ours` is convert(mode='auto', tune=input): every layer timed in each of its "
        "representations on this device, the fastest kept; 'best other' is the fastest of "
        "dense, folded and narrow.\n"
        + "\n".join(notes)
        + ("\n\n" + "\n\n".join(tables) if tables else "")
        + "\n\n"
        + _render_imp(summary)
    )


def _versus_best(by: dict[str, dict], base: str) -> str:
    """ours / the fastest whole-network alternative (dense, folded, narrow): ≤ 1 is the
    goal ('never slower')."""
    ours = by.get("ours", {}).get("median_ms")
    others = [
        by[p]["median_ms"] for p in (base, "folded", "narrow") if by.get(p, {}).get("median_ms")
    ]
    return f"{ours / min(others):.2f}" if ours and others else ""


def _render_imp(summary: dict[str, Any]) -> str:
    """Sparsity and test accuracy per IMP round and method, then each winning ticket."""
    methods = list(summary["imp"])
    head = ["round"] + [f"{m} {what}" for m in methods for what in ("sparsity", "accuracy")]
    rows = [
        [str(i)] + [cell for m in methods for cell in _round_cells(summary["imp"][m][i])]
        for i in range(len(summary["imp"][methods[0]]))
    ]
    margin = summary["winning_margin"]
    lines = [
        f"- {m}: round {w['round']}, {100 * w['sparsity']:.1f}% sparsity, "
        f"{w['accuracy']:.2f}% test accuracy"
        for m, w in summary["winning"].items()
    ]
    return (
        "IMP: sparsity and test accuracy after each round (round 0: dense).\n\n"
        + format_table(head, rows, markdown=True)
        + f"\n\nWinning tickets (the sparsest round within {margin:g} point of dense):\n"
        + "\n".join(lines)
    )


def _round_cells(r: dict[str, Any]) -> list[str]:
    return [f"{100 * r['sparsity']:.1f}%", f"{r['accuracy']:.2f}%"]


def _plots(summary: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, rounds in summary["imp"].items():
        ax.plot(
            [100 * r["sparsity"] for r in rounds],
            [r["accuracy"] for r in rounds],
            marker="o",
            label=f"IMP + {method}",
        )
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{summary['config']['arch']} on digits: accuracy per IMP round", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "accuracy.png")
    with atomic_output(paths[-1]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

    methods = list(summary["latency"])
    providers = [r["provider"] for r in summary["latency"][methods[0]]]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        rows = [next(r for r in summary["latency"][m] if r["provider"] == p) for m in methods]
        med = [r.get("median_ms", float("nan")) for r in rows]
        err = [
            [r.get("median_ms", 0) - r.get("p20_ms", 0) for r in rows],
            [r.get("p80_ms", 0) - r.get("median_ms", 0) for r in rows],
        ]
        ax.bar(
            [j + i * width for j in range(len(methods))], med, width, yerr=err, capsize=2, label=p
        )
    ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(methods))])
    ax.set_xticklabels(
        [f"{m} ({100 * summary['imp'][m][-1]['sparsity']:.0f}% sparse)" for m in methods]
    )
    ax.set_ylabel("median latency (ms)")
    first = summary["latency"][methods[0]][0]
    ax.set_title(f"latency at input {tuple(first['input'])}, {summary['device']}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths.append(out / "latency.png")
    with atomic_output(paths[-1]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return paths
