"""The per-worker training loop Ray Train runs: a plain function of its config dict.

Every rank trains on its part of the shards through DALI, evaluates its part, and saves its DeepSpeed
checkpoint files (with ZeRO each rank holds part of the optimiser state); rank 0 gathers predictions,
computes metrics and writes to MLflow.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from shards import manifest as mf
from shards.dali import Augment, ShardBatches, build_pipeline, fetch_indices
from training.aggregate import aggregate
from training.config import TrainRecipe
from training.engine import init_engine
from training.metrics import classification_metrics, confusion
from training.models import build_model

STATE_FILE = "tessera_state.json"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _loaders(recipe: TrainRecipe, manifest: mf.Manifest, rank: int, world: int, cuda: bool):
    d = recipe.data
    out = {}
    for split, train in ((d.train_split, True), (d.val_split, False)):
        if split not in manifest.splits:
            raise ValueError(f"{d.dataset}: the manifest has no {split!r} split (has {sorted(manifest.splits)})")
        urls = manifest.shard_urls(d.dataset, split)
        total = manifest.splits[split].num_samples
        with tempfile.TemporaryDirectory() as idx_dir:  # DALI reads the indices while it builds
            pipe = build_pipeline(
                urls,
                fetch_indices(urls, idx_dir),
                recipe.batch_size,
                d.image_size,
                train,
                rank,
                world,
                seed=recipe.seed + 1000 * rank,
                device_id=torch.cuda.current_device() if cuda else None,
                augment=Augment(d.hflip, d.vflip),
            )
        steps = max(1, total // (world * recipe.batch_size)) if train else None
        out[split] = ShardBatches(pipe, total, rank, world, train, steps)
    return out[d.train_split], out[d.val_split]


def _train_epoch(engine, batches: ShardBatches, device: torch.device) -> dict[str, float]:
    engine.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y, _ in batches:
        xb = torch.as_tensor(x, device=device)
        yb = torch.as_tensor(y, device=device)
        logits = engine(xb.to(next(engine.parameters()).dtype))
        loss = torch.nn.functional.cross_entropy(logits.float(), yb)
        engine.backward(loss)
        engine.step()
        loss_sum += float(loss) * len(y)
        correct += int((logits.argmax(1) == yb).sum())
        seen += len(y)
    totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64)
    dist.all_reduce(totals)
    return {"train_loss": float(totals[0] / totals[2]), "train_accuracy": float(totals[1] / totals[2])}


@torch.no_grad()
def _predict(engine, batches: ShardBatches, device: torch.device) -> dict[str, Any]:
    """This rank's probabilities, labels and metadata, gathered on every rank."""
    engine.eval()
    probs, labels, metas = [], [], []
    for x, y, m in batches:
        if len(y) == 0:
            continue
        logits = engine(torch.as_tensor(x, device=device).to(next(engine.parameters()).dtype))
        probs.append(torch.softmax(logits.float(), 1).cpu().numpy())
        labels.append(y)
        metas.extend(m)
    mine = {"probs": probs, "labels": labels, "metas": metas}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    out_p = [p for g in gathered for p in g["probs"]]
    out_y = [y for g in gathered for y in g["labels"]]
    return {
        "probs": np.concatenate(out_p) if out_p else np.zeros((0, 1)),
        "labels": np.concatenate(out_y) if out_y else np.zeros(0, np.int64),
        "metas": [m for g in gathered for m in g["metas"]],
    }


def evaluate(pred: dict[str, Any], levels: list[str], prefix: str = "val_") -> dict[str, float]:
    """Tile-level metrics plus the same metrics after mean aggregation to each of ``levels``."""
    out = classification_metrics(pred["labels"], pred["probs"], prefix)
    for level, gp, gy in _by_level(pred, levels):
        out.update(classification_metrics(gy, gp, f"{prefix}{level}_"))
    return out


def _by_level(pred: dict[str, Any], levels: list[str]):
    """``(level, probs[G, C], labels[G])`` by mean aggregation, for each level every sample's metadata names."""
    for level in levels:
        groups = [m.get(level) for m in pred["metas"]]
        if all(g is not None for g in groups):
            _, gp, gy = aggregate(pred["probs"], pred["labels"], groups, "mean")
            yield level, gp, gy


def _restore(engine, checkpoint) -> int:
    """Load the DeepSpeed state of a Ray Train checkpoint; returns the epoch to start from."""
    with checkpoint.as_directory() as d:
        state = json.loads((Path(d) / STATE_FILE).read_text())
        engine.load_checkpoint(d, tag="ds")
    return int(state["epoch"]) + 1


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``recipe`` (dict), ``mlflow_uri``, ``run_id``."""
    import ray.train

    from training.tracking import RunLogger

    recipe = TrainRecipe.model_validate(config["recipe"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _seed_everything(recipe.seed + rank)
    cuda = torch.cuda.is_available() and recipe.use_gpu is not False
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    manifest = mf.load(recipe.data.dataset)
    model = build_model(
        recipe.model.name,
        len(manifest.classes),
        recipe.model.pretrained,
        recipe.model.weights,
        recipe.model.drop_rate,
    )
    engine = init_engine(model.to(device), recipe, cuda)
    checkpoint = ray.train.get_checkpoint()
    start = _restore(engine, checkpoint) if checkpoint else 0
    train_batches, val_batches = _loaders(recipe, manifest, rank, world, cuda)
    logger = RunLogger(config["mlflow_uri"], config["run_id"]) if rank == 0 else None
    for epoch in range(start, recipe.epochs):
        metrics = _train_epoch(engine, train_batches, device)
        pred = _predict(engine, val_batches, device)
        metrics |= evaluate(pred, recipe.aggregate)
        metrics["epoch"] = epoch
        if logger:
            logger.metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
            if epoch == recipe.epochs - 1:
                _final_artifacts(logger, pred, manifest.classes, recipe)
        if epoch == recipe.epochs - 1:
            _export(engine, recipe, manifest.classes, logger)
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag="ds")
            if rank == 0:
                (Path(tmp) / STATE_FILE).write_text(json.dumps({"epoch": epoch}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _export(engine, recipe: TrainRecipe, classes: list[str], logger) -> None:
    """Export the final weights (all ranks take part: under ZeRO-3 the parameters are gathered first)."""
    import contextlib
    import copy

    from training.export import save_export

    gather = contextlib.nullcontext()
    if recipe.deepspeed.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    with gather:
        if logger is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_export(
                copy.deepcopy(engine.module), Path(tmp) / "model", recipe.model.name, classes, recipe.data.image_size
            )
            logger.artifacts(folder, "model")


def _final_artifacts(logger, pred: dict[str, Any], classes: list[str], recipe: TrainRecipe) -> None:
    from training.plots import confusion_png

    with tempfile.TemporaryDirectory() as tmp:
        cm = confusion(pred["labels"], pred["probs"])
        logger.artifact(confusion_png(cm, classes, Path(tmp) / "confusion_tile.png", "validation, tile level"))
        for level, gp, gy in _by_level(pred, recipe.aggregate):
            path = Path(tmp) / f"confusion_{level}.png"
            logger.artifact(confusion_png(confusion(gy, gp), classes, path, f"validation, {level} level"))
        os.sync()
