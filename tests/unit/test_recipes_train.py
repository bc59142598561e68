"""Every bundled recipe builds its model and runs two optimiser steps and an evaluation through the real loop:
DALI over real shards, a DeepSpeed engine (one gloo rank, no Ray), the recipe's loss, schedule, SWA and
metrics. Inputs and data are shrunk; the recipe files keep the papers' values."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist

from tests.datasets import make_dataset
from training.config import RECIPES, load_recipe
from training.loop import Trainer, checkpoint_weights

ALL = sorted(p.stem for p in RECIPES.glob("*.yaml"))
SMALL = {"strip_ai_inception_v3": 96}
OPTIONS = {"strip_ai_swinv2_tiny": ["model.options={img_size: 64}"]}


@pytest.fixture(scope="module")
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    )
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _dataset(recipe, prefix):
    classes = 4 if recipe.name == "brain_tumor_mri" else 2
    return make_dataset(
        prefix,
        {"train": 8, "val": 6},
        classes=classes,
        size=40,
        frames=4 if recipe.data.frames else 0,
        # RSNA datasets carry 6-way vectors; the binary recipe must still read the `.cls` (any) label.
        multilabel=recipe.name.startswith("rsna_ich"),
    )


@pytest.mark.parametrize("name", ALL)
def test_recipe_trains_two_steps_and_evaluates(name, tmp_path, process_group):
    base = load_recipe(name)
    size = SMALL.get(name, 32 if base.data.frames else 64)
    overrides = [
        f"data.dataset={tmp_path / 'ds'}",
        f"data.image_size={size}",
        "data.epoch_samples=4",
        "batch_size=2",
        "epochs=1",
        "workers=1",
        "model.pretrained=false",
        *(["data.frames=4"] if base.data.frames else []),
        *OPTIONS.get(name, []),
    ]
    recipe = load_recipe(name, overrides)
    _dataset(recipe, str(tmp_path / "ds"))
    reports = []
    trainer = Trainer({"recipe": recipe.model_dump()}, rank=0, world=1)
    before = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
    trainer.run(lambda metrics, folder: reports.append((metrics, checkpoint_weights(folder))), mlflow=False)
    assert trainer.engine.global_steps == 2
    ((metrics, weights),) = reports
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
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
