"""Small inline SVG line charts for report.html.

matplotlib takes about 0.2 s per figure on a CPU, which at every epoch end of a short run would
cost more than the epoch; these charts are a few string joins (well under a millisecond),
stay sharp at any zoom and keep the page self-contained. They draw what the report needs and
no more: lines against a numeric x, optional point markers, a log y axis, gaps for missing
values, a legend.

    svg = line_chart({"train_loss": [(1, 0.9), (2, 0.5)]}, "Loss", "epoch", "loss")
"""

from __future__ import annotations

import html
import math
from typing import Dict, List, Sequence, Tuple

WIDTH, HEIGHT = 440, 280
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 62, 12, 40, 42
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
MARKER_LIMIT = 30  # points get markers up to this many per series


def nice_ticks(low: float, high: float, count: int = 5) -> List[float]:
    """Round tick values covering [low, high] (1, 2, 2.5 or 5 times a power of ten apart)."""
    if not math.isfinite(low) or not math.isfinite(high):
        return []
    if high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.0e}"
    return f"{value:g}"


def line_chart(series: Dict[str, Sequence[Tuple[float, float]]], title: str, xlabel: str, ylabel: str,
               log_y: bool = False, integer_x: bool = False) -> str:
    """An <svg> element; an empty string when no series has a finite point."""
    clean = {name: [(float(x), float(y)) for x, y in points] for name, points in series.items()}
    usable = [(x, y) for points in clean.values() for x, y in points
              if math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y)]
    if not usable:
        return ""
    ys = [math.log10(y) if log_y else y for _, y in usable]
    x_low, x_high = min(x for x, _ in usable), max(x for x, _ in usable)
    y_low, y_high = min(ys), max(ys)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    if y_high == y_low:
        pad = abs(y_high) * 0.05 or 0.5
        y_low, y_high = y_low - pad, y_high + pad
    pad = (y_high - y_low) * 0.05
    y_low, y_high = y_low - pad, y_high + pad
    plot_w, plot_h = WIDTH - MARGIN_LEFT - MARGIN_RIGHT, HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def px(x: float) -> float:
        return MARGIN_LEFT + (x - x_low) / (x_high - x_low) * plot_w

    def py(y: float) -> float:
        value = math.log10(y) if log_y else y
        return MARGIN_TOP + (y_high - value) / (y_high - y_low) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{html.escape(title)}" class="chart">',
           f'<text x="{WIDTH / 2}" y="17" text-anchor="middle" font-size="13" font-weight="bold">'
           f"{html.escape(title)}</text>",
           f'<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    x_ticks = nice_ticks(x_low, x_high)
    if integer_x:
        x_ticks = sorted({round(t) for t in x_ticks if abs(t - round(t)) < 1e-9})
    for tick in x_ticks:
        x = px(tick)
        out.append(f'<line x1="{x:.1f}" y1="{MARGIN_TOP}" x2="{x:.1f}" y2="{MARGIN_TOP + plot_h}" stroke="#eee"/>'
                   f'<text x="{x:.1f}" y="{MARGIN_TOP + plot_h + 14}" text-anchor="middle" font-size="10">'
                   f"{_label(tick)}</text>")
    if log_y:
        y_ticks = [10.0 ** e for e in range(math.ceil(y_low), math.floor(y_high) + 1)]
        if len(y_ticks) < 2:
            y_ticks = [10 ** t for t in nice_ticks(y_low, y_high)]
    else:
        y_ticks = nice_ticks(y_low, y_high)
    for tick in y_ticks:
        y = py(tick)
        out.append(f'<line x1="{MARGIN_LEFT}" y1="{y:.1f}" x2="{MARGIN_LEFT + plot_w}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{MARGIN_LEFT - 4}" y="{y + 3:.1f}" text-anchor="end" font-size="10">'
                   f"{_label(tick)}</text>")
    out.append(f'<text x="{MARGIN_LEFT + plot_w / 2}" y="{HEIGHT - 6}" text-anchor="middle" font-size="11">'
               f"{html.escape(xlabel)}</text>"
               f'<text x="12" y="{MARGIN_TOP + plot_h / 2}" text-anchor="middle" font-size="11" '
               f'transform="rotate(-90 12 {MARGIN_TOP + plot_h / 2})">{html.escape(ylabel)}</text>')
    for i, (name, points) in enumerate(clean.items()):
        colour = COLOURS[i % len(COLOURS)]
        segments: List[List[str]] = [[]]
        for x, y in points:  # a missing or non-finite value breaks the line
            if math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y):
                segments[-1].append(f"{px(x):.1f},{py(y):.1f}")
            elif segments[-1]:
                segments.append([])
        for segment in segments:
            if len(segment) > 1:
                out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" '
                           f'points="{" ".join(segment)}"/>')
        if len(points) <= MARKER_LIMIT:
            for segment in segments:
                for point in segment:
                    cx, cy = point.split(",")
                    out.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{colour}"/>')
        if len(clean) > 1:  # the legend: one row above the plot, out of the lines' way
            lx = MARGIN_LEFT + 130 * i
            out.append(f'<line x1="{lx}" y1="29" x2="{lx + 16}" y2="29" stroke="{colour}" stroke-width="2"/>'
                       f'<text x="{lx + 20}" y="33" font-size="10">{html.escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


__all__ = ["line_chart", "nice_ticks"]
