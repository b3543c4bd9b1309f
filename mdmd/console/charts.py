"""Charts for the console, drawn on the server as SVG (no script, nothing to
load): horizontal bars with their numbers, a stacked bar per profile, and
columns for a daily series.  Colours are presentation attributes, which the
console's Content-Security-Policy allows (inline ``style`` it does not).
Every chart has a text alternative (``aria-label``) and the page prints its
numbers beside it."""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

__all__ = ["PALETTE", "bars", "columns", "stacked"]

#: Colours by meaning, readable on white and distinguishable in grey.
PALETTE = {
    "good": "#2e7d32",
    "warn": "#ef6c00",
    "bad": "#c62828",
    "info": "#1565c0",
    "muted": "#757575",
    "other": "#6a1b9a",
}


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.1f}"


def bars(rows: Sequence[tuple[str, float, str]], *, label: str, width: int = 420) -> Markup:
    """One horizontal bar per (name, value, colour key), scaled to the
    largest, the number after each bar."""
    top = max((v for _, v, _ in rows), default=0) or 1
    name_w, bar_w, row_h = 110, width - 110 - 70, 24
    height = row_h * len(rows) + 4
    out = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(label)}">'
    ]
    for i, (name, value, colour) in enumerate(rows):
        y = i * row_h + 2
        w = max(0.0, bar_w * value / top)
        out.append(f'<text x="0" y="{y + 16}" font-size="13" fill="#222">{escape(name)}</text>')
        out.append(
            f'<rect x="{name_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" '
            f'fill="{PALETTE.get(colour, PALETTE["info"])}"/>'
        )
        out.append(
            f'<text x="{name_w + w + 6:.1f}" y="{y + 16}" font-size="13" fill="#222">{_number(value)}</text>'
        )
    out.append("</svg>")
    return Markup("".join(out))


def stacked(parts: Sequence[tuple[str, float, str]], *, label: str, width: int = 300) -> Markup:
    """One bar split into (name, value, colour key) parts, in proportion."""
    total = sum(v for _, v, _ in parts)
    height = 18
    out = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(label)}">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#eeeeee"/>',
    ]
    x = 0.0
    for name, value, colour in parts:
        if value <= 0 or total <= 0:
            continue
        w = width * value / total
        out.append(
            f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="{height}" '
            f'fill="{PALETTE.get(colour, PALETTE["info"])}">'
            f"<title>{escape(name)}: {_number(value)}</title></rect>"
        )
        x += w
    out.append("</svg>")
    return Markup("".join(out))


def columns(
    series: Sequence[tuple[str, float]], *, label: str, width: int = 1100, height: int = 150
) -> Markup:
    """A column per (label, value), e.g. one per day; every seventh label shown."""
    top = max((v for _, v in series), default=0) or 1
    n = max(1, len(series))
    plot_h = height - 34
    step = width / n
    out = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(label)}">',
        f'<line x1="0" y1="{plot_h + 0.5}" x2="{width}" y2="{plot_h + 0.5}" stroke="#999"/>',
        f'<text x="0" y="11" font-size="11" fill="#555">max {_number(top)}</text>',
    ]
    for i, (name, value) in enumerate(series):
        h = plot_h * value / top
        x = i * step
        out.append(
            f'<rect x="{x + 1:.1f}" y="{plot_h - h:.1f}" width="{max(1.0, step - 2):.1f}" height="{h:.1f}" '
            f'fill="{PALETTE["info"]}"><title>{escape(name)}: {_number(value)}</title></rect>'
        )
        if i % 7 == 0 or (i == n - 1 and i % 7 >= 4):
            out.append(
                f'<text x="{x:.1f}" y="{height - 8}" font-size="11" fill="#555">{escape(name[5:])}</text>'
            )
    out.append("</svg>")
    return Markup("".join(out))
