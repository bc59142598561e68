"""The comparison statistics against scipy/statsmodels and textbook formulas, including paper 002's edge cases
(a group with zero variance, a non-normal group), and sweep files: spaces, validation, replicate splits."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.power import TTestIndPower

from training.config import RecipeError
from tune.config import ReplicateConfig, SweepConfig, load_plan, pairwise, replicate_sweep
from tune.stats import cohens_d, compare, summarise

# ten replicate accuracies per model (paper 002's scale: two models, 10 runs each)
VIVIT = [0.70, 0.68, 0.74, 0.66, 0.71, 0.69, 0.73, 0.67, 0.72, 0.70]
CONVNEXT = [0.61, 0.64, 0.60, 0.63, 0.59, 0.62, 0.65, 0.60, 0.58, 0.63]
SKEWED = [1.0, 1.0, 0.95, 1.0, 0.4, 1.0, 0.5, 0.3, 1.0, 0.45]  # precision, bimodal: not normal, wide


def test_normal_groups_use_students_t_and_match_scipy_and_formulas():
    c = compare(VIVIT, CONVNEXT, "accuracy")
    a, b = np.array(VIVIT), np.array(CONVNEXT)
    assert c.a.mean == pytest.approx(a.mean(), abs=1e-12) and c.a.sd == pytest.approx(a.std(ddof=1), abs=1e-12)
    assert (c.a.min, c.a.max, c.a.n) == (0.66, 0.74, 10)
    w, p = stats.shapiro(a)
    assert abs(c.a.shapiro_w - w) < 1e-9 and abs(c.a.shapiro_p - p) < 1e-9
    lev = stats.levene(a, b)
    assert abs(c.levene_w - lev.statistic) < 1e-9 and abs(c.levene_p - lev.pvalue) < 1e-9
    assert c.equal_var and c.t_test == "Student's t" and c.decided_by == "Student's t"
    # Student's t by hand: pooled variance, n1 + n2 - 2 degrees of freedom
    sp = math.sqrt((9 * a.var(ddof=1) + 9 * b.var(ddof=1)) / 18)
    t = (a.mean() - b.mean()) / (sp * math.sqrt(2 / 10))
    assert abs(c.t_stat - t) < 1e-9 and c.t_df == 18
    assert abs(c.t_p - 2 * stats.t.sf(abs(t), 18)) < 1e-9
    u = stats.mannwhitneyu(a, b, alternative="two-sided")
    assert abs(c.mwu_u - u.statistic) < 1e-9 and abs(c.mwu_p - u.pvalue) < 1e-9
    assert abs(c.cohens_d - (a.mean() - b.mean()) / sp) < 1e-9
    power = TTestIndPower().power(effect_size=abs(c.cohens_d), nobs1=10, alpha=0.05, ratio=1.0)
    assert abs(c.power - power) < 1e-9
    assert c.significant and "A is higher" in c.verdict


def test_unequal_variances_use_welch_and_non_normal_groups_are_decided_by_mann_whitney():
    c = compare(SKEWED, CONVNEXT, "precision")
    a, b = np.array(SKEWED), np.array(CONVNEXT)
    assert not c.a.normal(0.05) and c.decided_by == "Mann-Whitney U"
    assert not c.equal_var and c.t_test == "Welch's t"
    va, vb = a.var(ddof=1) / 10, b.var(ddof=1) / 10
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 9 + vb**2 / 9)  # Welch-Satterthwaite
    assert abs(c.t_stat - t) < 1e-9 and abs(c.t_df - df) < 1e-9
    assert abs(c.t_p - 2 * stats.t.sf(abs(t), df)) < 1e-9
    assert c.significant == (c.mwu_p < 0.05)
    # a pair of a three-group study: alpha / 3 (Bonferroni), said in four figures
    said = compare(SKEWED, CONVNEXT, "precision", alpha=0.05 / 3).verdict
    assert said == f"precision: no significant difference (Mann-Whitney U, p = {c.mwu_p:.4g} >= 0.01667)"


def test_zero_variance_group():
    constant = [1.0] * 10  # e.g. recall 1.0 in every replicate
    s = summarise(constant)
    assert s.sd == 0 and s.shapiro_p is None and "zero variance" in s.note
    c = compare(constant, CONVNEXT, "recall")
    assert c.decided_by == "Mann-Whitney U"  # normality cannot be established
    b = np.array(CONVNEXT)
    sp = math.sqrt(9 * b.var(ddof=1) / 18)
    assert abs(c.cohens_d - (1.0 - b.mean()) / sp) < 1e-9
    both = compare([0.9] * 5, [0.8] * 5, "recall")
    assert both.levene_p is None and both.equal_var and math.isinf(both.cohens_d) and both.power == 1.0
    same = compare([0.9] * 5, [0.9] * 5, "recall")
    assert math.isnan(same.cohens_d) and math.isnan(same.power) and not same.significant
    assert same.mwu_p == 1.0 and "no significant difference" in same.verdict
    with pytest.raises(ValueError, match="at least 2 values"):
        compare([0.5], CONVNEXT)


def test_a_replicate_whose_metric_is_undefined_is_left_out_and_said(tmp_path):
    """An AUC is NaN where a replicate's validation fold holds one class: one NaN made every statistic NaN and the
    verdict "no test possible (both groups constant and equal)". Left out, the rest compare as they are."""
    from tune.plots import box_plot_png

    c = compare([*VIVIT[:9], math.nan], CONVNEXT, "val_auc")
    assert c.undefined == (1, 0) and c.a.n == 9
    assert dataclasses.replace(c, undefined=(0, 0), verdict="") == dataclasses.replace(
        compare(VIVIT[:9], CONVNEXT, "val_auc"), verdict=""
    )
    assert c.verdict.startswith("val_auc: significant difference (Student's t, p = ")
    assert c.verdict.endswith("; left out, where val_auc is undefined (NaN): 1 run(s) of A, 0 of B")
    with pytest.raises(ValueError, match=r"got 1 and 10, the metric undefined \(NaN\) in 1 and 0 run\(s\) left out"):
        compare([0.7, math.nan], CONVNEXT, "val_auc")
    assert box_plot_png({"A": [*VIVIT[:9], math.nan], "B": CONVNEXT}, "val_auc", tmp_path / "box.png").exists()


def test_cohens_d_sign_and_small_groups():
    assert cohens_d(np.array([1.0, 2.0, 3.0]), np.array([2.0, 3.0, 4.0])) == pytest.approx(-1.0)
    assert summarise([0.5, 0.6]).note.startswith("fewer than 3")


def test_bundled_sweeps_load_and_check_their_space():
    sweep = load_plan("strip_ai_optimizer")
    assert sweep.search.num_samples == 50 and sweep.space["optim.lr"].loguniform == (1e-6, 1e-3)
    assert sweep.space["optim.name"].choice == ["adamw", "adam", "sgd", "rmsprop"]
    assert sweep.objective() == ("val_patient_weighted_log_loss", "min")
    study = load_plan("ct_ich_vivit_vs_convnext")
    groups = study.sweeps()
    assert [g.base().name for g in groups.values()] == ["ct_ich_sequence_vivit", "ct_ich_convnext_anypos"]
    assert study.replicates.n == 10 and study.compare.metrics[0] == "val_patient_accuracy"
    table3 = load_plan("brain_tumor_detectors")  # paper 004's Table 3: three detectors, each against each
    detectors = table3.sweeps()
    assert [g.base().model.name for g in detectors.values()] == [
        "retinanet_resnet50_fpn_v2",
        "fasterrcnn_resnet50_fpn_v2",
        "tf_efficientdet_d0",
    ]
    assert {g.objective() for g in detectors.values()} == {("val_map50", "max")}
    pairs = [("retinanet", "faster_rcnn"), ("retinanet", "efficientdet"), ("faster_rcnn", "efficientdet")]
    assert pairwise(list(table3.groups), 0.05) == (pairs, pytest.approx(0.05 / 3))  # Bonferroni over the pairs
    assert pairwise(list(study.groups), 0.05) == ([("vivit", "convnext")], 0.05)  # two groups: alpha as it is
    with pytest.raises(ValueError, match=r"at least two groups, got 1"):
        pairwise(["vivit"], 0.05)


def test_sweep_validation_names_the_problem():
    with pytest.raises(RecipeError, match=r"optim\.lrr"):
        SweepConfig(name="x", recipe="demo_tiles", space={"optim.lrr": {"uniform": [0, 1]}}).check_space()
    with pytest.raises(RecipeError, match=r"optim\.name"):
        SweepConfig(name="x", recipe="demo_tiles", space={"optim.name": {"choice": ["adamw", "lion"]}}).check_space()
    # A model timm does not know fails here, naming the value, not in every trial's workers.
    models = {"model.name": {"choice": ["resnet18", "resnet_50"]}}
    with pytest.raises(RecipeError, match=r"space\.model\.name='resnet_50': model\.name: timm has no model"):
        SweepConfig(name="x", recipe="demo_tiles", space=models).check_space()
    with pytest.raises(RecipeError, match="timm has no model 'resnet_50'"):
        replicate_sweep("demo_tiles", ["model.name=resnet_50"], 3)
    with pytest.raises(ValueError, match="exactly one of"):
        SweepConfig(name="x", recipe="demo_tiles", space={"optim.lr": {"uniform": [0, 1], "choice": [1]}})
    with pytest.raises(ValueError, match="optuna cannot take grid"):
        SweepConfig(name="x", recipe="demo_tiles", space={"optim.lr": {"grid": [0.1]}})
    with pytest.raises(ValueError, match="pbt"):
        SweepConfig(name="x", recipe="demo_tiles", space={"optim.lr": {"uniform": [0.1, 1]}}, scheduler={"name": "pbt"})
    # a key of the sweep file no section has: the closest of its section's fields
    with pytest.raises(RecipeError, match=r"strip_ai_optimizer\.yaml: scheduler\.nam: no such field \(closest: name\)"):
        load_plan("strip_ai_optimizer", ["scheduler.nam=asha"])


def test_replicates_resplit_by_fold():
    folds = [f"f{i}" for i in range(10)]
    reps = ReplicateConfig(n=10, resplit=True, folds=folds, val_folds=2)
    splits = [reps.params(i, 100) for i in range(10)]
    assert [s["seed"] for s in splits] == list(range(100, 110))
    for s in splits:
        train, val = s["data.train_split"].split("+"), s["data.val_split"].split("+")
        assert len(val) == 2 and sorted(train + val) == sorted(folds)
    assert len({s["data.val_split"] for s in splits}) > 5  # fresh splits, not one repeated
    assert reps.params(3, 100) == splits[3]  # reproducible
    with pytest.raises(ValueError, match="more folds"):
        ReplicateConfig(n=2, resplit=True, folds=["a", "b"], val_folds=2)


def test_tune_space_trial_counts_and_concurrency():
    from ray.tune.search.sample import Categorical, Float

    from training.config import load_recipe
    from tune.sweep import concurrency, expected_trials, tune_space

    sweep = load_plan("strip_ai_optimizer")
    space = tune_space(sweep.space)
    assert isinstance(space["optim.name"], Categorical) and isinstance(space["optim.lr"], Float)
    assert space["optim.lr"].lower == 1e-6 and space["optim.lr"].upper == 1e-3
    assert expected_trials(sweep) == 50
    grid = SweepConfig(
        name="g", recipe="demo_tiles", space={"optim.lr": {"grid": [1, 2, 3]}, "optim.name": {"choice": ["a", "b"]}},
        search={"algorithm": "grid", "num_samples": 2},
    )  # fmt: skip
    assert tune_space(grid.space, grid=True)["optim.name"] == {"grid_search": ["a", "b"]}
    assert expected_trials(grid) == 12
    recipe = load_recipe("demo_tiles", ["workers=2"])
    assert concurrency(recipe, [{"CPU": 16, "GPU": 4}], use_gpu=False) == 8
    assert concurrency(recipe, [{"CPU": 16, "GPU": 4}], use_gpu=True) == 2
    assert concurrency(recipe, [{"CPU": 1}], use_gpu=False) == 1
    # node by node: 12 CPUs in all, but each 4-CPU node holds one 3-CPU worker, so one group of two at a time
    wide = load_recipe("demo_tiles", ["workers=2", "cpus_per_worker=3"])
    assert concurrency(wide, [{"CPU": 4}] * 3, use_gpu=False) == 1
    assert concurrency(wide, [{"CPU": 6}] * 3, use_gpu=False) == 3
    # strict_spread: each group on distinct nodes, groups sharing them: 3 nodes of 8 CPUs hold 12 groups of 2
    spread = load_recipe("demo_tiles", ["workers=2", "placement=strict_spread"])
    assert concurrency(spread, [{"CPU": 8}] * 3, use_gpu=False) == 12
    assert concurrency(spread, [{"CPU": 8}, {"CPU": 1}], use_gpu=False) == 1  # the small node holds one worker
    assert concurrency(spread, [{"CPU": 8}], use_gpu=False) == 1  # none fits: at least one (it waits for nodes)


def test_pbt_runs_synchronously_when_asked_and_a_trials_workers_wait_for_each_verdict():
    from collections import deque

    from training.loop import await_go_ahead
    from tune.sweep import make_scheduler

    def pbt(**scheduler):
        sweep = SweepConfig(
            name="p", recipe="demo_tiles", space={"optim.lr": {"loguniform": [1e-4, 1e-2]}},
            search={"algorithm": "random"}, scheduler={"name": "pbt", **scheduler},
        )  # fmt: skip
        return make_scheduler(sweep, 4)

    assert pbt()._synch is False and pbt(synch=True)._synch is True

    class Gate:  # the epochs a trial let its workers go on after, as ray.util.queue.Queue hands them out
        def __init__(self, *epochs: int) -> None:
            self.left = deque(epochs)

        def get(self) -> int:
            return self.left.popleft()  # an empty gate raises: the worker would still be waiting

    gate = Gate(0, 1, 2)  # epoch 0's verdict, left unread by workers that failed first and were restarted
    await_go_ahead(gate, 1)
    assert list(gate.left) == [2]
    with pytest.raises(IndexError):  # no verdict on epoch 3 yet: it waits
        await_go_ahead(gate, 3)


def test_a_finished_pbt_sweep_keeps_each_trials_newest_complete_checkpoint(tmp_path):
    from tune.sweep import prune_checkpoints

    def checkpoint(run: str, stamp: str, complete: bool = True):
        folder = tmp_path / run / f"checkpoint_2026-11-30_15-00-{stamp}.000000" / "checkpoint"
        folder.mkdir(parents=True)
        if complete:
            (folder / "mp_rank_00_model_states.pt").write_bytes(b"x")
        return folder.parent

    a_old = checkpoint("demo-aaaaaaaaaaaa", "01")
    a_new = checkpoint("demo-aaaaaaaaaaaa-1f2e3d", "02")  # the trial went on after a PBT exploit
    a_cut = checkpoint("demo-aaaaaaaaaaaa-1f2e3d", "03", complete=False)  # stopped while saving
    b_only = checkpoint("demo-bbbbbbbbbbbb", "01")
    other = checkpoint("demo-cccccccccccc", "01")  # not this sweep's
    assert prune_checkpoints(["aaaaaaaaaaaa0000", "bbbbbbbbbbbb0000"], "demo", str(tmp_path)) == 2
    assert [p.exists() for p in (a_old, a_new, a_cut, b_only, other)] == [False, True, False, True, True]


def test_a_sweeps_new_trials_read_the_dataset_version_it_started_on(tmp_path):
    """The parent run records the base dataset's version; a trial started later (a resumed sweep, or a long one
    while an ingest --append ran) is refused on another version, so trials compare on the same data. A trial
    whose recipe names another dataset is not held to it."""
    from shards import manifest as mf
    from training.config import load_recipe
    from training.launch import MANIFEST_TAG
    from tune.runs import check_trial_data

    data = tmp_path / "ds"
    url = mf.save(mf.Manifest(dataset=str(data), kind="wsi", classes=["CE", "LAA"]), str(data))
    recipe = load_recipe("demo_tiles", [f"data.dataset={data}"])
    tags = {"dataset": str(data), MANIFEST_TAG: mf.sha256_of(Path(url).read_bytes())}
    check_trial_data(tags, recipe, "sweep-1")  # the same version: no complaint
    mf.save(mf.Manifest(dataset=str(data), kind="wsi", classes=["CE", "LAA"], created="later"), str(data))
    with pytest.raises(ValueError, match=r"made again since sweep sweep-1 started .* than its earlier trials did"):
        check_trial_data(tags, recipe, "sweep-1")
    check_trial_data(tags | {"dataset": "s3://b/other"}, recipe, "sweep-1")  # a trial of another dataset


def test_a_group_by_mlflow_filter_holds_the_finished_training_runs_it_matches(mlflow_uri, tmp_path):
    """The filter reaches MLflow as its own clauses (MLflow takes no parentheses), and neither a sweep's parent
    run nor a comparison, which carry the same tags, counts as a replicate."""
    from mlflow import MlflowClient

    from tune.compare import find_group

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    runs = {}
    for name, kind, status in [
        ("plain", None, "FINISHED"),
        ("trial", "trial", "FINISHED"),
        ("parent", "sweep", "FINISHED"),
        ("comparison", "comparison", "FINISHED"),
        ("failed", None, "FAILED"),
        ("other", None, "FINISHED"),
    ]:
        tags = {"recipe": "other" if name == "other" else "x"} | ({"tessera.kind": kind} if kind else {})
        runs[name] = client.create_run(exp, tags=tags, run_name=name).info.run_id
        client.set_terminated(runs[name], status)
    group = find_group(client, "tags.recipe = 'x'")
    assert sorted(r.info.run_name for r in group.runs) == ["plain", "trial"]
    assert group.source == "filter tags.recipe = 'x'"


def test_a_new_trials_run_records_the_dataset_version_it_was_checked_on_read_once(mlflow_uri, tmp_path, monkeypatch):
    """The trial's check and its run read the manifest once: a version changed between two reads could have been
    checked and another recorded."""
    from mlflow import MlflowClient

    from shards import manifest as mf
    from tests.datasets import make_dataset
    from training.config import load_recipe
    from training.launch import MANIFEST_TAG
    from tune.runs import child_run

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "ds"
    make_dataset(str(data), {"train": 4, "val": 4}, size=16, shard_samples=4)
    recipe = load_recipe("demo_tiles", [f"data.dataset={data}", "eval.levels=[patient]"])
    version = mf.sha256_of((data / mf.MANIFEST_NAME).read_bytes())
    uri = mlflow_uri
    client = MlflowClient(uri)
    exp = client.create_experiment(recipe.experiment, artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, tags={"dataset": str(data), MANIFEST_TAG: version}).info.run_id
    reads, read = [], mf.load_brief  # what a driver reads: a brief of each record
    monkeypatch.setattr(mf, "load_brief", lambda url: reads.append(url) or read(url))
    trial, last = child_run(uri, "sweep-1", parent, "t0", recipe)
    assert last is None  # a new run: the trial trains
    assert reads == [str(data)]
    assert client.get_run(trial).data.tags[MANIFEST_TAG] == version
    _resumed_trials_take_their_last_report_where_kept(uri, parent, trial, recipe)


def _resumed_trials_take_their_last_report_where_kept(uri, parent, trial, recipe):
    """A trial resumed after its run had finished (its last report kept) reports that again, and its run stays
    closed; one resumed mid-training, or before its run closed, reopens its run and trains on."""
    import numpy as np
    from mlflow import MlflowClient

    from tune.runs import child_run, keep_last_report

    client = MlflowClient(uri)
    client.set_terminated(trial, "KILLED")  # interrupted while training
    assert child_run(uri, "sweep-1", parent, "t0", recipe) == (trial, None)
    assert client.get_run(trial).info.status == "RUNNING"
    # the last epoch reported and kept, then the run interrupted before it closed: it trains on
    keep_last_report(uri, trial, {"epoch": 2, "val_loss": np.float32(0.25), "done": True}, "s3://ckpt/checkpoint_2")
    client.set_terminated(trial, "KILLED")
    assert child_run(uri, "sweep-1", parent, "t0", recipe) == (trial, None)
    client.set_terminated(trial, "FINISHED")  # the run closed; Tune had not taken the last report
    ended = client.get_run(trial).info.end_time
    again, last = child_run(uri, "sweep-1", parent, "t0", recipe)
    assert again == trial and last == {
        "metrics": {"epoch": 2, "val_loss": 0.25, "done": True},
        "path": "s3://ckpt/checkpoint_2",
    }
    assert client.get_run(trial).info.status == "FINISHED" and client.get_run(trial).info.end_time == ended


def test_a_sweeps_parent_run_says_where_its_trials_come_from_as_they_do(mlflow_uri, tmp_path, monkeypatch):
    """The parent run carries the trials' origin tags (recipe, dataset and its version, the code that made the
    dataset and the code that trains), so a sweep is found and compared by the same tags as its trials."""
    from mlflow import MlflowClient

    from shards import manifest as mf
    from shards import provenance
    from tests.datasets import make_dataset
    from training.config import load_recipe
    from tune.runs import KIND, child_run, start_parent

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(provenance, "commit", lambda: "abc123")
    monkeypatch.setattr(provenance, "version", lambda: "9.9.9")
    data = tmp_path / "ds"
    make_dataset(str(data), {"train": 4, "val": 4}, size=16, shard_samples=4)
    manifest = mf.load(str(data))
    manifest.made_by = made_by = "tessera 0.0.1 (0ld)"  # made by earlier code than the sweep's
    manifest.rendered_with = {"tessera": "wsi rendering 1", "numpy": "2.4.6"}  # and amended by other libraries
    manifest.amended = [mf.Amendment(time="t", added=1, rendered_with={"tessera": "wsi rendering 1", "numpy": "2.5"})]
    mf.save(manifest, str(data))
    sweep = SweepConfig(
        name="lr", recipe="demo_tiles", overrides=[f"data.dataset={data}", "eval.levels=[patient]"],
        space={"optim.lr": {"loguniform": [1e-4, 1e-2]}},
    )  # fmt: skip
    uri = mlflow_uri
    parent = start_parent(sweep, uri, "lr-1", "sweep")
    trial, _ = child_run(uri, "lr-1", parent, "t0", load_recipe("demo_tiles", sweep.overrides))
    client = MlflowClient(uri)
    tags = client.get_run(parent).data.tags
    origin = {"recipe", "dataset", "manifest_sha256", "git_commit", "tessera_version", "dataset_made_by"}
    origin.add("dataset_rendered_with")
    assert {k: tags[k] for k in origin} == {k: client.get_run(trial).data.tags[k] for k in origin}
    assert (tags["git_commit"], tags["tessera_version"], tags["dataset_made_by"]) == ("abc123", "9.9.9", made_by)
    assert tags["dataset_rendered_with"] == "tessera wsi rendering 1, numpy 2.4.6 | 2.5"
    assert tags[KIND] == "sweep"


def test_a_sweeps_objective_is_checked_against_each_epochs_metrics_before_its_parent_run_exists(
    mlflow_uri, tmp_path, monkeypatch
):
    """Tune stops a sweep at the first report without its metric, after an epoch of every trial."""
    from mlflow import MlflowClient

    from tests.datasets import make_dataset
    from training.config import RecipeError
    from tune.runs import start_parent

    monkeypatch.chdir(tmp_path)  # MLflow's artifacts beside its database (./mlruns), not in the working tree
    data = tmp_path / "ds"
    make_dataset(str(data), {"train": 4, "val": 8}, size=16, shard_samples=4, sites=2)  # two validation centres
    uri = mlflow_uri

    def sweep(metric: str, *more: str) -> SweepConfig:
        return SweepConfig(
            name="lr", recipe="demo_tiles", overrides=[f"data.dataset={data}", "eval.levels=[patient]", *more],
            space={"optim.lr": {"loguniform": [1e-4, 1e-2]}}, metric=metric, mode="max",
        )  # fmt: skip

    with pytest.raises(RecipeError, match=r"^metric: 'val_patient_acuracy' is not a metric demo_tiles reports each "
                       r"epoch on .*; close: val_patient_accuracy"):  # fmt: skip
        start_parent(sweep("val_patient_acuracy"), uri, "lr-1", "sweep")
    with pytest.raises(RecipeError, match="'val_swa_accuracy' is not a metric demo_tiles reports each epoch"):
        start_parent(sweep("val_swa_accuracy", "swa.enabled=true"), uri, "lr-1", "sweep")  # the last epoch's alone
    client = MlflowClient(uri)
    experiment = sweep("x").base().experiment or "demo_tiles"
    assert client.get_experiment_by_name(experiment) is None  # no parent run was made
    start_parent(sweep("val_worst_site_patient_accuracy"), uri, "lr-2", "sweep")  # a validation centre's
    start_parent(sweep("train_loss"), uri, "lr-3", "sweep")  # not a validation metric: left to Tune
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["lr-2", "lr-3"]


def test_a_study_refuses_a_metric_its_runs_would_not_log_before_any_replicate(tmp_path):
    """compare.metrics are checked against what each group's recipe logs on its dataset: each epoch's metrics,
    and the held-out split's where the dataset has one; a misspelt one is named, with the close ones."""
    from tests.datasets import make_dataset
    from tune.config import StudyConfig

    make_dataset(str(tmp_path / "ds"), {"train": 8, "val": 4, "test": 4}, size=32)
    make_dataset(str(tmp_path / "boxed"), {"train": 8, "val": 4}, size=32, boxes=True)
    small = [f"data.dataset={tmp_path / 'ds'}", "eval.levels=[patient]"]

    def study(metrics, b="demo_tiles", b_overrides=small):
        return StudyConfig(
            name="s", groups={"a": {"recipe": "demo_tiles", "overrides": small},
                              "b": {"recipe": b, "overrides": b_overrides}},
            replicates={"n": 2}, compare={"metrics": metrics},
        )  # fmt: skip

    study(["val_patient_accuracy", "test_patient_accuracy", "val_loss", "train_loss"]).check_compared()
    with pytest.raises(RecipeError, match=r"group a\): 'val_patient_acuracy' is not a metric demo_tiles logs .*"
                       r"close: val_patient_accuracy"):  # fmt: skip
        study(["val_patient_acuracy"]).check_compared()
    with pytest.raises(RecipeError, match=r"group a\): 'val_slide_accuracy' is not a metric"):  # not in eval.levels
        study(["val_slide_accuracy"]).check_compared()
    detect = [f"data.dataset={tmp_path / 'boxed'}", "model.pretrained=false"]
    with pytest.raises(RecipeError, match=r"group a\): 'val_image_accuracy' is not a metric demo_tiles"):
        study(["val_image_accuracy"], "brain_tumor_detect", detect).check_compared()  # a detector's, not both's
    with pytest.raises(RecipeError, match=r"group b\): 'test_accuracy' is not a metric brain_tumor_detect"):
        study(["test_accuracy"], "brain_tumor_detect", detect).check_compared()  # no test split there
    bundled = load_plan("brain_tumor_detectors")  # paper 004's: every metric it compares, each detector logs
    for group in bundled.groups.values():
        group.overrides += detect
    bundled.check_compared()


def test_a_study_whose_groups_datasets_hold_other_patients_in_a_fold_is_warned_of(tmp_path, capsys):
    """Paper 002 ingests CT-ICH twice (sequences, slices) into ten folds, and each replicate validates both models
    on the same folds: datasets split otherwise (another seed, another --split-balance) validate them on other
    patients, which the comparison would take for the models' difference."""
    from tests.datasets import make_dataset
    from tune.config import StudyConfig, fold_note

    make_dataset(str(tmp_path / "a"), {"f0": 8, "f1": 8, "f2": 8, "val": 4}, size=32)
    make_dataset(str(tmp_path / "same"), {"f0": 8, "f1": 8, "f2": 8, "val": 4}, size=32, seed=5)
    make_dataset(str(tmp_path / "other"), {"f0": 8, "f1": 12, "f2": 4, "val": 4}, size=32)

    def study(b: str) -> StudyConfig:
        return StudyConfig(
            name="s", groups={"a": {"recipe": "demo_tiles", "overrides": [f"data.dataset={tmp_path / 'a'}"]},
                              "b": {"recipe": "demo_tiles", "overrides": [f"data.dataset={tmp_path / b}"]}},
            replicates={"n": 2, "resplit": True, "folds": ["f0", "f1", "f2"], "val_folds": 1},
            compare={"metrics": ["val_accuracy"]},
        )  # fmt: skip

    study("same").check_compared()
    assert "warning" not in capsys.readouterr().out
    study("other").check_compared()
    assert capsys.readouterr().out == (
        "warning: groups a and b hold other patients in 2 of their 3 folds (f1, f2): each replicate validates them "
        "on other patients. Ingest their datasets from the same patients with the same --split, --seed and "
        "--split-balance\n"
    )
    assert fold_note({"a": {"f0": {"p"}}}) is None


def test_the_stain_jitter_study_is_measured_on_centres_no_replicate_saw(tmp_path):
    """Its data is a dataset whose test split is held-out centres (``--hold-out-sites``), and it compares the
    replicates' test metrics, which its check before any training accepts on a dataset with a test split."""
    from tests.datasets import make_dataset
    from training.preflight import check_compared

    study = load_plan("strip_ai_stain_jitter")
    recipes = {label: sweep.base() for label, sweep in study.sweeps().items()}
    assert {r.data.dataset for r in recipes.values()} == {"s3://shards/strip_ai/unseen_centres"}
    assert (recipes["paper"].data.augment.hed_p, recipes["hed_light"].data.augment.hed_p) == (0.0, 0.5)
    assert study.compare.metrics == ["test_patient_weighted_log_loss", "test_patient_accuracy"]
    manifest = make_dataset(str(tmp_path / "ds"), {"train": 4, "val": 4, "test": 4})
    for recipe in recipes.values():
        check_compared(recipe, manifest, study.compare.metrics, "compare.metrics")
    with pytest.raises(RecipeError, match=r"'test_patient_weighted_log_loss' is not a metric strip_ai_resnet50 logs"):
        check_compared(recipes["paper"], make_dataset(str(tmp_path / "no_test"), {"train": 4, "val": 4}),
                       study.compare.metrics, "compare.metrics")  # fmt: skip
    # each held-out centre's metrics, where its test split is of two or more (training.sites)
    centres = make_dataset(str(tmp_path / "centres"), {"train": 4, "val": 4, "test": 8}, sites=2)
    each = ["test_site_1_patient_weighted_log_loss", "test_site_2_samples", "test_site_2_patient_count"]
    check_compared(recipes["paper"], centres, each, "compare.metrics")
    failed = [dataclasses.replace(r, status="failed") if r.patient == "testp1" else r for r in centres.inputs]
    with pytest.raises(RecipeError, match="'test_site_1_patient_weighted_log_loss' is not a metric"):
        # site 2's only input failed: its samples are none, and site 1's metrics are the split's own
        check_compared(recipes["paper"], centres.model_copy(update={"inputs": failed}), each[:1], "compare.metrics")
    close = "close: test_site_2_patient_accuracy, test_site_1_patient_accuracy"
    with pytest.raises(RecipeError, match=rf"'test_site_3_patient_accuracy' is not .* {close}"):
        check_compared(recipes["paper"], centres, ["test_site_3_patient_accuracy"], "compare.metrics")
    with pytest.raises(RecipeError, match=r"'test_site_1_accuracy' is not a metric"):  # one centre: the split's own
        check_compared(
            recipes["paper"], make_dataset(str(tmp_path / "one"), {"test": 4}, sites=1), ["test_site_1_accuracy"], "x"
        )


def test_a_last_report_not_kept_is_said_and_the_trial_goes_on(mlflow_uri, capsys):
    from tune.runs import keep_last_report

    keep_last_report(mlflow_uri, "0" * 32, {"epoch": 1}, None)  # no such run
    assert "its last report to Tune was not kept (MlflowException: " in capsys.readouterr().out
