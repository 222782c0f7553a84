"""Small charts drawn on the server as SVG (no JavaScript): hourly bars and a line, each with
a time axis (hours, UTC) and a labelled value axis."""

from __future__ import annotations

from markupsafe import Markup, escape

WIDTH, HEIGHT = 720, 160
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 20, 34  # room for the axes' labels
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
TICK_EVERY = 3  # hours between labelled ticks of the time axis
MUTED = "#5b6b7c"


def hourly_bars(hours: list[tuple[str, int, int]], title: str) -> Markup:
    """Stacked bars per hour: (hour YYYYMMDDHH, saved, fetched); saved below, fetched above."""
    top = max([saved + fetched for _, saved, fetched in hours] + [1])
    step = PLOT_W / max(len(hours), 1)
    scale = PLOT_H / top
    base = TOP + PLOT_H
    parts = []
    for index, (hour, saved, fetched) in enumerate(hours):
        x = LEFT + index * step
        h_saved, h_fetched = saved * scale, fetched * scale
        label = f"{hour[8:10]}:00 UTC: {saved} from the cache, {fetched} from upstream"
        parts.append(
            f'<g class="hour"><title>{escape(label)}</title>'
            f'<rect class="saved" x="{x:.1f}" y="{base - h_saved:.1f}" width="{step * 0.8:.1f}" '
            f'height="{h_saved:.1f}" fill="#2e7d32" data-count="{saved}"/>'
            f'<rect class="fetched" x="{x:.1f}" y="{base - h_saved - h_fetched:.1f}" '
            f'width="{step * 0.8:.1f}" height="{h_fetched:.1f}" fill="#b3261e" '
            f'data-count="{fetched}"/></g>'
        )
    ticks = [(LEFT + (i + 0.4) * step, hour) for i, (hour, _, _) in enumerate(hours)]
    return _frame(title, "".join(parts), ticks, top, "manifest GETs per hour")


def quota_line(points: list[tuple[str, int | None]], limit: int | None, title: str) -> Markup:
    """The quota left at each hour (None: no headers seen that hour), against its limit."""
    known = [v for _, v in points if v is not None]
    top = max([limit or 0, *known, 1])
    step = PLOT_W / max(len(points) - 1, 1)
    coords = [
        f"{LEFT + i * step:.1f},{TOP + PLOT_H - v * PLOT_H / top:.1f}"
        for i, (_, v) in enumerate(points)
        if v is not None
    ]
    dots = "".join(
        f'<circle cx="{c.split(",")[0]}" cy="{c.split(",")[1]}" r="2.5" fill="#1565c0"/>'
        for c in coords
    )
    line = (
        f'<polyline points="{" ".join(coords)}" fill="none" stroke="#1565c0" stroke-width="2"/>'
        if len(coords) > 1
        else ""
    )
    note = f"pulls left of {limit}" if limit else "pulls left (no quota headers seen)"
    ticks = [(LEFT + i * step, hour) for i, (hour, _) in enumerate(points)]
    return _frame(title, line + dots, ticks, top, note)


def _frame(title: str, body: str, ticks: list[tuple[float, str]], top: int, unit: str) -> Markup:
    """The chart's axes around `body`: the time axis labelled every TICK_EVERY hours (`ticks`:
    x and hour YYYYMMDDHH, oldest first), the value axis from 0 to `top` in `unit`."""
    base = TOP + PLOT_H
    axes = [
        f'<line x1="{LEFT}" y1="{base}" x2="{WIDTH - RIGHT}" y2="{base}" stroke="#dde3ea"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{base}" stroke="#dde3ea"/>',
        f'<text class="y-label" x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end" '
        f'font-size="11" fill="{MUTED}">{top}</text>',
        f'<text class="y-label" x="{LEFT - 6}" y="{base + 4}" text-anchor="end" '
        f'font-size="11" fill="{MUTED}">0</text>',
        f'<text class="y-title" x="{LEFT}" y="12" font-size="11" fill="{MUTED}">'
        f"{escape(unit)}</text>",
        f'<text class="x-title" x="{WIDTH - RIGHT}" y="{HEIGHT - 2}" text-anchor="end" '
        f'font-size="11" fill="{MUTED}">hour (UTC)</text>',
    ]
    for x, hour in ticks:
        if int(hour[8:10] or 0) % TICK_EVERY:
            continue
        axes.append(
            f'<line x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 4}" stroke="{MUTED}"/>'
            f'<text class="x-label" x="{x:.1f}" y="{base + 16}" text-anchor="middle" '
            f'font-size="11" fill="{MUTED}">{escape(hour[8:10])}:00</text>'
        )
    return Markup(
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>'
        f"{''.join(axes)}{body}</svg>"
    )
