"""Metrics per centre: samples carry their site from ingest, and an evaluation reports each site's metrics at
sample and aggregation levels (as metrics, a table and the terminal's lines)."""

import csv
import json

import numpy as np
import pytest

from ingest.config import WsiIngestConfig
from ingest.plan import make_plan
from ingest.synthetic import make_slides
from ingest.units import plan_unit, work_samples
from training.config import load_recipe
from training.eval_summary import summary
from training.evaluation import EvalOutcome
from training.metas import Metas
from training.sites import by_site, group_sites, site_keys, site_metrics, site_table, worst_sites

# Site 1: patient a (CE) and b (LAA), two tiles each; site 2: c (LAA) and d (CE), one each; e names no site.
ROWS = [
    ("1", "a", 0, [0.9, 0.1]),
    ("1", "a", 0, [0.6, 0.4]),
    ("1", "b", 1, [0.3, 0.7]),
    ("1", "b", 1, [0.8, 0.2]),
    ("2", "c", 1, [0.2, 0.8]),
    ("2", "d", 0, [0.4, 0.6]),
    (None, "e", 0, [0.5, 0.5]),
]


def _pred(rows=ROWS, columns: bool = False):
    metas = [{"patient": p} | ({"site": s} if s else {}) for s, p, _, _ in rows]
    return {
        "probs": np.array([q for *_, q in rows]),
        "labels": np.array([y for _, _, y, _ in rows]),
        "metas": Metas.of(metas) if columns else metas,
        "loss": 0.5,
    }


@pytest.fixture
def recipe(tmp_path):
    return load_recipe("demo_tiles", [f"data.dataset={tmp_path}", "eval.levels=[patient]"])


def _log_loss(pairs):
    """STRIP AI's weighted log loss written out: per class the mean of -log p(class), then their mean."""
    by_class = {}
    for y, p in pairs:
        by_class.setdefault(y, []).append(-np.log(p[y]))
    return np.mean([np.mean(v) for v in by_class.values()])


@pytest.mark.parametrize("columns", [False, True])
def test_each_sites_metrics_at_sample_and_patient_level_against_hand_computed_values(recipe, columns):
    found = by_site(_pred(columns=columns), recipe, ["CE", "LAA"])
    assert list(found) == ["1", "2"] and list(found["1"]) == ["sample", "patient"]
    one, two = found["1"], found["2"]
    # site 1: tiles called CE, CE, LAA, CE (3 of 4 right); a's mean (0.75, 0.25) is right, b's (0.55, 0.45) not
    assert one["sample"]["count"] == 4 and one["sample"]["accuracy"] == 0.75
    assert one["sample"]["auc"] == 0.75  # LAA's 0.7 and 0.2 against CE's 0.1 and 0.4: 3 of 4 pairs in order
    assert one["sample"]["weighted_log_loss"] == pytest.approx(_log_loss([(y, q) for _, _, y, q in ROWS[:4]]))
    assert one["patient"].pop("classes") == {"CE": 1, "LAA": 1} and one["sample"]["classes"] == {"CE": 2, "LAA": 2}
    assert one["patient"] == pytest.approx(
        {
            "count": 2,
            "accuracy": 0.5,
            "f1": 1 / 3,
            "auc": 1.0,
            "weighted_log_loss": _log_loss([(0, [0.75, 0.25]), (1, [0.55, 0.45])]),
            "brier_loss": np.mean([(0.25 - 0) ** 2, (0.45 - 1) ** 2]),  # P(LAA) against LAA's 0 or 1
        }
    )
    # site 2: c right, d wrong; e (no site) is in neither
    assert two["sample"]["count"] == 2 and two["sample"]["accuracy"] == 0.5 and two["sample"]["auc"] == 1.0
    assert two["patient"]["count"] == 2


def test_sites_become_metric_names_a_table_and_summary_lines(recipe, tmp_path):
    found = by_site(_pred(), recipe, ["CE", "LAA"])
    metrics = site_metrics(found, "test_")
    assert metrics["test_site_1_samples"] == 4 and metrics["test_site_2_patient_count"] == 2
    assert metrics["test_site_1_accuracy"] == 0.75 and metrics["test_site_1_patient_accuracy"] == 0.5
    # 2 sites x 2 levels x (count and 5 headline metrics), and the worst site's 5 at each level
    assert len(metrics) == 2 * 2 * 6 + 2 * 5
    assert metrics["test_worst_site_patient_accuracy"] == 0.5 and metrics["test_worst_site_accuracy"] == 0.5
    assert set(site_metrics(found, "val_", counts=False)) == {
        k.replace("test_", "val_", 1) for k in metrics if not k.endswith(("_samples", "_count"))
    }
    rows = list(csv.DictReader(site_table(found).splitlines()))
    assert [(r["site"], r["level"], r["count"]) for r in rows] == [
        ("1", "sample", "4"),
        ("1", "patient", "2"),
        ("2", "sample", "2"),
        ("2", "patient", "2"),
    ]
    assert rows[0]["accuracy"] == "0.75" and rows[1]["auc"] == "1"
    assert list(rows[0])[:5] == ["site", "level", "count", "n_CE", "n_LAA"] and (rows[0]["n_CE"], rows[0]["n_LAA"]) == (
        "2",
        "2",
    )
    outcome = EvalOutcome("r", "test_", "ds", "test", {"test_accuracy": 0.6} | metrics, ["patient"])
    lines = summary(outcome).splitlines()
    assert lines[-3].startswith("  site 1 (4 samples, 2 patient(s)): patient accuracy 0.5000, f1 0.3333, auc 1.0000, ")
    assert lines[-2].startswith("  site 2 (2 samples, 2 patient(s)): patient accuracy 0.5000")
    # each metric's worst site, named (a tie: the first); site 2's patients' log loss is the higher
    loss = metrics["test_site_2_patient_weighted_log_loss"]
    assert loss > metrics["test_site_1_patient_weighted_log_loss"]
    assert lines[-1] == (
        "  worst site: patient accuracy 0.5000 (site 1), f1 0.3333 (site 1), auc 1.0000 (site 1), "
        f"weighted_log_loss {loss:.4f} (site 2), brier_loss 0.2000 (site 2)"  # c: 0.2 from 1, d: 0.6 from 0
    )
    tiles = load_recipe("demo_tiles", [f"data.dataset={tmp_path}", "eval.levels=[]"])  # samples alone
    plain = EvalOutcome("r", "test_", "ds", "test", site_metrics(by_site(_pred(), tiles, ["CE", "LAA"]), "test_"), [])
    assert summary(plain).splitlines()[-2].startswith("  site 2 (2 samples): sample accuracy 0.5000, f1 0.3333, ")
    assert summary(plain).splitlines()[-1].startswith("  worst site: sample accuracy 0.5000 (site 2), ")  # 1: 0.75


def test_no_site_table_for_one_site_unlabelled_samples_or_a_detector(recipe):
    one_site = [r for r in ROWS if r[0] == "1"]
    assert by_site(_pred(one_site), recipe, ["CE", "LAA"]) == {}  # its metrics are the split's own
    assert by_site(_pred(ROWS[:6]) | {"labels": None}, recipe, ["CE", "LAA"]) == {}
    detector = recipe.model_copy(update={"task": "detect"})
    assert by_site(_pred(), detector, ["CE", "LAA"]) == {}


def test_a_multilabel_sites_metrics_are_rsnas(tmp_path):
    recipe = load_recipe("rsna_ich_subtypes", [f"data.dataset={tmp_path}", "eval.levels=[]"])
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (8, 6))
    probs = rng.uniform(0.05, 0.95, (8, 6))
    pred = {"probs": probs, "labels": labels, "metas": [{"site": "AB"[i % 2]} for i in range(8)], "loss": 0.1}
    found = by_site(pred, recipe, [f"l{j}" for j in range(6)])
    from training.metrics import rsna_log_loss

    assert found["A"]["sample"]["rsna_log_loss"] == pytest.approx(rsna_log_loss(labels[::2], probs[::2]))
    assert found["A"]["sample"]["classes"] == dict(
        zip([f"l{j}" for j in range(6)], labels[::2].sum(0).tolist(), strict=True)
    )
    assert "weighted_log_loss" not in found["A"]["sample"]


def test_sites_that_read_alike_as_metric_names_are_told_apart():
    assert site_keys(["a b", "a_b", "Mayo"]) == {"a b": "a_b_0", "a_b": "a_b_1", "Mayo": "Mayo"}


def test_metas_by_column_take_keeps_the_chosen_samples_in_order():
    metas = Metas.of([{"patient": f"p{i}", "site": str(i % 3), "x": i} for i in range(7)])
    part = metas.take(np.array([5, 2, 3]))
    assert list(part) == [{"patient": "p5", "site": "2", "x": 5}, {"patient": "p2", "site": "2", "x": 2}, metas[3]]
    assert part.columns["site"][1][0] == ["2", "0"]  # only the values the samples it keeps use


def test_a_slides_tiles_carry_its_site_from_the_label_table(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_PSEUDONYM_KEY", "k")
    _, labels = make_slides(tmp_path / "slides", n=1, size=1024, seed=2)  # center_id 11
    cfg = WsiIngestConfig(sources=[str(tmp_path / "slides")], out=str(tmp_path / "out"), labels=str(labels))
    (unit,) = make_plan("wsi", cfg, b"k").units
    works, _ = plan_unit(unit, cfg)
    metas = [json.loads(s["json"]) for s in work_samples(works[0], cfg)]
    assert metas and {m["site"] for m in metas} == {"11"}
    unit.site = None  # a table without a site column: no site key at all, rather than a null
    assert all("site" not in json.loads(s["json"]) for s in work_samples(works[0], cfg))


def test_a_groups_row_in_a_prediction_table_names_its_site_or_sites(recipe):
    from training.reporting import prediction_tables

    metas = [{"patient": p, "site": s} for p, s in (("a", "1"), ("a", "1"), ("b", "2"), ("b", "11"), ("c", "2"))]
    assert group_sites(metas, "patient", ["a", "b", "c"]) == {"site": ["1", "2+11", "2"]}  # b: of two centres
    assert group_sites([*metas, {"patient": "d"}], "patient", ["a", "b", "c", "d"]) == {}  # not every sample's
    tables = prediction_tables(_pred(ROWS[:6]), recipe, ["CE", "LAA"])
    rows = list(csv.DictReader(tables["patient"].splitlines()))
    assert [(r["site"], r["patient"], r["label"]) for r in rows] == [
        ("1", "a", "CE"),
        ("1", "b", "LAA"),
        ("2", "c", "LAA"),
        ("2", "d", "CE"),
    ]
    assert next(csv.DictReader(tables["sample"].splitlines()))["site"] == "1"


def test_the_worst_site_is_the_lowest_accuracy_f1_or_auc_and_the_highest_log_loss_passing_over_a_missing_auc():
    def site(accuracy, auc, loss):
        return {"sample": {"count": 4, "accuracy": accuracy, "f1": accuracy / 2, "auc": auc, "weighted_log_loss": loss}}

    nan = float("nan")
    found = {"1": site(0.9, 0.8, 0.4), "2": site(0.6, nan, 0.7), "3": site(0.7, 0.95, 1.2)}  # 2: one class
    assert worst_sites(found, "val_") == {
        "val_worst_site_accuracy": 0.6,
        "val_worst_site_f1": 0.3,
        "val_worst_site_auc": 0.8,
        "val_worst_site_weighted_log_loss": 1.2,
    }
    both = worst_sites({"1": site(0.9, nan, 0.4), "2": site(0.6, nan, 0.7)}, "test_")
    assert np.isnan(both["test_worst_site_auc"])  # no site has one
    assert worst_sites({"1": site(0.9, 0.8, 0.4)}, "val_") == {}  # one site: the split's own


def test_each_epoch_reports_each_sites_and_the_worst_sites_validation_metrics(recipe):
    """The training loop's per-epoch evaluation (``Trainer._evaluate``) on a prediction of two sites."""
    from training.loop import Trainer

    trainer = Trainer.__new__(Trainer)  # its evaluation alone: no engine, no data
    trainer.recipe, trainer.outputs = recipe, ["CE", "LAA"]
    pred = _pred()
    metrics = trainer._evaluate(pred, "val_")
    assert pred["sites"] == by_site(_pred(), recipe, ["CE", "LAA"])  # kept for the selected model's table
    assert metrics["val_accuracy"] == pytest.approx(5 / 7)  # all seven samples: b's second and d wrong
    assert metrics["val_site_1_accuracy"] == 0.75 and metrics["val_site_2_patient_accuracy"] == 0.5
    assert metrics["val_worst_site_accuracy"] == 0.5 and metrics["val_worst_site_patient_auc"] == 1.0
    assert not any(k.endswith(("_samples", "_count")) for k in metrics)  # counts once, in the held-out step
    one_site = trainer._evaluate(_pred([r for r in ROWS if r[0] == "1"]), "val_swa_")
    assert "val_swa_accuracy" in one_site and not any("site" in k for k in one_site)


def _many_patients(sites: int = 2, patients: int = 12, tiles: int = 3, seed: int = 0):
    """``sites`` centres of ``patients`` patients each, of alternating classes, ``tiles`` tiles a patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(sites):
        for q in range(patients):
            label = q % 2
            for _ in range(tiles):
                right = rng.uniform(0.3, 0.9)
                rows.append((str(s + 1), f"{s}-{q}", label, [1 - right, right] if label else [right, 1 - right]))
    return rows


def test_a_held_out_sites_metrics_have_intervals_from_resamples_of_its_own_patients(recipe):
    """The held-out evaluation's sites (``bounds``): each metric's interval is the one drawn from the site's
    patients alone, as :func:`training.levels.intervals` draws it for a split of that site's samples."""
    from training.levels import intervals

    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"bootstrap": 200})})
    rows = _many_patients()
    found = by_site(_pred(rows), recipe, ["CE", "LAA"], bounds=True)
    for site in ("1", "2"):
        alone, _ = intervals(_pred([r for r in rows if r[0] == site]), recipe, ["CE", "LAA"], "")
        for level, pre in (("sample", ""), ("patient", "patient_")):
            got = found[site][level]
            for k in ("accuracy", "f1", "auc", "weighted_log_loss", "brier_loss"):
                assert (got[f"{k}_ci_low"], got[f"{k}_ci_high"]) == (
                    alone[f"{pre}{k}_ci_low"],
                    alone[f"{pre}{k}_ci_high"],
                )
                assert got[f"{k}_ci_low"] <= got[k] <= got[f"{k}_ci_high"]
            # each metric's bounds beside it, in the table's columns too
            assert list(got)[1:4] == ["accuracy", "accuracy_ci_low", "accuracy_ci_high"]
    # of 12 patients a site, the interval is wider than that of the 24 of both sites
    both, _ = intervals(_pred(rows), recipe, ["CE", "LAA"], "")
    width = found["1"]["sample"]["auc_ci_high"] - found["1"]["sample"]["auc_ci_low"]
    assert width > both["auc_ci_high"] - both["auc_ci_low"]
    # the epoch's validation (no bounds) and a recipe drawing none: no intervals
    assert "accuracy_ci_low" not in by_site(_pred(rows), recipe, ["CE", "LAA"])["1"]["sample"]
    none = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"bootstrap": 0})})
    assert "accuracy_ci_low" not in by_site(_pred(rows), none, ["CE", "LAA"], bounds=True)["1"]["sample"]


def test_a_sites_intervals_are_logged_tabled_and_shown_beside_its_metrics(recipe):
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"bootstrap": 200})})
    found = by_site(_pred(_many_patients()), recipe, ["CE", "LAA"], bounds=True)
    metrics = site_metrics(found, "test_")
    patient = found["1"]["patient"]
    assert metrics["test_site_1_patient_auc_ci_low"] == patient["auc_ci_low"]
    assert metrics["test_site_2_brier_loss_ci_high"] == found["2"]["sample"]["brier_loss_ci_high"]
    assert not any("worst_site" in k and k.endswith(("_ci_low", "_ci_high")) for k in metrics)
    rows = list(csv.DictReader(site_table(found).splitlines()))
    assert list(rows[0])[5:8] == ["accuracy", "accuracy_ci_low", "accuracy_ci_high"]
    assert float(rows[1]["auc_ci_low"]) == pytest.approx(patient["auc_ci_low"], rel=1e-5)
    outcome = EvalOutcome("r", "test_", "ds", "test", {"test_accuracy": 0.6} | metrics, ["patient"])
    lines = summary(outcome).splitlines()
    low, high = patient["accuracy_ci_low"], patient["accuracy_ci_high"]
    assert lines[-3].startswith(
        f"  site 1 (36 samples, 12 patient(s)): patient accuracy {patient['accuracy']:.4f} [{low:.4f}, {high:.4f}], "
    )
    # the worst site's figure with that site's interval
    worst = min(("1", "2"), key=lambda s: found[s]["patient"]["accuracy"])
    at = found[worst]["patient"]
    assert lines[-1].startswith(
        f"  worst site: patient accuracy {at['accuracy']:.4f} [{at['accuracy_ci_low']:.4f}, "
        f"{at['accuracy_ci_high']:.4f}] (site {worst}), "
    )


def test_a_study_may_compare_the_held_out_sites_intervals_it_logs(recipe):
    """What ``compare.metrics`` is checked against (training.preflight.site_names) is what the held-out step
    logs of its sites, name for name."""
    from training.preflight import site_names, validation_metrics

    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"bootstrap": 20})})
    logged = site_metrics(by_site(_pred(_many_patients()), recipe, ["CE", "LAA"], bounds=True), "test_")
    names = validation_metrics(recipe, ["CE", "LAA"])
    assert set(logged) == site_names(names, recipe, ["1", "2"], "test_", counts=True, held_out=True)
