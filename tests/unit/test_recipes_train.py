"""Every bundled recipe builds its model and runs two optimiser steps and an evaluation through the real loop:
DALI over real shards, a DeepSpeed engine (one gloo rank, no Ray), the recipe's loss, schedule, SWA and
metrics. Inputs and data are shrunk; the recipe files keep the papers' values."""

import csv
import math
import multiprocessing as mp
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.datasets import OPTIONS, SMALL, make_dataset, recipe_dataset, small_recipe
from training.config import RECIPES, load_recipe
from training.engine import checkpoint_weights
from training.local_group import free_port, join_group
from training.loop import Trainer

ALL = sorted(p.stem for p in RECIPES.glob("*.yaml"))
CLASSIFIERS = [name for name in ALL if load_recipe(name).task != "detect"]  # detectors: tests/unit/test_detection.py


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_recipe_trains_two_steps_and_evaluates(name, tmp_path, process_group):
    recipe = small_recipe(name, tmp_path)
    reports = []
    trainer = Trainer({"recipe": recipe.model_dump()}, rank=0, world=1)
    before = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
    trainer.run(lambda metrics, folder: reports.append((metrics, checkpoint_weights(folder))), mlflow=False)
    assert trainer.engine.global_steps == 2
    ((metrics, weights),) = reports
    assert metrics["done"] is True  # the last epoch's report: a sweep's scheduler ends the trial on it
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
    # the epoch's 4 samples (2 steps of 2) over the time they took
    assert metrics["train_seconds"] > 0 and metrics["train_samples_per_s"] == pytest.approx(
        4 / metrics["train_seconds"]
    )
    key = "val_rsna_log_loss" if recipe.task == "multilabel" else "val_weighted_log_loss"
    assert math.isfinite(metrics[key])
    for level in recipe.eval.levels:
        assert any(k.startswith(f"val_{level}_") for k in metrics), level
    if recipe.swa.enabled:
        assert math.isfinite(metrics["val_swa_loss"])
    changed = [k for k, v in weights.items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "two optimiser steps changed no weight"
    if recipe.model.freeze == "backbone":
        trainable = {n for n, p in trainer.engine.module.named_parameters() if p.requires_grad}
        assert all(k in trainable or "running" in k or "num_batches" in k for k in changed)


def test_a_run_reads_through_lanes_when_its_loader_threads_are_split(tmp_path, process_group):
    """Two pipelines per split: the training steps, the validation pass, and SWA's pass over the train split for
    its batch-norm statistics all take their batches in turn from both."""
    recipe = small_recipe("strip_ai_resnet50", tmp_path, "data.loader_threads=2", "data.loader_lanes=2")
    assert recipe.swa.enabled
    reports = []
    trainer = Trainer({"recipe": recipe.model_dump()}, rank=0, world=1)
    assert trainer.data.lanes(6, None) == trainer.data.lanes(8, 2) == 2  # validation (6), training (2 steps)
    trainer.run(lambda metrics, folder: reports.append(metrics), mlflow=False)
    (metrics,) = reports
    assert trainer.engine.global_steps == 2
    assert all(math.isfinite(metrics[k]) for k in ("train_loss", "val_loss", "val_swa_loss"))


@pytest.mark.parametrize("name", ["rsna_ich_binary", "ct_ich_convnext_anypos"])
def test_slice_recipes_evaluate_series_whose_slices_are_labelled_one_by_one(name, tmp_path, process_group):
    """Their datasets label each slice: a series or patient mixes negative and positive samples, and is positive
    when any is (the evaluation once failed on the first such group)."""
    from tests.datasets import make_dataset

    recipe = small_recipe(name, tmp_path)
    manifest = make_dataset(
        recipe.data.dataset, {"train": 8, "val": 8}, size=40, multilabel=name.startswith("rsna"), per_sample_labels=True
    )
    assert any(r.label == 1 for r in manifest.inputs if r.split == "val")
    reports = []
    Trainer({"recipe": recipe.model_dump()}, rank=0, world=1).run(lambda m, _: reports.append(m), mlflow=False)
    (metrics,) = reports
    for level in recipe.eval.levels:
        assert 0 <= metrics[f"val_{level}_accuracy"] <= 1, level


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_recipes_model_exports_and_reloads_with_the_same_outputs(name, tmp_path, capfd):
    """A run exports its model (safetensors, TorchScript, description) at every improved epoch: each recipe's
    architecture must trace, and both reloads must compute what the model does."""
    from training.export import load_export, save_export
    from training.models import build_model

    base = load_recipe(name)
    size = SMALL.get(name, 32 if base.data.frames else 64)
    frames = ["data.frames=4"] if base.data.frames else []
    recipe = load_recipe(name, [f"data.image_size={size}", "model.pretrained=false", *frames, *OPTIONS.get(name, [])])
    outputs = [f"o{i}" for i in range(len(recipe.model.heads) if recipe.model.heads else 3)]
    torch.manual_seed(0)
    model = build_model(recipe.model, len(outputs), recipe.data.frames, size).eval()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        folder = save_export(model, tmp_path / "model", recipe.model, outputs, size, recipe.data.frames)
    # neither tracing's chatter nor a trace that differs from the model
    assert not [w for w in seen if issubclass(w.category, torch.jit.TracerWarning | FutureWarning | RuntimeWarning)]
    assert "loss_type" not in capfd.readouterr().err  # transformers' note on a loss a classifier never uses
    x = torch.rand((2, recipe.data.frames, 3, size, size) if recipe.data.frames else (2, 3, size, size))
    reloaded, desc = load_export(folder)
    traced = torch.jit.load(str(folder / "model.ts"))
    with torch.no_grad():
        want = model(x)
        assert want.shape == (2, len(outputs)) and desc["outputs"] == outputs
        torch.testing.assert_close(reloaded(x), want)
        torch.testing.assert_close(traced(x), want)


def test_an_export_whose_trace_took_one_branch_of_a_decision_on_the_data_says_so(tmp_path):
    from training.config import ModelConfig
    from training.export import save_export

    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :2] * (2 if x.sum() > 0 else -1)  # traced on zeros: always -1

    with pytest.warns(RuntimeWarning, match=r"model\.ts differs from the model by up to .* load model\.safetensors"):
        save_export(Branchy(), tmp_path / "m", ModelConfig(name="resnet18"), ["a", "b"], 8)


def test_a_zero_3_run_exports_its_gathered_weights_into_mlflow(mlflow_uri, tmp_path, process_group):
    """Under ZeRO-3 each rank holds a slice of every weight: rank 0 exports the gathered weights, in a model of
    its own (a copy of the engine's module took DeepSpeed's hooks into tracing, which failed on its weights)."""
    import deepspeed
    from mlflow import MlflowClient

    from training.export import load_export

    uri = mlflow_uri  # a real MLflow store, without a server
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("zero3", artifact_location=str(tmp_path / "artifacts")))
    small = ["data.epoch_samples=4", "batch_size=2", "epochs=1", "workers=1"]
    recipe = load_recipe("demo_tiles", [f"data.dataset={tmp_path / 'ds'}", *small, "deepspeed.zero_stage=3"])
    recipe_dataset(recipe, str(tmp_path / "ds"))
    trainer = Trainer({"recipe": recipe.model_dump(), "mlflow_uri": uri, "run_id": run.info.run_id}, rank=0, world=1)
    trainer.run(lambda metrics, folder: None)
    assert trainer.engine.zero_optimization_stage() == 3
    params = list(trainer.engine.module.parameters())
    assert any(p.numel() == 0 for p in params)  # partitioned: the module alone lacks weights (small ones persist)
    with deepspeed.zero.GatheredParameters(params):
        want = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
    model, desc = load_export(Path(run.info.artifact_uri.removeprefix("file://")) / "model")
    assert desc["model"] == "mobilenetv3_small_050"
    got = model.state_dict()
    assert got.keys() == want.keys()
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)


def test_the_validation_tables_are_the_selected_models_not_the_last_epochs(mlflow_uri, tmp_path, process_group):
    """Selected on ``epoch`` (min): the first epoch is the exported model, and the run's validation table is its
    predictions (their log loss is its val_loss), not the second epoch's."""
    from mlflow import MlflowClient
    from sklearn.metrics import log_loss

    uri = mlflow_uri
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("selected", artifact_location=str(tmp_path / "artifacts")))
    small = ["data.epoch_samples=4", "batch_size=2", "epochs=2", "workers=1", "eval.monitor=epoch", "eval.mode=min"]
    recipe = load_recipe("demo_tiles", [f"data.dataset={tmp_path / 'ds'}", *small])
    recipe_dataset(recipe, str(tmp_path / "ds"))
    trainer = Trainer({"recipe": recipe.model_dump(), "mlflow_uri": uri, "run_id": run.info.run_id}, rank=0, world=1)
    trainer.run(lambda metrics, folder: None)
    history = client.get_metric_history(run.info.run_id, "val_loss")
    first, second = (m.value for m in sorted(history, key=lambda m: m.step))
    assert first != pytest.approx(second, abs=1e-3)  # the two epochs' models call the split differently
    table = Path(client.download_artifacts(run.info.run_id, "predictions_sample.csv", str(tmp_path)))
    rows = list(csv.DictReader(table.read_text().splitlines()))
    labels = [int(r["label"].removeprefix("class")) for r in rows]
    probs = np.array([[float(r["p_class0"]), float(r["p_class1"])] for r in rows])
    probs /= probs.sum(axis=1, keepdims=True)  # written to 6 significant digits: a row sums to 1 within 1e-6
    assert len(rows) == 6 and log_loss(labels, probs, labels=[0, 1]) == pytest.approx(first, abs=1e-4)


def _small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )


def _plain_steps(model, recipe, batches, accumulation: int) -> None:
    """The reference: a plain PyTorch loop with the recipe's optimiser, ``accumulation`` micro-batches a step."""
    from training.engine import make_optimizer

    opt = make_optimizer(model.parameters(), recipe.optim)
    for i, (x, y) in enumerate(batches):
        (torch.nn.functional.cross_entropy(model(x), y) / accumulation).backward()
        if (i + 1) % accumulation == 0:
            clip = recipe.deepspeed.gradient_clipping
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_one_rank_runs_zero_2_as_stage_0_with_the_same_arithmetic(clip, tmp_path, process_group):
    """ZeRO-2 on a single rank partitions nothing; the engine runs stage 0 and gives the weights of a plain
    PyTorch loop and of a real ZeRO-2 engine over accumulated steps, clipping only as the recipe says (DeepSpeed
    alone would clip at 1.0). A run continuing a ZeRO-partitioned checkpoint keeps ZeRO."""
    from training.engine import TAG, init_engine, partition_ranks, zero_stage

    overrides = ["deepspeed.zero_stage=2", "deepspeed.gradient_accumulation=2", f"deepspeed.gradient_clipping={clip}"]
    recipe = load_recipe("strip_ai_resnet50", overrides)
    single, _ = init_engine(_small_model(), recipe, cuda=False)
    zero2, _ = init_engine(_small_model(), recipe, cuda=False, stage=2)
    plain = _small_model()
    assert (single.zero_optimization_stage(), zero2.zero_optimization_stage()) == (0, 2)
    assert single.gradient_clipping() == zero2.gradient_clipping() == clip
    assert not single.enable_backward_allreduce  # averaging over one rank is skipped, not computed
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(6)]
    for x, y in batches:  # three optimiser steps of two micro-batches each
        for engine in (single, zero2):
            engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
            engine.step()
    _plain_steps(plain, recipe, batches, 2)
    assert single.global_steps == zero2.global_steps == 3
    for name, a in single.module.state_dict().items():
        torch.testing.assert_close(a, zero2.module.state_dict()[name], msg=name)
        torch.testing.assert_close(a, plain.state_dict()[name], msg=name)
    initial = _small_model().state_dict()
    assert not all(torch.equal(a, initial[k]) for k, a in plain.state_dict().items())  # it did train
    if clip:  # the limit bites: without it the weights differ
        unclipped = _small_model()
        _plain_steps(unclipped, load_recipe("strip_ai_resnet50", overrides[:2]), batches, 2)
        assert not torch.allclose(unclipped[-1].weight, plain[-1].weight)

    single.save_checkpoint(tmp_path / "stage0", tag=TAG)
    zero2.save_checkpoint(tmp_path / "zero2", tag=TAG)
    stage0, zero2 = partition_ranks(tmp_path / "stage0"), partition_ranks(tmp_path / "zero2")
    assert stage0 == 0 and zero2 > 0
    assert zero_stage(recipe, 1, stage0) == 0
    assert zero_stage(recipe, 1, zero2) == 2  # resumes as it was written
    assert zero_stage(recipe, 2, stage0) == 0  # a one-worker run continued on two workers
    continued, _ = init_engine(_small_model(), recipe, cuda=False, stage=zero_stage(recipe, 2, stage0))
    continued.load_checkpoint(tmp_path / "stage0", tag=TAG)
    assert continued.global_steps == 3
    with pytest.raises(FileNotFoundError, match="zero_pp_rank"):  # what the recipe's stage would have done
        init_engine(_small_model(), recipe, cuda=False, stage=2)[0].load_checkpoint(tmp_path / "stage0", tag=TAG)
    assert zero_stage(recipe, 2) == 2
    assert zero_stage(load_recipe("strip_ai_resnet50", ["deepspeed.zero_stage=3", "swa.enabled=false"]), 1) == 3


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(n)]


def _step(engine, x, y) -> None:
    engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
    engine.step()


def _weights(engine) -> dict[str, torch.Tensor]:
    """The module's state; under ZeRO-3 its parameters gathered first."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {k: v.clone() for k, v in engine.module.state_dict().items()}


def _zero_rank(rank: int, port: int, folder: str, stage: int) -> None:
    """Rank ``rank`` of 2: three ZeRO steps, a checkpoint, one more step, whose weights rank 0 keeps. Every
    rank takes the same batches, so the averaged gradient is one batch's, as on one rank."""
    from training.engine import TAG, init_engine

    join_group("gloo", rank, 2, port)
    recipe = load_recipe("strip_ai_resnet50", [f"deepspeed.zero_stage={stage}", "swa.enabled=false"])
    engine, _ = init_engine(_small_model(), recipe, cuda=False)
    *first, last = _batches(4)
    for x, y in first:
        _step(engine, x, y)
    engine.save_checkpoint(f"{folder}/ckpt", tag=TAG)
    _step(engine, *last)
    weights = _weights(engine)  # every rank takes part in the gathering
    if rank == 0:
        torch.save(weights, f"{folder}/next.pt")
    dist.destroy_process_group()
    # Skip interpreter teardown: under ZeRO-3 a DeepSpeed thread is sometimes still joinable when the C++
    # runtime exits ("terminate called without an active exception", SIGABRT) after all of the above is done.
    os._exit(0)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_zero_checkpoint_of_two_ranks_continues_exactly_on_one(stage, tmp_path, process_group, monkeypatch):
    """``--resume RUN workers=N`` with ZeRO: the partitioned state is made universal, once for the workers of a
    node, and the next step on one rank gives exactly the weights (and BatchNorm statistics) the two ranks'
    next step gave."""
    import training.engine
    from training.engine import TAG, init_engine, load_universal, partition_ranks, universal_checkpoint, zero_stage

    ctx, port = mp.get_context("spawn"), free_port()
    ranks = [ctx.Process(target=_zero_rank, args=(r, port, str(tmp_path), stage)) for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(300)
    assert [p.exitcode for p in ranks] == [0, 0]
    assert partition_ranks(tmp_path / "ckpt") == 2  # two ranks' partitions
    recipe = load_recipe("strip_ai_resnet50", [f"deepspeed.zero_stage={stage}", "swa.enabled=false"])
    assert zero_stage(recipe, 1, partition_ranks(tmp_path / "ckpt")) == stage  # read by a ZeRO engine, on one rank too
    engine, _ = init_engine(_small_model(), recipe, cuda=False, stage=stage, universal=True)
    conversions, seen, both_inside = [], [], threading.Barrier(2, timeout=120)
    convert = training.engine.to_universal
    monkeypatch.setattr(training.engine, "to_universal", lambda *a: conversions.append(a) or convert(*a))

    def another_worker() -> None:  # of the same node, arriving at the same time
        with universal_checkpoint(tmp_path / "ckpt", TAG) as folder:
            seen.append(folder)
            both_inside.wait()
            both_inside.wait()  # leaves first: the folder stays for the reader still loading

    worker = threading.Thread(target=another_worker)
    worker.start()
    with universal_checkpoint(tmp_path / "ckpt", TAG) as folder:
        both_inside.wait()
        load_universal(engine, folder, TAG)
        both_inside.wait()
        worker.join()
        assert folder.is_dir() and not (folder / TAG / "tmp").exists()  # converted, its scratch folder gone
    assert len(conversions) == 1 and seen == [folder]
    assert not folder.exists() and not folder.with_name(f"{folder.name}.readers").exists()  # the last one out
    assert engine.global_steps == 3
    _step(engine, *_batches(4)[-1])
    want = torch.load(tmp_path / "next.pt", weights_only=True)
    for name, got in _weights(engine).items():
        assert got.numel() > 0
        torch.testing.assert_close(got, want[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "name", ["strip_ai_resnet50", "strip_ai_efficientnet_b3", "rsna_ich_subtypes", "ct_ich_sequence_vivit"]
)
def test_bf16_computes_under_autocast_and_keeps_fp32_weights_and_checkpoints(name, tmp_path, process_group):
    """bf16 (asked for, so that it runs on the CPU here; a GPU run takes it by default) is torch autocast.
    BatchNorm networks train under it: DeepSpeed's own bf16 mode casts their weights and not their running
    statistics, which PyTorch refuses. The weights, and so the checkpoints, stay fp32, as an fp32 run's."""
    from training.engine import TAG

    recipe = small_recipe(name, tmp_path, "deepspeed.bf16=true")
    trainer = Trainer({"recipe": recipe.model_dump()}, rank=0, world=1)
    assert trainer.engine.torch_autocast_enabled()
    reports = []
    trainer.run(
        lambda m, folder: reports.append((m, checkpoint_weights(folder), os.listdir(Path(folder) / TAG))),
        mlflow=False,
    )
    ((metrics, weights, files),) = reports
    assert trainer.engine.global_steps == 2
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}
    assert "mp_rank_00_model_states.pt" in files and not any(f.startswith("bf16_") for f in files)
    size = recipe.data.image_size
    x = torch.rand(2, *([recipe.data.frames] if recipe.data.frames else []), 3, size, size)
    trainer.engine.eval()
    with torch.no_grad():
        assert trainer.engine(x).dtype == torch.bfloat16  # the forward runs under autocast


def test_a_bf16_zero_checkpoint_is_read_as_zero(tmp_path, process_group):
    """Under bf16 a ZeRO-2 engine writes the files an fp32 one does, so a resumed run finds its partitions (those
    of DeepSpeed's bf16 mode are named ``bf16_zero_pp_rank_*``)."""
    from training.engine import TAG, deepspeed_config, init_engine, partition_ranks

    for bf16, cuda, want in [
        ("auto", True, True),
        ("auto", False, False),
        ("true", False, True),
        ("false", True, False),
    ]:
        config = deepspeed_config(load_recipe("strip_ai_resnet50", [f"deepspeed.bf16={bf16}"]), cuda, 2)
        assert config["torch_autocast"]["enabled"] is want and "bf16" not in config
    recipe = load_recipe("strip_ai_resnet50", ["deepspeed.zero_stage=2", "deepspeed.bf16=true", "swa.enabled=false"])
    engine, _ = init_engine(_small_model(), recipe, cuda=False, stage=2)
    for x, y in _batches(2):
        _step(engine, x, y)
    engine.save_checkpoint(tmp_path, tag=TAG)
    assert partition_ranks(tmp_path) == 1
    assert {p.dtype for p in engine.module.parameters()} == {torch.float32}


def test_the_held_out_step_runs_on_the_training_workers_and_a_failure_is_tagged_not_raised(
    mlflow_uri, tmp_path, process_group, monkeypatch
):
    """After training, the same workers evaluate the exported model on the test split into the run; a failing
    step (an injected fault) is tagged on the run and not raised, and a later success removes the tag; a
    dataset without the split plans no step."""
    from mlflow import MlflowClient

    import training.export
    from training.evaluation import HELD_OUT_ERROR, held_out_outcome, held_out_plan, held_out_step

    uri = mlflow_uri
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("held-out", str(tmp_path / "artifacts"))).info.run_id
    make_dataset(str(tmp_path / "ds"), {"train": 4, "val": 2, "test": 3}, samples_per_patient=1)
    small = ["data.epoch_samples=4", "batch_size=2", "epochs=1", "workers=1"]
    recipe = load_recipe("demo_tiles", [f"data.dataset={tmp_path / 'ds'}", *small])
    plan = held_out_plan(recipe)
    assert plan is not None and (plan["split"], plan["prefix"]) == ("test", "test_")
    trainer = Trainer({"recipe": recipe.model_dump(), "mlflow_uri": uri, "run_id": run_id, "held_out": plan}, 0, 1)
    trainer.run(lambda metrics, folder: None)
    held_out_step(trainer)
    logged = client.get_run(run_id).data.metrics
    assert {"test_loss", "test_accuracy", "test_patient_accuracy"} <= set(logged)
    table = client.download_artifacts(run_id, "test_predictions_sample.csv", str(tmp_path))
    assert len(Path(table).read_text().splitlines()) == 1 + 3  # a row per test sample
    outcome, error = held_out_outcome(uri, run_id, recipe, plan)
    assert error is None and outcome.metrics["test_accuracy"] == logged["test_accuracy"]
    assert client.get_run(run_id).data.tags["test_manifest_sha256"] == plan["sha256"]

    def fault(*args, **kwargs):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(training.export, "load_export", fault)
    held_out_step(trainer)  # not raised
    assert client.get_run(run_id).data.tags[HELD_OUT_ERROR] == "RuntimeError: worker lost"
    assert held_out_outcome(uri, run_id, recipe, plan) == (None, "RuntimeError: worker lost")
    monkeypatch.undo()
    held_out_step(trainer)
    assert HELD_OUT_ERROR not in client.get_run(run_id).data.tags

    make_dataset(str(tmp_path / "no-test"), {"train": 2, "val": 2})
    assert held_out_plan(recipe.model_copy(update={"data": recipe.data.model_copy(
        update={"dataset": str(tmp_path / "no-test")})})) is None  # fmt: skip
    assert held_out_plan(load_recipe("demo_tiles", [f"data.dataset={tmp_path / 'ds'}", "data.test_split=null"])) is None


def test_a_rank_that_fails_alone_makes_every_rank_raise():
    from training.collective import raise_any

    raise_any(None, [None, None])  # nobody failed
    with pytest.raises(RuntimeError, match=r"^rank 1 failed: OSError: shard gone$"):
        raise_any(None, [None, "OSError: shard gone"])
    own = OSError("shard gone")
    with pytest.raises(OSError) as caught:
        raise_any(own, [None, "OSError: shard gone"])
    assert caught.value is own  # the failing rank raises its own exception, traceback and all


def _predict_rank(rank: int, port: int, share: bool, q) -> None:
    """One of two gloo ranks predicting; rank 1's data fails after its first batch (a shard gone)."""
    from training.loop import predict
    from training.losses import Loss

    join_group("gloo", rank, 2, port, timeout_s=20)

    def batches():
        for i in range(3):
            if rank == 1 and i == 1:
                raise OSError("shard gone")
            yield torch.ones(2, 4), torch.tensor([0, 1]), [{}, {}]

    try:
        predict(torch.nn.Linear(4, 2), batches(), Loss(False), torch.device("cpu"), share_errors=share)
        q.put((rank, "returned"))
    except Exception as exc:
        q.put((rank, f"{type(exc).__name__}: {exc}"))
    q.close()
    q.join_thread()  # sent before the hard exit below
    os._exit(0)  # no teardown of a process group a peer may have left


@pytest.mark.parametrize("share", [True, False])
def test_a_rank_whose_data_fails_makes_every_rank_raise_when_errors_are_shared(share):
    """Evaluation (a plain model, ``share_errors``): rank 0 raises with rank 1's reason instead of waiting in
    the gather. Without sharing (a ZeRO-3 engine gathers parameters in its forward pass), rank 1 raises alone
    and rank 0 waits, knowing nothing of why, until the group ends (Ray Train's doing; here, rank 1's exit)."""
    ctx, port = mp.get_context("spawn"), free_port()
    q = ctx.Queue()
    ranks = [ctx.Process(target=_predict_rank, args=(r, port, share, q)) for r in range(2)]
    for p in ranks:
        p.start()
    said = dict(q.get(timeout=90) for _ in ranks)
    for p in ranks:
        p.join(60)
    assert said[1] == "OSError: shard gone"
    if share:
        assert said[0] == "RuntimeError: rank 1 failed: OSError: shard gone"
    else:
        assert said[0] != "returned" and "shard gone" not in said[0]  # a broken gather


def test_a_restored_early_stopped_run_trains_no_more(tmp_path, process_group):
    """A worker lost after an early stop (in the held-out step) restores the last checkpoint: the run is
    finished, not continued with the epochs early stopping skipped; an ordinary checkpoint continues."""
    import shutil

    never = ["early_stopping.enabled=true", "early_stopping.patience=1", "early_stopping.min_delta=1e9"]
    small = ["data.epoch_samples=4", "batch_size=2", "epochs=4", "workers=1", *never]
    recipe = load_recipe("demo_tiles", [f"data.dataset={tmp_path / 'ds'}", *small])
    recipe_dataset(recipe, str(tmp_path / "ds"))
    saved, done = [], []

    def keep(metrics, folder):
        saved.append(shutil.copytree(folder, tmp_path / f"epoch{metrics['epoch']}"))
        done.append(metrics["done"])

    Trainer({"recipe": recipe.model_dump()}, 0, 1).run(keep, mlflow=False)
    assert len(saved) == 2  # epoch 1 never beats epoch 0 by 1e9: stopped
    assert done == [False, True]  # the early stop is the run's last report
    assert Trainer({"recipe": recipe.model_dump()}, 0, 1, str(saved[0])).start == 1
    assert Trainer({"recipe": recipe.model_dump()}, 0, 1, str(saved[1])).start == recipe.epochs


def test_a_worker_refuses_a_dataset_other_than_the_version_its_run_recorded(tmp_path, process_group):
    """Each worker, a restarted one too, checks the dataset version the run recorded before building anything:
    one made again, or grown since (another version of its data: other samples per epoch), is refused."""
    from shards import manifest as mf

    recipe = small_recipe("strip_ai_resnet50", tmp_path)
    url = recipe.data.dataset
    first, data = mf.load_with_bytes(url)
    config = {"recipe": recipe.model_dump(), "run_id": "r1", "manifest_sha256": mf.sha256_of(data)}
    head = Trainer(config, 0, 1).manifest  # its own version, read without its input records
    assert head == mf.ManifestHead(**first.model_dump(exclude={"inputs"}))
    grown = first.model_copy(update={"amended": [mf.Amendment(time="t", added=1, previous_sha256=mf.sha256_of(data))]})
    for manifest, says in ((grown, "was amended"), (first.model_copy(update={"created": "later"}), "was made again")):
        mf.save(manifest, url)
        with pytest.raises(ValueError, match=f"{url} {says}.* since run r1 started"):
            Trainer(config, 0, 1)


def _batchnorm_rank(rank: int, port: int, q) -> None:
    """One of two gloo ranks: a BatchNorm layer that has seen this rank's own batch; its statistics after
    :func:`~training.engine.same_batchnorm_stats`."""
    from training.engine import same_batchnorm_stats

    join_group("gloo", rank, 2, port)
    bn = torch.nn.BatchNorm1d(2)
    bn(torch.tensor([[1.0, 10.0], [3.0, 30.0]]) * (rank + 1))  # rank 0: means 2, 20; rank 1: 4, 40
    same_batchnorm_stats(bn, 2)
    q.put((rank, bn.running_mean.tolist(), bn.running_var.tolist()))
    q.close()
    q.join_thread()
    os._exit(0)


def test_the_ranks_hold_one_set_of_batchnorm_statistics():
    """DeepSpeed leaves each rank's BatchNorm statistics to its own batches; after a training pass they are
    averaged, so every rank validates, checkpoints and exports the same model."""
    ctx, port = mp.get_context("spawn"), free_port()
    q = ctx.Queue()
    ranks = [ctx.Process(target=_batchnorm_rank, args=(r, port, q)) for r in range(2)]
    for p in ranks:
        p.start()
    got = {rank: (mean, var) for rank, mean, var in (q.get(timeout=90) for _ in ranks)}
    for p in ranks:
        p.join(60)
    # momentum 0.1 from mean 0, var 1: rank 0 saw means (2, 20), variances (2, 200); rank 1 (4, 40), (8, 800)
    mean, var = [0.1 * 3, 0.1 * 30], [0.9 + 0.1 * 5, 0.9 + 0.1 * 500]
    assert got[0] == got[1]
    assert got[0][0] == pytest.approx(mean) and got[0][1] == pytest.approx(var)


def test_zero_with_the_papers_sgd_draws_no_untested_optimizer_warning(process_group, monkeypatch):
    """DeepSpeed warned "You are using ZeRO with an untested optimizer" on every worker of every SGD (paper 003)
    and RMSprop run; the worker's console setup leaves it out, and keeps DeepSpeed's other warnings."""
    import logging

    from deepspeed.utils.logging import logger

    from training.console import not_routine, quiet_worker
    from training.engine import init_engine

    class Recorder(logging.Handler):  # what passes the logger's filters; its own handlers write where they may
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    said: list[str] = []
    recorder = Recorder()
    monkeypatch.delenv("TESSERA_DEBUG", raising=False)
    recipe = load_recipe("rsna_ich_binary", ["deepspeed.zero_stage=2"])
    assert recipe.optim.name == "sgd"
    quiet_worker()
    logger.addHandler(recorder)
    try:
        init_engine(_small_model(), recipe, cuda=False, stage=2)
        logger.warning("another DeepSpeed warning")
    finally:
        logger.removeHandler(recorder)
        logger.removeFilter(not_routine)
    assert not [m for m in said if "untested optimizer" in m]
    assert "another DeepSpeed warning" in said
