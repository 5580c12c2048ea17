"""The one table printer (markdown) and the number formats the tables share."""

from __future__ import annotations


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table; every row as long as `headers`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_us(us: float | None) -> str:
    if us is None:
        return "–"
    if us >= 10_000:
        return f"{us / 1000:.1f} ms"
    return f"{us:.0f} µs"


def fmt_x(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}×" if x < 100 else f"{x:.0f}×"


def fmt_num(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"
