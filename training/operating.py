"""A binary call's operating point: the threshold a rule chooses on the validation split, and what it gives.

A model's probabilities become calls at a threshold, and 0.5 (or the argmax) is rarely the one a clinic wants: a
screening test asks for a sensitivity, a confirmatory one for a specificity. The threshold is chosen on the
validation split (the selected model's predictions there), never on the held-out split it is then reported on,
so that the held-out sensitivity and specificity are those of a threshold fixed beforehand, as a clinical
validation reports them.
"""

from __future__ import annotations

import math
import re

import numpy as np

RULE = r"^(youden|(sensitivity|specificity):(0?\.\d+|1(\.0*)?))$"  # eval.operating_point's form


def parse_rule(rule: str) -> tuple[str, float]:
    """``("youden", nan)``, ``("sensitivity", 0.9)`` or ``("specificity", 0.9)`` of a rule matching :data:`RULE`."""
    if not re.match(RULE, rule):
        raise ValueError(f"operating point {rule!r}: give youden, sensitivity:S or specificity:S (0 < S <= 1)")
    kind, _, target = rule.partition(":")
    return kind, float(target) if target else math.nan


def choose_threshold(positive: np.ndarray, scores: np.ndarray, rule: str) -> float:
    """The threshold (a call is ``score >= threshold``) that ``rule`` picks on ``positive``/``scores``:
    ``youden`` maximises sensitivity + specificity - 1 (the highest threshold of a tie); ``sensitivity:S``
    is the highest threshold whose sensitivity is at least S; ``specificity:S`` the lowest whose specificity is
    at least S. From scikit-learn's ROC curve over every distinct score. ValueError where a class is absent."""
    from sklearn.metrics import roc_curve

    kind, target = parse_rule(rule)
    positive = np.asarray(positive, bool)
    if positive.all() or not positive.any():
        raise ValueError(f"its {'negatives' if positive.all() else 'positives'} are absent")
    fpr, tpr, thresholds = roc_curve(positive, scores, drop_intermediate=False)  # thresholds decreasing
    if kind == "youden":
        i = int(np.argmax(tpr - fpr))
    elif kind == "sensitivity":
        i = int(np.flatnonzero(tpr >= target - 1e-12)[0])
    else:
        i = int(np.flatnonzero(1 - fpr >= target - 1e-12)[-1])
    # the first of scikit-learn's thresholds is +inf (no call positive): the highest score's next float instead
    return float(thresholds[i]) if np.isfinite(thresholds[i]) else float(np.nextafter(np.max(scores), np.inf))


def counts_at(
    positive: np.ndarray, scores: np.ndarray, threshold: float, weights: np.ndarray | None = None
) -> dict[str, tuple[float, float]]:
    """``(successes, trials)`` of the sensitivity, specificity, positive and negative predictive values of the
    calls ``score >= threshold``, of the samples ``weights`` counts (each once by default: whole numbers, for
    their exact intervals)."""
    positive = np.asarray(positive, bool)
    called = np.asarray(scores) >= threshold
    w = np.ones(len(positive)) if weights is None else np.asarray(weights, np.float64)
    tp, fp = float(w[called & positive].sum()), float(w[called & ~positive].sum())
    fn, tn = float(w[~called & positive].sum()), float(w[~called & ~positive].sum())
    return {"sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp), "ppv": (tp, tp + fp), "npv": (tn, tn + fn)}


def rates_at(
    positive: np.ndarray, scores: np.ndarray, threshold: float, weights: np.ndarray | None = None
) -> dict[str, float]:
    """:func:`counts_at`'s proportions, each NaN where it has no trials."""
    return {k: a / b if b else math.nan for k, (a, b) in counts_at(positive, scores, threshold, weights).items()}
