"""Sweep and comparison pictures (PNG): parallel coordinates of trials, box plots of replicate groups."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def _axis(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Values scaled to [0, 1] and tick labels: categories evenly spaced; wide positive ranges on a log scale."""
    if not pd.api.types.is_numeric_dtype(values):
        cats = sorted(values.astype(str).unique())
        pos = values.astype(str).map({c: i for i, c in enumerate(cats)}).to_numpy(dtype=float)
        return pos / max(len(cats) - 1, 1), cats
    v = values.to_numpy(dtype=float)
    lo, hi = np.nanmin(v), np.nanmax(v)
    log = lo > 0 and hi / lo > 100
    t = np.log10(v) if log else v
    tlo, thi = (np.log10(lo), np.log10(hi)) if log else (lo, hi)
    scaled = (t - tlo) / (thi - tlo) if thi > tlo else np.full_like(t, 0.5)
    return scaled, [f"{lo:.3g}", f"{hi:.3g}"]


def parallel_coordinates_png(table: pd.DataFrame, metric: str, mode: str, path: Path) -> Path:
    """One line per trial across its parameters (``param.*`` columns) and ``metric``, coloured by the metric
    (better is brighter); the best trial is drawn thick."""
    columns = [c for c in table.columns if c.startswith("param.")] + [metric]
    scaled = {c: _axis(table[c]) for c in columns}
    score = table[metric].to_numpy(dtype=float)
    quality = (score - score.min()) / (np.ptp(score) or 1.0)
    quality = 1 - quality if mode == "min" else quality
    best = int(np.argmax(quality))
    fig, ax = plt.subplots(figsize=(2.2 * len(columns) + 1, 4), dpi=120)
    xs = np.arange(len(columns))
    cmap = plt.get_cmap("viridis")
    for i in np.argsort(quality):
        ys = [scaled[c][0][i] for c in columns]
        ax.plot(xs, ys, color=cmap(quality[i]), lw=3 if i == best else 1, alpha=1 if i == best else 0.7)
    for x, c in zip(xs, columns, strict=True):
        labels = scaled[c][1]
        ax.axvline(x, color="grey", lw=0.5)
        for j, label in enumerate(labels):
            ax.annotate(label, (x, j / max(len(labels) - 1, 1)), fontsize=7, xytext=(3, 0), textcoords="offset points")
    ax.set_xticks(xs, [c.removeprefix("param.") for c in columns], rotation=15)
    ax.set_yticks([])
    ax.set_title(f"{len(table)} trials; best {metric} = {score[best]:.4g} (thick)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def box_plot_png(groups: dict[str, list[float]], metric: str, path: Path) -> Path:
    """Box plot of one metric per group, with every replicate drawn as a point (but those where the metric is
    undefined, NaN, which would leave their group's box out)."""
    groups = {g: [v for v in values if not np.isnan(v)] for g, values in groups.items()}
    fig, ax = plt.subplots(figsize=(1.8 * len(groups) + 1.5, 3.5), dpi=120)
    labels = list(groups)
    ax.boxplot([groups[g] for g in labels], tick_labels=labels)
    for i, g in enumerate(labels, start=1):
        ax.scatter(np.full(len(groups[g]), i) + np.linspace(-0.08, 0.08, len(groups[g])), groups[g], s=12, zorder=3)
    ax.set_ylabel(metric)
    ax.set_title(metric)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
