"""Distinct plot colours, in one place so that cluster j has one colour in the cluster plots
(`clustering.inspect`) and its expert the same one in the report's figures (`tasks.figures`)."""
from __future__ import annotations

import colorsys

# matplotlib's tab10 without its grey (greys mark the seed and dense baselines), then tab20's lighter partners
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
           "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5"]


def distinct_colours(n: int) -> list[str]:
    """`n` different colours (hex): `PALETTE`, then hues spaced by the golden ratio (neighbours stay far apart)
    at alternating brightness."""
    out = PALETTE[:n]
    for i in range(n - len(out)):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95 if i % 2 else 0.65)
        out.append(f"#{round(255 * r):02x}{round(255 * g):02x}{round(255 * b):02x}")
    return out
