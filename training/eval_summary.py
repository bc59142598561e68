"""What the terminal shows of an evaluation (:class:`training.evaluation.EvalOutcome`): the headline metrics per
level with their confidence intervals, each site's line and the worst site; every metric is in the run."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from training.calibration import temperature_metric
from training.intervals import BOUNDS
from training.metrics import HEADLINE, level_prefix

if TYPE_CHECKING:
    from training.evaluation import EvalOutcome

DETECTION_HEADLINE = ("map50", "map", "precision", "recall", "f1", "image_accuracy")  # a detector's


def summary(outcome: EvalOutcome) -> str:
    """The headline metrics, a line per level, for the terminal (every metric is in the run)."""
    lines = [f"{outcome.split} split of {outcome.dataset}, metrics {outcome.prefix}* in the run:"]
    if outcome.intervals:
        lines[0] = lines[0][:-1] + f"; in brackets, {outcome.intervals} ({outcome.prefix}intervals.csv):"
    for level in ("sample", *outcome.levels):
        pre = level_prefix(level, outcome.prefix)
        headline = DETECTION_HEADLINE if pre + "map50" in outcome.metrics else HEADLINE
        shown = [f"{k} {_with_interval(outcome.metrics, pre + k)}" for k in headline if pre + k in outcome.metrics]
        if shown:
            lines.append(f"  {level}: {', '.join(shown)}")
        lines += _operating_lines(outcome, level, pre)
    scales = [
        (lv, outcome.metrics[k])
        for lv in ("sample", *outcome.levels)
        if (k := temperature_metric(lv, outcome.prefix)) in outcome.metrics
    ]
    if scales:  # training.calibration
        shown = ", ".join(f"{lv} {t:.3f}" for lv, t in scales)
        lines.append(f"  probabilities scaled by temperatures fitted on validation: {shown}")
    lines += _site_lines(outcome)
    if outcome.warning:
        lines.append(f"  warning: {outcome.warning}")
    return "\n".join(lines)


def _with_interval(metrics: dict[str, float], key: str) -> str:
    """``key``'s value, and its confidence interval in brackets where it has one."""
    low, high = (metrics.get(key + b, math.nan) for b in BOUNDS)
    bounds = "" if math.isnan(low) or math.isnan(high) else f" [{low:.4f}, {high:.4f}]"
    return f"{metrics[key]:.4f}{bounds}"


def _operating_lines(outcome: EvalOutcome, level: str, pre: str) -> list[str]:
    """A line per output whose threshold the operating point chose on validation at ``level``: the threshold and
    the held-out sensitivity, specificity, PPV and NPV there, with their intervals."""
    found = re.compile(rf"^{re.escape(pre)}op_threshold_(.+)$")
    lines = []
    for key, cut in sorted(outcome.metrics.items()):
        if m := found.match(key):
            name = m.group(1)
            rates = [
                f"{r} {_with_interval(outcome.metrics, f'{pre}op_{r}_{name}')}"
                for r in ("sensitivity", "specificity", "ppv", "npv")
                if f"{pre}op_{r}_{name}" in outcome.metrics
            ]
            rule = outcome.operating_point
            lines.append(f"    {name} called at p >= {cut:.4f} ({rule} on validation): {', '.join(rates)}")
    return lines


def _site_lines(outcome: EvalOutcome) -> list[str]:
    """A line per site the samples named (:mod:`training.sites`): its samples and, at the last level they name
    (a recipe's ``patient``, or the samples'), its count there and the headline metrics; every level is in the run
    (``<prefix>by_site.csv``)."""
    from shards.schema import site_order

    found = re.compile(rf"^{re.escape(outcome.prefix)}site_(.+)_samples$")
    metrics, lines, level = outcome.metrics, [], None
    keys = site_order(m.group(1) for k in metrics if (m := found.match(k)))
    for key in keys:
        pre = f"{outcome.prefix}site_{key}_"
        what = f"{metrics[pre + 'samples']:.0f} samples"
        level = next((lv for lv in reversed(outcome.levels) if f"{pre}{lv}_count" in metrics), None)
        if level:
            pre = f"{pre}{level}_"
            what += f", {metrics[pre + 'count']:.0f} {level}(s)"
        shown = [f"{k} {_with_interval(metrics, pre + k)}" for k in HEADLINE if pre + k in metrics]
        lines.append(f"  site {key} ({what}): {level or 'sample'} {', '.join(shown)}")
    # each metric's worst site (training.sites.worst_sites), named
    at = f"{level}_" if level else ""
    worst = []
    for k in HEADLINE:
        value = metrics.get(f"{outcome.prefix}worst_site_{at}{k}", math.nan)
        which = [key for key in keys if metrics.get(f"{outcome.prefix}site_{key}_{at}{k}") == value]
        if which:  # NaN, no site's: none; the site's interval, where it has one
            worst.append(f"{k} {_with_interval(metrics, f'{outcome.prefix}site_{which[0]}_{at}{k}')} (site {which[0]})")
    return lines + ([f"  worst site: {level or 'sample'} {', '.join(worst)}"] if worst else [])
