"""Two-group comparison of replicated runs (pure), as paper 002 §III.E/IV: Shapiro-Wilk per group, Levene,
Student's or Welch's t, Mann-Whitney U, Cohen's d and the t-test's achieved power.

The decision follows the paper: the t-test variant is picked by Levene (Welch when variances differ); the
verdict rests on the t-test when both groups look normal and on Mann-Whitney U otherwise. Degenerate groups
(fewer than 3 values, or all values equal) are reported as such instead of being fed to tests that cannot
judge them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.power import TTestIndPower


@dataclass(frozen=True)
class Summary:
    """Descriptive statistics of one group and its Shapiro-Wilk test (None where it cannot be run)."""

    n: int
    mean: float
    sd: float
    min: float
    max: float
    shapiro_w: float | None
    shapiro_p: float | None
    note: str | None = None

    def normal(self, alpha: float) -> bool:
        return self.shapiro_p is not None and self.shapiro_p >= alpha


def summarise(values: list[float] | np.ndarray) -> Summary:
    """n, mean, sample SD (ddof 1), min, max and Shapiro-Wilk; constant or tiny groups get a note instead."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("an empty group has no statistics")
    sd = float(np.std(x, ddof=1)) if x.size > 1 else 0.0
    w = p = note = None
    if x.size < 3:
        note = "fewer than 3 values: no normality test"
    elif np.ptp(x) == 0:
        note = "all values equal (zero variance): normality cannot be tested"
    else:
        w, p = (float(v) for v in stats.shapiro(x))
    return Summary(int(x.size), float(x.mean()), sd, float(x.min()), float(x.max()), w, p, note)


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """(mean a - mean b) / pooled SD (ddof 1); +-inf when both groups are constant but differ, nan when equal."""
    na, nb = len(a), len(b)
    pooled = ((na - 1) * np.var(a, ddof=1) + (nb - 1) * np.var(b, ddof=1)) / (na + nb - 2)
    diff = float(np.mean(a) - np.mean(b))
    if pooled == 0:
        return math.copysign(math.inf, diff) if diff else math.nan
    return diff / math.sqrt(pooled)


def t_power(d: float, na: int, nb: int, alpha: float) -> float:
    """Achieved power of the two-sided two-sample t-test at effect size ``|d|`` (statsmodels)."""
    if math.isnan(d):
        return math.nan
    if math.isinf(d):
        return 1.0
    return float(TTestIndPower().power(effect_size=abs(d), nobs1=na, alpha=alpha, ratio=nb / na))


@dataclass(frozen=True)
class Comparison:
    """Every statistic of one metric's comparison, and the verdict."""

    metric: str
    a: Summary
    b: Summary
    alpha: float
    levene_w: float | None
    levene_p: float | None
    equal_var: bool
    t_test: str
    t_stat: float
    t_p: float
    t_df: float
    mwu_u: float
    mwu_p: float
    cohens_d: float
    power: float
    decided_by: str
    significant: bool
    verdict: str
    undefined: tuple[int, int] = (0, 0)  # runs of A and B left out: the metric undefined (NaN) there

    def as_dict(self) -> dict:
        return asdict(self)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():  # scipy warns on near-constant input; the summary notes that case
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def compare(a: list[float], b: list[float], metric: str = "metric", alpha: float = 0.05) -> Comparison:
    """Compare groups ``a`` and ``b`` of one metric (see the module docstring for the procedure)."""
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    # a metric a run could not define (an AUC of a validation split of one class): left out, said; one NaN made
    # every statistic NaN, and the verdict "both groups constant and equal"
    undefined = (int(np.isnan(xa).sum()), int(np.isnan(xb).sum()))
    xa, xb = xa[~np.isnan(xa)], xb[~np.isnan(xb)]
    if len(xa) < 2 or len(xb) < 2:
        left = f", the metric undefined (NaN) in {undefined[0]} and {undefined[1]} run(s) left out" * any(undefined)
        raise ValueError(f"{metric}: each group needs at least 2 values (got {len(xa)} and {len(xb)}{left})")
    sa, sb = summarise(xa), summarise(xb)
    lev_w, lev_p = (float(v) for v in _quiet(stats.levene, xa, xb))
    if math.isnan(lev_p):  # both groups constant: no spread to compare
        lev_w = lev_p = None
    equal_var = lev_p is None or lev_p >= alpha
    t = _quiet(stats.ttest_ind, xa, xb, equal_var=equal_var)
    mwu = stats.mannwhitneyu(xa, xb, alternative="two-sided")
    d = cohens_d(xa, xb)
    power = t_power(d, len(xa), len(xb), alpha)
    parametric = sa.normal(alpha) and sb.normal(alpha)
    t_name = "Student's t" if equal_var else "Welch's t"
    decided_by, p = (t_name, float(t.pvalue)) if parametric else ("Mann-Whitney U", float(mwu.pvalue))
    significant = bool(p < alpha)
    if math.isnan(p):
        verdict = f"{metric}: no test possible (both groups constant and equal)"
        significant = False
    elif significant:
        higher = "A" if sa.mean > sb.mean else "B"
        verdict = f"{metric}: significant difference ({decided_by}, p = {p:.4g} < {alpha:.4g}); {higher} is higher"
    else:
        verdict = f"{metric}: no significant difference ({decided_by}, p = {p:.4g} >= {alpha:.4g})"
    if any(undefined):
        verdict += f"; left out, where {metric} is undefined (NaN): {undefined[0]} run(s) of A, {undefined[1]} of B"
    return Comparison(
        metric=metric, a=sa, b=sb, alpha=alpha, levene_w=lev_w, levene_p=lev_p, equal_var=equal_var,
        t_test=t_name, t_stat=float(t.statistic), t_p=float(t.pvalue), t_df=float(t.df), mwu_u=float(mwu.statistic),
        mwu_p=float(mwu.pvalue), cohens_d=d, power=power, decided_by=decided_by, significant=significant,
        verdict=verdict, undefined=undefined,
    )  # fmt: skip
