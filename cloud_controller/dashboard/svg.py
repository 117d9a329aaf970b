"""Inline SVG charts (pure functions returning markup; no scripts, nothing downloaded)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

REFERENCE = "#4c78a8"  # reference bars
LIVE = "#f58518"  # live bars
DRIFT = "#d62728"  # drifted features, alarm points
OK = "#2ca02c"
GRID = "#dddddd"


def histogram(
    reference: Sequence[float],
    live: Sequence[float] | None,
    labels: Sequence[str] | None = None,
    *,
    width: int = 320,
    height: int = 140,
    title: str = "",
) -> str:
    """Side-by-side bars of reference and live proportions per bin."""
    ref_tot = sum(reference) or 1.0
    ref_p = [c / ref_tot for c in reference]
    live_p: list[float] = []
    if live is not None and sum(live) > 0:
        live_tot = sum(live)
        live_p = [c / live_tot for c in live]
    top = max([*ref_p, *live_p, 1e-9])
    n = max(len(ref_p), 1)
    pad_l, pad_b, pad_t = 4, 18, 16
    plot_w, plot_h = width - 2 * pad_l, height - pad_b - pad_t
    slot = plot_w / n
    bar = max(slot * 0.4, 1.0)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(title)}" class="hist">',
        f'<text x="{pad_l}" y="12" font-size="11">{escape(title)}</text>',
        f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" '
        f'y2="{pad_t + plot_h}" stroke="{GRID}"/>',
    ]
    for i, p in enumerate(ref_p):
        h = plot_h * p / top
        x = pad_l + i * slot + slot * 0.1
        parts.append(
            f'<rect class="ref" x="{x:.1f}" y="{pad_t + plot_h - h:.1f}" width="{bar:.1f}" '
            f'height="{h:.1f}" fill="{REFERENCE}"><title>reference {p:.3f}</title></rect>'
        )
    for i, p in enumerate(live_p):
        h = plot_h * p / top
        x = pad_l + i * slot + slot * 0.1 + bar
        parts.append(
            f'<rect class="live" x="{x:.1f}" y="{pad_t + plot_h - h:.1f}" width="{bar:.1f}" '
            f'height="{h:.1f}" fill="{LIVE}"><title>live {p:.3f}</title></rect>'
        )
    if labels:
        step = max(1, len(labels) // 6)
        for i in range(0, len(labels), step):
            x = pad_l + i * slot + slot / 2
            parts.append(
                f'<text x="{x:.1f}" y="{height - 4}" font-size="9" text-anchor="middle">'
                f"{escape(labels[i])}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


def timeline(
    points: Sequence[tuple[str, float, bool]],
    *,
    width: int = 640,
    height: int = 160,
    title: str = "",
) -> str:
    """A line of a statistic per bucket; drifted buckets are red dots, others green."""
    pad_l, pad_b, pad_t = 36, 18, 16
    plot_w, plot_h = width - pad_l - 8, height - pad_b - pad_t
    top = max([v for _, v, _ in points] + [1e-9]) * 1.1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(title)}" class="timeline">',
        f'<text x="{pad_l}" y="12" font-size="11">{escape(title)}</text>',
        f'<text x="2" y="{pad_t + 8}" font-size="9">{top:.2f}</text>',
        f'<text x="2" y="{pad_t + plot_h}" font-size="9">0</text>',
        f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" '
        f'y2="{pad_t + plot_h}" stroke="{GRID}"/>',
    ]
    if not points:
        parts.append(f'<text x="{pad_l + 10}" y="{pad_t + plot_h / 2}">no data yet</text></svg>')
        return "".join(parts)
    n = len(points)
    xs = [pad_l + (plot_w * i / max(n - 1, 1)) for i in range(n)]
    ys = [pad_t + plot_h - plot_h * v / top for _, v, _ in points]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))
    parts.append(f'<polyline points="{path}" fill="none" stroke="#555" stroke-width="1.5"/>')
    for (label, v, drifted), x, y in zip(points, xs, ys, strict=True):
        colour = DRIFT if drifted else OK
        parts.append(
            f'<circle class="{"alarm" if drifted else "ok"}" cx="{x:.1f}" cy="{y:.1f}" r="5" '
            f'fill="{colour}"><title>{escape(label)}: {v:.3f}</title></circle>'
        )
    parts.append("</svg>")
    return "".join(parts)


def bin_labels(edges: Sequence[float] | None, categories: Sequence[object] | None) -> list[str]:
    if categories is not None:
        return [str(c) for c in categories] + ["other"]
    if not edges:
        return ["all"]
    return [f"<{edges[0]:.3g}"] + [f"{e:.3g}" for e in edges[:-1]] + [f">={edges[-1]:.3g}"]
