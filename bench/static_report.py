"""The static kernel report's verdicts and rendering: the floors a compiled row must meet,
the Markdown report, the static config ranking and the SPILLS tables that reports imply.

A row is one compile of :mod:`sparse_ops_bench.static_cases`' matrix, as
``python -m sparse_ops_bench.scripts.kernel_static`` writes it to ``kernel_static.json``.
"""

from __future__ import annotations

import json

from .static_cases import CASE_BY_NAME, CASES, Case


def config_label(row) -> str:
    """The row's config id, ``?`` where it has none (a case that failed to build)."""
    return row.get("config_id", "?")


# ---------------------------------------------------------------------- floors


def floor_failures(row: dict) -> list[str]:
    """What a compiled row misses of the floors: no spills anywhere; on aligned channel
    cases in fp16/bf16, both operands on 16-byte asynchronous copies in the MMA loop, no
    synchronous global load there, and no store narrower than 64 bits."""
    if row.get("withheld"):
        return []  # never offered on this Triton: it is in the spill table
    if not row["ok"]:
        return ["does not compile"]
    stats, missed = row["stats"], []
    if stats["spill_stores"] or stats["spill_loads"]:
        missed.append(f"spills {stats['spill_stores']} B")
    case = CASE_BY_NAME[row["case"]]
    if case.kernel == "channel" and case.aligned and row["dtype"] in ("float16", "bfloat16"):
        loop = stats["loop"]
        if loop is None:
            missed.append("no MMA loop found")
        else:
            if loop["global_loads"]:
                missed.append(f"{loop['global_loads']} synchronous loads in the K loop")
            narrow = {b: n for b, n in loop["load_bits"].items() if b != "128" and n}
            if narrow or not loop["async_copies"]:
                missed.append(f"K-loop copies not all 16-byte async: {loop['load_bits']}")
        narrow_stores = {b: n for b, n in stats["store_bits"].items() if int(b) < 64 and n}
        if narrow_stores:
            missed.append(f"narrow stores {narrow_stores}")
    if case.name in GROUP_LOOP_FLOORS and row["dtype"] in ("float16", "bfloat16"):
        missed += _group_loop_misses(row, case, GROUP_LOOP_FLOORS[case.name])
    return missed


# Group kernel floors, per case: SASS instructions per 32 gathered columns per warp in
# the innermost MMA loop (checked at BLOCK_K = 32, where one iteration is 32 columns;
# BLOCK_K = 16 iterations carry the same fixed cost for half the columns), and for
# column runs both operands on 16-byte asynchronous copies with no synchronous load.
GROUP_LOOP_FLOORS = {"groups-512": 300, "groups-512-run8": 120}


def _group_loop_misses(row: dict, case: Case, limit: int) -> list[str]:
    loop = row["stats"]["loop"]
    if loop is None:
        return ["no MMA loop found"]
    missed = []
    if row["config"]["BLOCK_K"] == 32 and loop["instructions"] > limit:
        missed.append(f"{loop['instructions']} instructions per 32 columns > {limit}")
    if case.col_run > 1:
        if loop["global_loads"]:
            missed.append(f"{loop['global_loads']} synchronous loads in the K loop")
        if loop["async_copies"] < 2 or not loop["load_bits"].get("128"):
            missed.append(f"operands not on 16-byte async copies: {loop['load_bits']}")
    return missed


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        f"# Static kernel report (Triton {env['triton']}, commit {env['commit']})",
        "",
    ]
    if "commit_group_rows" in env:  # a report whose kernels were compiled in two runs
        lines += [
            f"Channel kernel rows compiled at {env['commit_channel_rows']}, group kernel "
            f"rows at {env['commit_group_rows']}.",
            "",
        ]
    lines += [
        "Compiled ahead of time on a CPU, with the specialisation a real launch gets. "
        "`loop` = SASS instructions per iteration of the innermost MMA loop, per warp; "
        "`async` = asynchronous copies in that loop (cp.async / TMA) and their widths in "
        "bits; `ceiling` = the issue-bound fraction of the SM's peak tensor rate "
        "(FLOP per iteration ÷ (instructions × warps ÷ 4) ÷ peak per clock). "
        "**A bound from counted instructions, not a measured time.**",
        "",
    ]
    failed = [r for r in rows if floor_failures(r)]
    held = [r for r in rows if r.get("withheld")]
    offered = [r for r in rows if not r.get("withheld")]
    lines.append(
        f"{len(rows)} compiles: {len(offered)} of configs the autotuner may pick "
        f"on this Triton, {sum(not r['ok'] for r in offered)} of them failed, "
        f"{sum(bool(r['ok'] and r['stats']['spill_stores']) for r in offered)} spill, "
        f"{len(failed)} miss a floor; {len(held)} of configs the spill tables "
        "withhold on this Triton (marked *withheld*)."
    )
    for r in failed:
        lines.append(
            f"- {r['kernel']} {r['case']} {r['dtype']} {r['target']} {config_label(r)}: "
            + "; ".join(floor_failures(r))
        )
    lines.append("")
    header = (
        "| case | dtype | target | config | regs | spill B | smem KB | mma | loop instr "
        "| mma/iter | async (bits) | sync loads | stores (bits) | ceiling |"
    )
    for kernel in ("channel", "group"):
        kernel_rows = [r for r in rows if r["kernel"] == kernel]
        if not kernel_rows:
            continue
        lines += ["", f"## {kernel} kernel", "", header, "|" + "---|" * 14]
        for r in kernel_rows:
            if not r["ok"]:
                why = r["error"].splitlines()[-1][:80]
                lines.append(
                    f"| {r['case']} | {r['dtype']} | {r['target']} | {config_label(r)} "
                    f"| **fails**: {why} |||||||||"
                )
                continue
            s, loop = r["stats"], r["stats"]["loop"] or {}
            bits = ",".join(f"{b}×{n}" for b, n in loop.get("load_bits", {}).items() if n)
            stores = ",".join(f"{b}×{n}" for b, n in s["store_bits"].items())
            ceiling = "–" if r["ceiling"] is None else f"{100 * r['ceiling']:.1f}%"
            config = config_label(r) + (" *withheld*" if r.get("withheld") else "")
            cells = [
                r["case"],
                r["dtype"],
                r["target"],
                config,
                s["registers"],
                s["spill_stores"],
                f"{s['shared'] / 1024:.0f}",
                s["mma_kind"],
                loop.get("instructions", "–"),
                loop.get("mma", "–"),
                f"{loop.get('async_copies', 0)} ({bits or '–'})",
                loop.get("global_loads", "–"),
                stores or "–",
                ceiling,
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "## Cases", ""]
    lines += [f"- `{c.name}` ({c.kernel}): {c.note}" for c in CASES]
    return "\n".join(lines) + "\n"


def best_configs(rows: list[dict], target="sm_90a", dtype="float16") -> dict[str, list]:
    """Per case, configs ordered by issue ceiling (the static ranking --quick GPU runs use)."""
    ranked: dict[str, list] = {}
    for r in rows:
        if r.get("withheld") or not r["ok"]:
            continue
        if r["target"] == target and r["dtype"] == dtype and r["ceiling"] is not None:
            ranked.setdefault(r["case"], []).append((r["ceiling"], r["config"]))
    return {k: [c for _, c in sorted(v, key=lambda t: -t[0])] for k, v in ranked.items()}


def spill_table(paths) -> dict[str, dict[tuple[int, int], dict[str, list[str]]]]:
    """Per kernel, the SPILLS table that full-matrix reports (``--all-configs``) imply:
    {(major, minor): {"class/dtype": [config ids that spilled]}}."""
    table: dict = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        version = tuple(int(p) for p in payload["environment"]["triton"].split(".")[:2])
        for kernel in {row["kernel"] for row in payload["rows"]}:
            table.setdefault(kernel, {}).setdefault(version, {})  # measured, even if clean
        for row in payload["rows"]:
            if not row["ok"] or not (row["stats"]["spill_stores"] or row["stats"]["spill_loads"]):
                continue
            dtype = "float32" if row["dtype"] == "float32-ieee" else row["dtype"]
            key = f"{row['launch_class']}/{dtype}"
            entry = table.setdefault(row["kernel"], {}).setdefault(version, {})
            entry.setdefault(key, set()).add(row["config_id"])
    return {
        k: {v: {c: sorted(ids) for c, ids in sorted(e.items())} for v, e in sorted(t.items())}
        for k, t in table.items()
    }


def spill_table_text(paths) -> str:
    """:func:`spill_table` as each kernel's ``"spills"`` entry of its JSON config table
    (``kernels/<kernel>_conv.json``); a version with nothing spilling is an empty entry."""
    blocks = []
    for kernel, table in spill_table(paths).items():
        entry = {f"{major}.{minor}": ids for (major, minor), ids in table.items()}
        blocks.append(f'kernels/{kernel}_conv.json, "spills":\n{json.dumps(entry, indent=2)}')
    return "\n".join(blocks)
