"""Tokens per day by model, as the geometry of an SVG stacked bar chart drawn on the server.

No chart library and no script: the template turns these shapes into <rect> elements, and the
same figures go into a table for screen readers.
"""
from __future__ import annotations

import datetime as dt
import math

import msgspec

# the axis labels' figures (and the pages' `compact` filter) in the status line's words: one
# rounding rule for every figure a user reads (it was written twice, and printed "1000k" twice)
from ..statusline import compact

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 8, 12, 28
# distinguishable with common colour-vision deficiencies, each >= 3:1 against white
PALETTE = ("#1f5fbf", "#b35c00", "#2e7d32", "#7b3fa0", "#a8324a", "#4d5b6a")


class Bar(msgspec.Struct, frozen=True):
    x: float
    y: float
    width: float
    height: float
    colour: str
    title: str


class Tick(msgspec.Struct, frozen=True):
    position: float
    label: str


class Series(msgspec.Struct, frozen=True):
    model: str
    colour: str
    total: int


class DayRow(msgspec.Struct, frozen=True):
    day: str
    per_model: list[int]
    total: int


class Chart(msgspec.Struct, frozen=True):
    width: int
    height: int
    plot_left: int
    plot_bottom: int
    plot_right: int
    bars: list[Bar]
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    series: list[Series]
    rows: list[DayRow]
    total: int


def _scale(value: int) -> tuple[int, int]:
    """A round step (1, 2, 2.5 or 5 x 10^k) giving at most 5 divisions, and the top it reaches."""
    if value <= 0:
        return 250, 1000
    rough = value / 5
    magnitude = 10 ** math.floor(math.log10(rough)) if rough >= 1 else 1
    step = next(int(s * magnitude) for s in (1, 2, 2.5, 5, 10) if s * magnitude >= rough and s * magnitude >= 1)
    return step, step * math.ceil(value / step)


def build(points: dict[tuple[dt.date, str], int], last_day: dt.date, days: int = 30) -> Chart:
    """`points`: tokens per (UTC day, model); the chart covers the `days` days up to `last_day`."""
    dates = [last_day - dt.timedelta(days=days - 1 - i) for i in range(days)]
    models = sorted({model for _, model in points},
                    key=lambda m: (-sum(v for (d, mm), v in points.items() if mm == m), m))
    colours = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(models)}
    totals = [sum(points.get((d, m), 0) for m in models) for d in dates]
    step, top = _scale(max(totals, default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / days
    bar_w = max(2.0, slot * 0.7)
    bars: list[Bar] = []
    for i, d in enumerate(dates):
        y = float(TOP + plot_h)
        for m in models:
            value = points.get((d, m), 0)
            if value <= 0:
                continue
            h = value / top * plot_h
            y -= h
            bars.append(Bar(x=round(LEFT + i * slot + (slot - bar_w) / 2, 2), y=round(y, 2),
                            width=round(bar_w, 2), height=round(max(h, 0.5), 2), colour=colours[m],
                            title=f"{d.isoformat()} {m}: {value:,} tokens"))
    y_ticks = [Tick(position=round(TOP + plot_h - plot_h * k * step / top, 2), label=compact(k * step))
               for k in range(top // step + 1)]
    x_ticks = [Tick(position=round(LEFT + i * slot + slot / 2, 2), label=dates[i].strftime("%m-%d"))
               for i in range(days - 1, -1, -7)]
    series = [Series(model=m, colour=colours[m], total=sum(v for (d, mm), v in points.items() if mm == m))
              for m in models]
    rows = [DayRow(day=d.isoformat(), per_model=[points.get((d, m), 0) for m in models], total=t)
            for d, t in zip(dates, totals, strict=True) if t]
    return Chart(width=WIDTH, height=HEIGHT, plot_left=LEFT, plot_bottom=TOP + plot_h,
                 plot_right=WIDTH - RIGHT, bars=bars, y_ticks=y_ticks, x_ticks=x_ticks, series=series,
                 rows=rows, total=sum(totals))
