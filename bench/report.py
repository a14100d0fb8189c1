"""Render a benchmark result: a Markdown table and PNG plots.

Plots (one panel per network, or per network's set of layers, and per method):

``<stem>_latency.png``  median latency vs sparsity per provider (p20–p80 as error
                        bars). Per-layer results are summed over the network's
                        distinct layers, each weighted by how often it occurs.
``<stem>_saving.png``   running-time saving ``1 − t / t_dense`` of ``ours`` (and
                        ``narrow``) vs sparsity, with Structure-LTH's published
                        savings overlaid where the paper gives one for that network.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from sparse_ops.checkpoint_io import atomic_output
from sparse_ops.tables import format_table

# Published running-time savings (Structure-LTH, REFERENCE.md), against their weaker
# baseline (one cold launch, cuDNN 7 no-workspace fp32, RTX 2080 Ti). (network, method)
# → [(sparsity or None where the paper does not tie the number to one, saving)].
PUBLISHED: dict[tuple[str, str], list[tuple[float | None, float]]] = {
    ("vgg16_bn", "regroup"): [(None, 0.5775)],
    ("vgg16_bn", "refill"): [(None, 0.6311)],
    ("res18", "regroup"): [(None, 0.5545)],
    ("res50", "regroup"): [(0.51, 0.5375), (0.58, 0.6023)],
    ("resnet50", "regroup"): [(0.51, 0.5375), (0.58, 0.6023)],
}


SAVING_FLOOR = -100.0  # percent: a 2× slowdown


def _case_label(r: dict[str, Any]) -> str:
    if r["kind"] == "layer":
        return f"{r['arch']}:{r['layer']}"
    return f"{r['arch']} (b{r['input'][0]}, {r['input'][2]}×{r['input'][3]})"


def _timer_text(result: dict[str, Any]) -> str:
    if result["device"] != "cuda":
        return "perf_counter"
    replay = "CUDA-graph replays" if result["timing"].get("graph") else "eager launches"
    return f"CUDA events, L2 flushed, {replay}"


def markdown(result: dict[str, Any]) -> str:
    """One row per (case, method, sparsity); one column per provider (median ms)."""
    env = result["environment"]
    where = env.get("gpu") or env.get("cpu")
    head = (
        f"**{result['preset']}** on {where} · {result['dtype']} · {result['layout']} · "
        f"torch {env['versions'].get('torch')} · triton {env['versions'].get('triton')} · "
        f"commit {env.get('commit')}\n\n"
        f"Median latency in ms over {result['timing']['repeats']} runs "
        f"({_timer_text(result)}"
        f"{', ' + str(env.get('torch_threads')) + ' threads' if result['device'] != 'cuda' else ''}"
        f"); **speedup** = {result['baseline']} / ours.\n"
    )
    providers = result["providers"]
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in result["rows"]:
        groups[(_case_label(r), r["method"], r["sparsity"], r["density"])][r["provider"]] = r
    rows = []
    for (label, method, sparsity, density), by_provider in groups.items():
        cells = []
        for p in providers:
            r = by_provider.get(p)
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                cells.append("error" if r["status"].startswith("error") else "WRONG")
            else:
                cells.append(f"{r['median_ms']:.3f}")
        ours = by_provider.get("ours", {})
        speedup = f"{ours['speedup']:.2f}×" if "speedup" in ours else ""
        rows.append([label, method, f"{sparsity:.0%}", f"{density:.3f}", *cells, speedup])
    table = format_table(
        ["case", "method", "sparsity", "density", *providers, "speedup"], rows, markdown=True
    )
    failures = [
        f"- {_case_label(r)} {r['method']} {r['sparsity']:.0%} {r['provider']}: {r['status']}"
        for r in result["rows"]
        if r["status"] != "ok"
    ]
    tail = "\n\nNot timed:\n" + "\n".join(failures) if failures else ""
    return head + "\n" + table + tail


Series = tuple[list[float], list[float], list[float], list[float]]


def _series(rows: list[dict], provider: str, against: str | None = None) -> Series:
    """(sparsity, median, p20, p80) summed over layers × their multiplicity.

    A sparsity counts only where every layer has a timed row for ``provider`` (and for
    ``against``): a sum missing a failed layer would flatter that provider.
    """
    wanted = {provider} if against is None else {provider, against}
    ok = {(r["layer"], r["sparsity"], r["provider"]) for r in rows if r["status"] == "ok"}
    layers: dict[float, set] = defaultdict(set)
    for r in rows:
        layers[r["sparsity"]].add(r["layer"])
    complete = {
        s for s, names in layers.items() if all((n, s, p) in ok for n in names for p in wanted)
    }
    acc: dict[float, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for r in rows:
        if r["provider"] != provider or r["status"] != "ok" or r["sparsity"] not in complete:
            continue
        a = acc[r["sparsity"]]
        for i, k in enumerate(("median_ms", "p20_ms", "p80_ms")):
            a[i] += r[k] * r.get("count", 1)
    xs = sorted(acc)
    return xs, [acc[s][0] for s in xs], [acc[s][1] for s in xs], [acc[s][2] for s in xs]


def _panels(result: dict[str, Any]) -> dict[tuple[str, str, str], list[dict]]:
    panels: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in result["rows"]:
        where = "layers" if r["kind"] == "layer" else f"b{r['input'][0]} {r['input'][2]}px"
        panels[(r["arch"], where, r["method"])].append(r)
    return panels


def plots(result: dict[str, Any], out: Path, stem: str) -> dict[str, Path]:
    """Write the two PNGs; returns their paths (empty without matplotlib, with a note)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return {}
    panels = _panels(result)
    n = len(panels)
    cols = min(3, n)
    nrows = (n + cols - 1) // cols
    paths = {}
    base = result["baseline"]
    where = result["environment"].get("gpu") or result["environment"].get("cpu")
    for kind in ("latency", "saving"):
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
        for ax, ((arch, scope, method), rows) in zip(axes.flat, panels.items(), strict=False):
            if kind == "latency":
                for p in result["providers"]:
                    xs, med, lo, hi = _series(rows, p)
                    if xs:
                        err = [
                            [m - a for m, a in zip(med, lo, strict=True)],
                            [b - m for m, b in zip(med, hi, strict=True)],
                        ]
                        ax.errorbar(
                            [100 * s for s in xs], med, yerr=err, marker="o", capsize=2, label=p
                        )
                ax.set_ylabel("latency (ms" + (", Σ layers)" if scope == "layers" else ")"))
            else:
                for p in ("ours", "narrow"):
                    xb, tb, _, _ = _series(rows, base, p)
                    t0 = dict(zip(xb, tb, strict=True))
                    xs, med, _, _ = _series(rows, p, base)
                    pts = [
                        (100 * s, 100 * (1 - m / t0[s]))
                        for s, m in zip(xs, med, strict=True)
                        if s in t0
                    ]
                    if pts:
                        # A slowdown beyond −100% would flatten every other point: such
                        # points sit on the floor as downward triangles.
                        xs_, ys_ = zip(*pts, strict=True)
                        line = ax.plot(
                            xs_,
                            [max(y, SAVING_FLOOR) for y in ys_],
                            marker="o",
                            label=f"{p} vs {base}",
                        )[0]
                        low = [(x, SAVING_FLOOR) for x, y in pts if y < SAVING_FLOOR]
                        if low:
                            ax.plot(*zip(*low, strict=True), "v", c=line.get_color(), ms=9)
                for sparsity, saving in PUBLISHED.get((arch, method), []):
                    if sparsity is None:
                        ax.axhline(
                            100 * saving, ls="--", c="gray", lw=1, label="paper (sparsity not tied)"
                        )
                    else:
                        ax.plot(100 * sparsity, 100 * saving, "k*", ms=10, label="paper")
                ax.axhline(0, c="black", lw=0.5)
                ax.set_ylabel("running-time saving (%)")
            ax.set_title(f"{arch} {scope} · {method}", fontsize=10)
            ax.set_xlabel("sparsity (%)")
            ax.grid(alpha=0.3)
            handles, labels = ax.get_legend_handles_labels()
            unique = dict(zip(labels, handles, strict=True))
            ax.legend(unique.values(), unique.keys(), fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        fig.suptitle(f"{result['preset']} · {where} · {result['dtype']}", fontsize=11)
        fig.tight_layout()
        path = out / f"{stem}_{kind}.png"
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths[kind] = path
    return paths


def summary_lines(result: dict[str, Any]) -> list[str]:
    """One line per model/layer set and method: ours' speedup range over sparsities."""
    lines = []
    for (arch, scope, method), rows in _panels(result).items():
        xs, med, _, _ = _series(rows, "ours", result["baseline"])
        xb, tb, _, _ = _series(rows, result["baseline"], "ours")
        t0 = dict(zip(xb, tb, strict=True))
        parts = [
            f"{100 * s:.0f}%: {t0[s] / m:.2f}×" for s, m in zip(xs, med, strict=True) if s in t0
        ]
        if parts:
            lines.append(f"{arch} {scope} {method}: " + ", ".join(parts))
    return lines
