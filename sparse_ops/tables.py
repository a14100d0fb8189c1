"""Plain-text and Markdown tables for the CLI and reports."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import printable


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    align: str | None = None,
    markdown: bool = False,
) -> str:
    """Render rows as aligned text (or a Markdown pipe table).

    ``align`` holds one of ``l``/``r`` per column; by default text columns align left
    and numeric ones right.
    """
    cells = [[_cell(v) for v in row] for row in rows]
    if align is None:
        align = "".join(
            "r" if rows and all(isinstance(r[i], int | float) for r in rows) else "l"
            for i in range(len(headers))
        )
    if len(align) != len(headers) or any(len(r) != len(headers) for r in cells):
        raise ValueError("every row and the align string must have one entry per header")
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if a == "r" else v.ljust(w)
            for v, w, a in zip(values, widths, align, strict=True)
        ]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    out = [line(list(headers))]
    if markdown:
        out.append(
            "|"
            + "|".join(
                ("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2))
                for w, a in zip(widths, align, strict=True)
            )
            + "|"
        )
    else:
        out.append("  ".join("-" * w for w in widths))
    out += [line(r) for r in cells]
    return "\n".join(out)


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return printable(value)  # layer names come from files


def shape_text(shape: Sequence[int]) -> str:
    return "×".join(str(s) for s in shape)
