"""Number formats and the aligned text tables of the benchmarks (no torch: the CLI imports it)."""

from __future__ import annotations


def fmt_s(x) -> str:
    if x is None:
        return "-"
    if x < 1e-3:
        return f"{x * 1e6:.0f} us"
    if x < 1:
        return f"{x * 1e3:.1f} ms"
    return f"{x:.2f} s"


def fmt_x(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_gbps(x) -> str:
    return "-" if x is None else f"{x:.2f} GB/s"


def layout_rows(rows: list[tuple[str, str, str]]) -> str:
    """The printed table: "== " section titles, then (name, value, note) rows in aligned columns."""
    w0 = max(len(a) for a, _, _ in rows if not a.startswith("== "))
    w1 = max(len(b) for a, b, _ in rows if not a.startswith("== "))
    lines = []
    for a, b, c in rows:
        if a.startswith("== "):
            lines.append(a)
        elif a or b or c:
            lines.append(f"  {a:<{w0}}  {b:>{w1}}  {c}".rstrip())
        else:
            lines.append("")
    return "\n".join(lines).strip("\n")
