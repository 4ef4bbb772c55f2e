"""Small self-contained SVG charts for the HTML reports (no plotting library, no JavaScript, no network)."""
from __future__ import annotations

import html
from typing import Sequence

import numpy as np

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
W, H, PAD = 460, 240, 40


def _frame(title: str, body: str, legend: Sequence[str]) -> str:
    items = "".join(
        f'<rect x="{PAD + i * 120}" y="{H - 14}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>'
        f'<text x="{PAD + i * 120 + 14}" y="{H - 5}" font-size="11">{html.escape(name)}</text>'
        for i, name in enumerate(legend))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
            f'font-family="sans-serif"><text x="{W / 2}" y="16" text-anchor="middle" font-size="13">'
            f'{html.escape(title)}</text>'
            f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 10}" y2="{H - PAD}" stroke="#333"/>'
            f'<line x1="{PAD}" y1="26" x2="{PAD}" y2="{H - PAD}" stroke="#333"/>{body}{items}</svg>')


def _y_axis(lo: float, hi: float) -> str:
    ticks = np.linspace(lo, hi, 5)
    return "".join(f'<text x="{PAD - 4}" y="{_y(t, lo, hi) + 4}" text-anchor="end" font-size="10">{t:.2g}</text>'
                   for t in ticks)


def _y(value: float, lo: float, hi: float) -> float:
    span = (hi - lo) or 1.0
    return H - PAD - (value - lo) / span * (H - PAD - 30)


def line_chart(title: str, series: dict[str, Sequence[float | None]]) -> str:
    """One line per series over the index (epochs); missing (None or NaN) points are left out."""
    values = [v for s in series.values() for v in s if v is not None and np.isfinite(v)]
    if not values:
        return _frame(title, "", [])
    lo, hi = min(0.0, min(values)), max(values)
    n = max(len(s) for s in series.values())
    body = _y_axis(lo, hi)
    for i, s in enumerate(series.values()):
        pts = " ".join(f"{PAD + j / max(1, n - 1) * (W - PAD - 20):.1f},{_y(v, lo, hi):.1f}" for j, v in enumerate(s)
                       if v is not None and np.isfinite(v))
        body += f'<polyline fill="none" stroke="{PALETTE[i % len(PALETTE)]}" stroke-width="2" points="{pts}"/>'
    body += f'<text x="{W - 12}" y="{H - PAD + 14}" text-anchor="end" font-size="10">epoch {n}</text>'
    return _frame(title, body, list(series))


def training_curves(history: list[dict]) -> str:
    """The training losses and the validation recall per epoch, whichever the history holds."""
    names = {"contrastive": "contrastive", "matching": "matching (BCE)", "validation_mrr": "validation MRR"}
    series = {label: [h.get(key) for h in history] for key, label in names.items()
              if any(h.get(key) is not None for h in history)}
    return line_chart("Training loss and validation", series)


def bar_chart(title: str, labels: Sequence[str], series: dict[str, Sequence[float]]) -> str:
    """Grouped bars: one group per label, one bar per series."""
    hi = max([1e-9] + [v for s in series.values() for v in s if v is not None])
    group_w = (W - PAD - 20) / max(1, len(labels))
    bar_w = group_w * 0.8 / max(1, len(series))
    body = _y_axis(0.0, hi)
    for g, label in enumerate(labels):
        x0 = PAD + g * group_w + group_w * 0.1
        for i, (name, s) in enumerate(series.items()):
            v = s[g]
            if v is None:
                continue
            y = _y(v, 0.0, hi)
            body += (f'<rect x="{x0 + i * bar_w:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" '
                     f'height="{H - PAD - y:.1f}" fill="{PALETTE[i % len(PALETTE)]}"><title>{html.escape(name)} '
                     f'{html.escape(label)}: {v:.3f}</title></rect>')
        body += (f'<text x="{x0 + group_w * 0.4:.1f}" y="{H - PAD + 13}" text-anchor="middle" font-size="10">'
                 f'{html.escape(label)}</text>')
    return _frame(title, body, list(series))


def histogram(title: str, samples: dict[str, np.ndarray], bins: int = 20, lo: float = 0.0, hi: float = 1.0) -> str:
    """Overlaid histograms (as fractions of each sample) on [lo, hi]."""
    edges = np.linspace(lo, hi, bins + 1)
    counts = {k: np.histogram(np.clip(v, lo, hi), edges)[0] / max(1, len(v)) for k, v in samples.items()}
    top = max([1e-9] + [c.max() for c in counts.values() if len(c)])
    bw = (W - PAD - 20) / bins
    body = _y_axis(0.0, top)
    for i, c in enumerate(counts.values()):
        for b, frac in enumerate(c):
            y = _y(frac, 0.0, top)
            body += (f'<rect x="{PAD + b * bw:.1f}" y="{y:.1f}" width="{bw - 1:.1f}" height="{H - PAD - y:.1f}" '
                     f'fill="{PALETTE[i % len(PALETTE)]}" fill-opacity="0.55"/>')
    body += (f'<text x="{PAD}" y="{H - PAD + 13}" font-size="10">{lo:g}</text>'
             f'<text x="{W - 12}" y="{H - PAD + 13}" text-anchor="end" font-size="10">{hi:g}</text>')
    return _frame(title, body, list(samples))
