#!/usr/bin/env python3
"""Draws several `loss.csv` logs of `zaya train` (step, lr, loss, ...) as one SVG chart.

    python3 scripts/plot_loss_curves.py OUT.svg "full fine-tuning=RUN1/loss.csv" "LoRA r=8=RUN2/loss.csv"   (label = all before the last =)

Standard library only (no torch, no matplotlib).
"""
import csv
import sys

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def read(path):
    with open(path) as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def main(out, specs):
    series = []
    for spec in specs:
        label, path = spec.rsplit("=", 1) if "=" in spec else (spec, spec)
        series.append((label, read(path)))
    w, h, pad = 640.0, 360.0, 48.0
    max_step = max(s for _, pts in series for s, _ in pts)
    lo = min(l for _, pts in series for _, l in pts)
    hi = max(l for _, pts in series for _, l in pts)
    span = max(hi - lo, 1e-9)

    def xy(s, l):
        return pad + s / max_step * (w - 2 * pad), h - pad - (l - lo) / span * (h - 2 * pad)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
        f'<text x="{pad}" y="{pad - 8}">loss {hi:.3f}</text>',
        f'<text x="{pad}" y="{h - pad + 16}">{lo:.3f}</text>',
        f'<text x="{w - pad}" y="{h - pad + 16}" text-anchor="end">step {max_step}</text>',
    ]
    for i, (label, pts) in enumerate(series):
        c = COLOURS[i % len(COLOURS)]
        p = " ".join("%.1f,%.1f" % xy(s, l) for s, l in pts)
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{p}"/>')
        parts.append(f'<text x="{w - pad}" y="{pad + 16 * i}" text-anchor="end" fill="{c}">{label}</text>')
    parts.append("</svg>")
    with open(out, "w") as f:
        f.write("\n".join(parts) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
