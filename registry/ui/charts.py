"""Small charts drawn on the server as SVG (no JavaScript): hourly bars and a line."""

from __future__ import annotations

from markupsafe import Markup, escape

WIDTH, HEIGHT, PAD = 720, 130, 18


def hourly_bars(hours: list[tuple[str, int, int]], title: str) -> Markup:
    """Stacked bars per hour: (hour YYYYMMDDHH, saved, fetched); saved below, fetched above."""
    top = max([saved + fetched for _, saved, fetched in hours] + [1])
    step = (WIDTH - 2 * PAD) / max(len(hours), 1)
    parts = []
    for index, (hour, saved, fetched) in enumerate(hours):
        x = PAD + index * step
        scale = (HEIGHT - 2 * PAD) / top
        h_saved, h_fetched = saved * scale, fetched * scale
        base = HEIGHT - PAD
        label = f"{hour[8:10]}:00 UTC: {saved} from the cache, {fetched} from upstream"
        parts.append(
            f'<g class="hour"><title>{escape(label)}</title>'
            f'<rect class="saved" x="{x:.1f}" y="{base - h_saved:.1f}" width="{step * 0.8:.1f}" '
            f'height="{h_saved:.1f}" fill="#2e7d32" data-count="{saved}"/>'
            f'<rect class="fetched" x="{x:.1f}" y="{base - h_saved - h_fetched:.1f}" '
            f'width="{step * 0.8:.1f}" height="{h_fetched:.1f}" fill="#b3261e" '
            f'data-count="{fetched}"/></g>'
        )
    return _frame(title, "".join(parts), f"max {top} per hour")


def quota_line(points: list[tuple[str, int | None]], limit: int | None, title: str) -> Markup:
    """The quota left at each hour (None: no headers seen that hour), against its limit."""
    known = [v for _, v in points if v is not None]
    top = max([limit or 0, *known, 1])
    step = (WIDTH - 2 * PAD) / max(len(points) - 1, 1)
    coords = [
        f"{PAD + i * step:.1f},{HEIGHT - PAD - v * (HEIGHT - 2 * PAD) / top:.1f}"
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
    note = f"limit {limit}" if limit else "no quota headers seen"
    return _frame(title, line + dots, note)


def _frame(title: str, body: str, note: str) -> Markup:
    return Markup(
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>'
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" '
        f'stroke="#dde3ea"/>{body}'
        f'<text x="{WIDTH - PAD}" y="12" text-anchor="end" font-size="11" fill="#5b6b7c">'
        f"{escape(note)}</text></svg>"
    )
