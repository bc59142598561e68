"""What the driver checks of a recipe against its dataset before any work (training.preflight)."""

import pytest

from shards import manifest as mf
from training.config import RECIPES, RecipeError, load_recipe
from training.preflight import check_monitor, check_patient_labels, validation_metrics

RSNA = ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_every_bundled_recipe_monitors_a_metric_it_reports(name):
    recipe = load_recipe(name)
    outputs = RSNA if recipe.task == "multilabel" else ["a", "b", "c", "d"][: 4 if "brain" in name else 2]
    check_monitor(recipe, outputs)
    for level in recipe.eval.levels:
        assert any(m.startswith(f"val_{level}_") for m in validation_metrics(recipe, outputs)), level


def test_a_monitor_of_a_level_left_out_fails_naming_the_close_metrics():
    recipe = load_recipe("strip_ai_resnet50", ["eval.levels=[slide]"])
    with pytest.raises(RecipeError) as err:
        check_monitor(recipe, ["CE", "LAA"])
    assert str(err.value) == (
        "eval.monitor: 'val_patient_weighted_log_loss' is not a metric this recipe reports (eval.levels ['slide'], "
        "2 outputs); close: val_slide_weighted_log_loss, val_weighted_log_loss"
    )
    check_monitor(load_recipe("strip_ai_resnet50", ["eval.levels=[slide]", "eval.monitor=val_loss"]), ["CE", "LAA"])
    check_monitor(load_recipe("strip_ai_resnet50", ["eval.monitor=train_loss"]), ["CE", "LAA"])  # not val_: reported


def test_any_positive_over_more_than_two_classes_fails_as_the_aggregations_field():
    with pytest.raises(RecipeError, match=r"^eval\.how: 'any' aggregation needs two classes \(negative, positive\)$"):
        check_monitor(load_recipe("brain_tumor_mri", ["eval.how=any"]), ["glioma", "meningioma", "pituitary", "none"])


def test_a_patient_labelled_two_ways_fails_before_training_unless_positive_means_any(tmp_path):
    def record(i, patient, label, split):
        return mf.InputRecord(id=f"i{i}", kind="wsi", status="ingested", patient=patient, label=label, split=split)

    manifest = mf.Manifest(dataset="s3://b/d", kind="wsi", classes=["CE", "LAA"])
    manifest.inputs = [record(0, "p1", 0, "val"), record(1, "p1", 0, "val"), record(2, "p2", 0, "train")]
    manifest.inputs += [record(3, "p2", 1, "train"), record(4, "p3", 1, "test")]
    recipe = load_recipe("strip_ai_resnet50", ["data.dataset=s3://b/d"])
    check_patient_labels(recipe, manifest)  # p2 mixes, but in train, which is not aggregated
    manifest.inputs.append(record(5, "p3", 0, "test"))
    with pytest.raises(RecipeError) as err:
        check_patient_labels(recipe, manifest)
    assert str(err.value) == (
        "eval.levels: patient p3 of s3://b/d has inputs labelled CE and LAA (1 such patient(s) in the test/val "
        "split(s)); aggregating by mean needs one label per patient: leave 'patient' out of eval.levels, or for a "
        "negative/positive task set eval.how=any"
    )
    for fix in (["eval.levels=[slide]"], ["eval.how=any"], ["data.test_split=null"]):
        check_patient_labels(load_recipe("strip_ai_resnet50", ["data.dataset=s3://b/d", *fix]), manifest)


def test_a_dataset_of_one_class_is_refused_for_a_classifier_and_an_image_folder_without_class_folders_warned_of(
    tmp_path,
):
    """Images ingested from a folder that holds them, not their class folders, make one class named after it: a
    classifier's loss is 0 from its first step. The ingest warns of it; training refuses it before any work."""
    from ingest.config import ImagesIngestConfig
    from ingest.plan import make_plan
    from tests.datasets import make_dataset
    from training.preflight import check_against

    (tmp_path / "Training").mkdir()
    for i in range(3):
        (tmp_path / "Training" / f"{i}.jpg").touch()
    plan = make_plan("images", ImagesIngestConfig(sources=[str(tmp_path / "Training")], out=str(tmp_path / "o")), b"k")
    assert plan.classes == ["Training"]
    assert plan.notes[0] == (
        "warning: one class, Training: each image's folder names its class (give the folder that holds the class "
        "folders)"
    )
    one = make_dataset(str(tmp_path / "one"), {"train": 4, "val": 4}, classes=1)
    with pytest.raises(RecipeError, match=r"^data\.dataset: .*/one has one class \(class0\), and a classifier"):
        check_against(load_recipe("demo_tiles", [f"data.dataset={tmp_path / 'one'}"]), one)
    two = make_dataset(str(tmp_path / "two"), {"train": 4, "val": 4}, classes=2)
    check_against(load_recipe("demo_tiles", [f"data.dataset={tmp_path / 'two'}"]), two)


def test_a_class_the_training_split_holds_no_sample_of_is_warned_of(tmp_path):
    """A class of few patients may land in other splits alone: the model is never shown it, said before a run."""
    from tests.datasets import make_dataset
    from training.preflight import untrained_classes

    one = make_dataset(str(tmp_path / "one"), {"train": 4, "val": 8}, classes=2)  # one patient in train
    [held] = set(one.sample_classes("train"))
    recipe = load_recipe("demo_tiles", [f"data.dataset={tmp_path / 'one'}"])
    assert untrained_classes(recipe, one) == (
        f"warning: the training split (train) holds no sample of class{1 - held}: the model never sees it"
    )
    both = make_dataset(str(tmp_path / "both"), {"train": 24, "val": 8}, classes=2)
    assert set(both.sample_classes("train")) == {0, 1} and untrained_classes(recipe, both) is None
    assert untrained_classes(load_recipe("rsna_ich_subtypes", [f"data.dataset={tmp_path / 'one'}"]), one) is None


def test_the_workers_a_cluster_holds_are_counted_per_node():
    from shards.nodes import workers_that_fit

    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 3.0}, {"CPU": 1.5, "GPU": 2.0}]
    assert workers_that_fit(nodes, 2, 0, "pack") == 4 + 1 + 0  # CPUs do not add up across nodes
    assert workers_that_fit(nodes, 0.5, 0, "pack") == 16 + 6 + 3
    assert workers_that_fit(nodes, 1, 1, "pack") == 1 + 0 + 1  # a GPU each: the middle node holds none
    assert workers_that_fit(nodes, 1, 0, "strict_spread") == 3  # one per node
    assert workers_that_fit([], 1, 0, "pack") == 0


def test_a_worker_group_the_cluster_cannot_hold_fails_before_any_work_where_the_cluster_cannot_grow(
    monkeypatch, capsys
):
    """Ray Train waited for 4 workers on a 2-CPU local stack without end, a traceback a minute, and Ctrl+C did
    not stop it. Where no node will join (the local stack) that is an error; elsewhere the run waits, said so."""
    from shards.nodes import FIXED_ENV
    from training.capacity import check_capacity

    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 64.0}}]
    recipe = load_recipe("demo_tiles", ["workers=4"])
    monkeypatch.setenv(FIXED_ENV, "1")
    with pytest.raises(RecipeError) as raised:
        check_capacity(recipe, False, nodes)
    assert str(raised.value) == (
        "workers: the run asks for 4 workers of 1 CPU each, and the cluster's 1 node(s) (2 CPU) hold 2 at most; "
        "Ray Train would wait for them without end: set workers= (or cpus_per_worker=) to fit, or run it on a "
        "larger cluster"
    )
    check_capacity(load_recipe("demo_tiles", ["workers=4", "cpus_per_worker=0.5"]), False, nodes)  # fits
    with pytest.raises(RecipeError, match=r"4 workers of 1 CPU and 1 GPU each, .* \(2 CPU 0 GPU\) hold 0 at most"):
        check_capacity(recipe, True, nodes)
    monkeypatch.delenv(FIXED_ENV)
    check_capacity(recipe, False, nodes)  # an autoscaling cluster may add nodes: the run waits
    assert capsys.readouterr().out == (
        "workers: the run asks for 4 workers of 1 CPU each, and the cluster's 1 node(s) (2 CPU) hold 2 at most: "
        "the run waits until nodes join (an autoscaling cluster adds them)\n"
    )


def test_a_run_whose_workers_the_cluster_holds_but_not_now_says_so():
    """Another run or an ingest holds the CPUs: Ray Train waits, and before said so only after a minute, with a
    traceback, and again each minute (`training.console.RAY_STARTUP_TIMEOUT`)."""
    from training.capacity import room_now_problem

    recipe = load_recipe("demo_tiles", ["workers=2", "cpus_per_worker=1"])
    assert room_now_problem(recipe, False, {"CPU": 2.0}) is None
    assert room_now_problem(recipe, False, {"CPU": 1.0}) == (
        "workers: the cluster holds the run's 2 workers, but not now: it has 1 of the 2 CPUs they need free; other "
        "work holds the rest (`tessera status` shows what), and the run waits for it"
    )
    both = room_now_problem(recipe, True, {"CPU": 0.5, "GPU": 1.0})
    assert "it has 0.5 of the 2 CPUs they need and 1 of the 2 GPUs they need free" in both
    assert room_now_problem(recipe, True, {"CPU": 4.0, "GPU": 2.0}) is None


def test_a_validation_sites_metrics_and_the_worst_sites_may_be_monitored_and_a_missing_site_is_named():
    recipe = load_recipe("strip_ai_resnet50", ["eval.monitor=val_worst_site_patient_weighted_log_loss"])
    names = validation_metrics(recipe, ["CE", "LAA"], ["1", "3"])
    assert {"val_site_1_accuracy", "val_site_3_patient_auc", "val_worst_site_slide_f1"} <= names
    assert not any(n.endswith(("_samples", "_count")) for n in names)
    check_monitor(recipe, ["CE", "LAA"], ["1", "3"])
    with pytest.raises(RecipeError, match=r"reports \(.*2 outputs\); close: val_patient_weighted_log_loss"):
        check_monitor(recipe, ["CE", "LAA"], ["1"])  # one site: its metrics are the split's own
    missing = load_recipe("strip_ai_resnet50", ["eval.monitor=val_site_2_patient_accuracy", "eval.mode=max"])
    with pytest.raises(RecipeError, match=r"validation sites 1, 3\); close: val_site_3_patient_accuracy, val_site_1_"):
        check_monitor(missing, ["CE", "LAA"], ["1", "3"])


def test_reported_metrics_take_the_validation_sites_per_epoch_and_the_held_out_sites_once(tmp_path):
    import dataclasses

    from tests.datasets import make_dataset
    from training.preflight import reported_metrics

    ds = make_dataset(str(tmp_path / "ds"), {"train": 4, "val": 8, "test": 8}, sites=2)  # two patients each
    # the held-out centres are others than validation's
    ds.inputs = [dataclasses.replace(r, site=f"{r.site}0") if r.split == "test" else r for r in ds.inputs]
    recipe = load_recipe("demo_tiles", [f"data.dataset={tmp_path / 'ds'}", "eval.levels=[patient]", "swa.enabled=true"])
    names = reported_metrics(recipe, ds)
    assert {"val_site_2_patient_accuracy", "val_swa_site_1_auc", "val_swa_worst_site_accuracy"} <= names
    assert {"test_site_20_samples", "test_site_10_patient_count", "test_worst_site_patient_accuracy"} <= names
    assert not {"val_site_1_samples", "val_site_10_accuracy", "test_site_1_accuracy"} & names
    # the held-out sites' intervals, not the epochs'
    assert {"test_site_20_patient_auc_ci_low", "test_site_10_brier_loss_ci_high"} <= names
    assert not {n for n in names if n.startswith(("val_site", "val_swa_site")) and n.endswith("_ci_low")}
    drawn_none = load_recipe("demo_tiles", [f"data.dataset={tmp_path / 'ds'}", "eval.bootstrap=0"])
    assert not {n for n in reported_metrics(drawn_none, ds) if "site" in n and n.endswith("_ci_low")}
