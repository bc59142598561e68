"""What only a GPU runs: bf16 under autocast, the NCCL all-reduce, DALI's mixed decoding and GPU augmentation
handing CUDA tensors to the model. Skipped without CUDA; ``make gpu`` runs them where there is one.

The first 21 ran on 2026-12-04, on a lent H200 (README, "Tests"). The last three run a whole epoch and the held-out
step as a GPU worker does, then predict's step; a Ray Train run that finds the GPU; and (not yet run on a GPU) two
workers on the one GPU, which run as a CPU group.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.config import RECIPES, load_recipe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def cuda():
    """Device 0 and a one-rank NCCL process group, as a GPU run's Ray Train worker has."""
    from training.local_group import one_rank_group

    torch.cuda.set_device(0)
    with one_rank_group("nccl"):
        yield torch.device("cuda", 0)


def _batchnorm_model() -> torch.nn.Module:
    """A small timm ResNet: BatchNorm layers, as most recipes' networks have."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=2)


def test_a_batchnorm_network_trains_in_bf16_and_the_epoch_sums_reduce_over_nccl(cuda):
    from training.engine import init_engine
    from training.loop import train_epoch
    from training.losses import Loss

    recipe = load_recipe("strip_ai_resnet50", ["swa.enabled=false"])  # bf16 `auto`: on, on a GPU
    engine, _ = init_engine(_batchnorm_model().to(cuda), recipe, cuda=True)
    assert engine.torch_autocast_enabled()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g).to(cuda), np.array([0, 1, 0, 1]), [{}] * 4) for _ in range(3)]
    out = train_epoch(engine, batches, Loss(False), cuda, epoch=0, rank=0)
    assert np.isfinite(out["train_loss"]) and 0 <= out["train_accuracy"] <= 1 and engine.global_steps == 3
    assert {p.dtype for p in engine.module.parameters()} == {torch.float32}
    with torch.no_grad():
        assert engine(batches[0][0]).dtype == torch.bfloat16


def _shard(tmp_path, n: int, frames: int = 0) -> tuple[list[str], list[str]]:
    import cv2

    from shards.dali import fetch_indices
    from shards.schema import encode_image, make_sample
    from shards.writer import ShardWriter

    rng = np.random.default_rng(0)
    with ShardWriter(str(tmp_path / "train")) as w:
        for i in range(n):
            # smooth: on per-pixel noise nvJPEG and libjpeg-turbo differ by 7 grey levels on average (README)
            noise = np.clip(rng.normal(150, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
            image = cv2.GaussianBlur(noise, (0, 0), 3)
            jpg = encode_image(image, "jpg", 90)
            w.write(make_sample(f"s{i}", [jpg] * frames if frames else jpg, "jpg", i % 2, {"patient": f"p{i}"}))
    urls = [str(tmp_path / "train" / s.name) for s in w.shards]
    return urls, fetch_indices(urls, str(tmp_path / "idx"))


@pytest.mark.parametrize("size", [32, 64])  # the stored 64 px images resized, or (64) passed as they are
def test_a_gpu_pipeline_hands_cuda_batches_that_match_the_cpu_pipeline(tmp_path, size):
    pytest.importorskip("nvidia.dali")
    from shards.dali import ShardBatches, build_pipeline

    urls, idx = _shard(tmp_path, 4)
    out = {}
    for device_id in (None, 0):
        pipe = build_pipeline(urls, idx, 4, size, False, device_id=device_id)
        ((out[device_id], labels, _),) = list(ShardBatches(pipe, 4, 0, 1, False, None))
    gpu, cpu = out[0], out[None]
    assert isinstance(gpu, torch.Tensor) and gpu.is_cuda and tuple(gpu.shape) == cpu.shape == (4, 3, size, size)
    # nvJPEG and libjpeg-turbo may round a few pixels differently: within about 3 grey levels on average
    assert np.abs(gpu.cpu().numpy() - cpu).mean() < 0.05 and list(labels) == [0, 1, 0, 1]


@pytest.mark.parametrize(
    ("recipe", "frames"), [("strip_ai_resnet50", 0), ("brain_tumor_mri", 0), ("strip_ai_resnet50", 3)]
)
def test_every_augmentation_runs_on_the_gpu(tmp_path, recipe, frames):
    """Paper 000's augmentations (sharpness's kernel is a CPU constant input to a GPU filter), paper 004's zoom,
    and a sequence whose frames move together, in a training pipeline on the GPU."""
    pytest.importorskip("nvidia.dali")
    from shards.dali import Augment, ShardBatches, build_pipeline

    aug = Augment(**load_recipe(recipe).data.augment.model_dump())
    urls, idx = _shard(tmp_path, 8, frames)
    pipe = build_pipeline(urls, idx, 4, 32, True, device_id=0, augment=aug, frames=frames)
    for x, labels, _ in ShardBatches(pipe, 8, 0, 1, True, steps=2):
        assert x.is_cuda and tuple(x.shape) == (4, *([frames] if frames else []), 3, 32, 32)
        assert torch.isfinite(x).all() and len(labels) == 4


EFFICIENTDET = ("model.name=tf_efficientdet_d0", "data.image_size=128")  # paper 004's third detector (effdet)


@pytest.mark.parametrize(
    ("name", "extra"), [*((p.stem, ()) for p in sorted(RECIPES.glob("*.yaml"))), ("brain_tumor_detect", EFFICIENTDET)]
)
def test_every_recipe_trains_and_evaluates_on_the_gpu_in_bf16(name, extra, tmp_path, cuda):
    """Each bundled recipe's network (paper 002's ViViT over slice sequences too; an EfficientDet as the detector
    too) under bf16 autocast, fed by the GPU pipeline with its recipe's augmentations: two optimiser steps and a
    validation pass, as ``tests/unit/test_recipes_train.py`` runs them on the CPU."""
    pytest.importorskip("nvidia.dali")
    from tests.datasets import small_recipe
    from training.loop import Trainer

    recipe = small_recipe(name, tmp_path, *extra)
    trainer = Trainer({"recipe": recipe.model_dump()}, rank=0, world=1)
    assert trainer.device == cuda and trainer.engine.torch_autocast_enabled()
    reports = []
    trainer.run(lambda metrics, folder: reports.append(metrics), mlflow=False)
    assert trainer.engine.global_steps == 2
    (metrics,) = reports
    if recipe.task == "detect":  # a detector reports no validation loss (torchvision's give losses in training)
        assert np.isfinite(metrics["train_loss"]) and 0 <= metrics["val_map50"] <= 1
        return
    key = "val_rsna_log_loss" if recipe.task == "multilabel" else "val_weighted_log_loss"
    assert np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["val_loss"]) and np.isfinite(metrics[key])


def test_a_run_trains_exports_evaluates_and_predicts_on_the_gpu(cuda, tmp_path):
    """The whole worker path on CUDA (one NCCL rank): DALI mixed decoding into a bf16 DeepSpeed epoch, rank 0's
    export, then the held-out step with its NCCL barrier and gathers, into a real (sqlite) MLflow run; then
    ``tessera predict``'s worker step, the exported model reloaded onto the GPU."""
    pytest.importorskip("nvidia.dali")
    from mlflow import MlflowClient

    from tests.datasets import make_dataset
    from training.evaluation import held_out_outcome, held_out_plan, held_out_step
    from training.loop import Trainer

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("gpu", str(tmp_path / "artifacts"))).info.run_id
    make_dataset(str(tmp_path / "ds"), {"train": 8, "val": 4, "test": 4}, size=64)
    small = ["data.epoch_samples=8", "batch_size=4", "epochs=1", "workers=1", "model.pretrained=false"]
    recipe = load_recipe("strip_ai_resnet50", [f"data.dataset={tmp_path / 'ds'}", "data.image_size=64", *small])
    plan = held_out_plan(recipe)
    trainer = Trainer({"recipe": recipe.model_dump(), "mlflow_uri": uri, "run_id": run_id, "held_out": plan}, 0, 1)
    assert trainer.device == cuda and trainer.engine.torch_autocast_enabled()
    reports = []
    trainer.run(lambda metrics, folder: reports.append(metrics))
    assert np.isfinite(reports[0]["train_loss"]) and np.isfinite(reports[0]["val_loss"])
    held_out_step(trainer)
    outcome, error = held_out_outcome(uri, run_id, recipe, plan)
    assert error is None, error
    assert 0 <= outcome.metrics["test_accuracy"] <= 1 and np.isfinite(outcome.metrics["test_loss"])
    assert client.get_run(run_id).data.tags["precision_used"] == "bf16"

    from shards import manifest as mf
    from training.inference import INDEX, PREDICTIONS, predict_split

    config = {"split": "test", "name": "gpu", "labelled": True, "group": "g1", "mlflow_uri": uri, "run_id": run_id}
    predict_split(recipe, mf.load(recipe.data.dataset), config, 0, 1)
    local = Path(client.download_artifacts(run_id, f"{PREDICTIONS}/gpu", str(tmp_path / "pred")))
    index = json.loads((local / INDEX).read_text())
    assert index["group"] == "g1" and index["samples"] == 4 and "sample" in index["levels"]
    rows = list(csv.DictReader((local / "predictions_sample.csv").open()))
    assert len(rows) == 4 and all(np.isclose(sum(float(r[k]) for k in r if k.startswith("p_")), 1) for r in rows)


def _ray_training(tmp_path: Path, workers: int):
    """A small ``strip_ai_resnet50`` run through ``run_training`` on a Ray of 4 CPUs and the one GPU; the outcome
    and its MLflow run."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("nvidia.dali")
    from mlflow import MlflowClient

    from tests.datasets import make_dataset
    from training.launch import run_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    make_dataset(str(tmp_path / "ds"), {"train": 8, "val": 4, "test": 4}, size=64)
    small = ["data.epoch_samples=8", "batch_size=4", "epochs=1", f"workers={workers}", "model.pretrained=false"]
    recipe = load_recipe("strip_ai_resnet50", [f"data.dataset={tmp_path / 'ds'}", "data.image_size=64", *small])
    # the run's experiment, its artifacts under tmp_path (a store that no server serves puts them in ./mlruns)
    MlflowClient(uri).create_experiment(recipe.experiment or recipe.name, str(tmp_path / "artifacts"))
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        out = run_training(recipe, uri, str(tmp_path / "runs"))
    finally:
        ray.shutdown()
    assert out.error is None and out.held_out_error is None, (out.error, out.held_out_error)
    assert np.isfinite(out.metrics["val_loss"]) and np.isfinite(out.held_out.metrics["test_loss"])
    run = MlflowClient(uri).get_run(out.run_id)
    assert run.info.status == "FINISHED"
    return out, run


def test_a_ray_train_run_trains_on_the_gpu_over_nccl(tmp_path):
    """``tessera train``'s path on a GPU node: Ray Train gives the worker the GPU (``use_gpu`` found on the
    cluster) and makes its NCCL group; the run trains in bf16, evaluates its held-out split and finishes (55 s on
    the H200)."""
    _, run = _ray_training(tmp_path, workers=1)
    assert run.data.tags["precision_used"] == "bf16"


def test_two_workers_on_one_gpu_train_as_a_cpu_group(tmp_path, capsys):
    """``use_gpu: auto`` with fewer GPUs than workers runs the group on CPUs, says so, and no worker takes the GPU
    itself: ``tessera demo``'s two workers on the H200 once failed there, DeepSpeed putting rank 1 on CUDA device 1
    ("invalid device ordinal"). Written after that session's device time was spent: not yet run on a GPU."""
    _, run = _ray_training(tmp_path, workers=2)
    assert run.data.tags["precision_used"] == "fp32" and run.data.tags["workers_used"] == "2"
    assert "the cluster has 1 GPU(s) for 2 workers, so they run on CPUs" in capsys.readouterr().out
