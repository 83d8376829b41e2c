"""Markdown cells and tables shared by the results' Markdown renderings (latency, trace, memory)."""

from __future__ import annotations

__all__ = ["fmt_bytes", "fmt_ms", "markdown_table"]


def fmt_bytes(n: float | None) -> str:
    """Bytes in B, KiB, MiB or GiB (signed, for differences); "–" for None."""
    if n is None:
        return "–"
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n:.1f} GiB"


def fmt_ms(v: float | None) -> str:
    """Milliseconds with three decimals; "–" for None."""
    return "–" if v is None else f"{v:.3f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
