"""The per-worker training loop Ray Train runs: a plain function of its config dict.

Every rank trains on its part of the shards through DALI, evaluates its part, and saves its DeepSpeed
checkpoint files (with ZeRO each rank holds part of the optimiser state; Ray Train uploads every rank's files
into the same checkpoint). The checkpoint's client state carries what else a resumed run needs to continue
exactly where it stopped: epoch, LR scheduler, early stopping, SWA average. Rank 0 writes to MLflow. After the
last epoch the same workers evaluate the selected model on the held-out split (:mod:`training.evaluation`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from shards import manifest as mf
from shards import scratch
from shards.allocator import keep_freed_memory
from training import detection
from training.collective import raise_any, said
from training.config import TrainRecipe
from training.data import WorkerData, wait_for_store
from training.engine import (
    TAG,
    init_engine,
    load_universal,
    partition_ranks,
    same_batchnorm_stats,
    universal_checkpoint,
    zero_stage,
)
from training.evaluation import held_out_step
from training.levels import evaluate
from training.losses import Loss, balanced_weights
from training.metas import Metas
from training.models import recipe_model
from training.outbox import adopt
from training.outputs import outputs_of
from training.sites import by_site, site_metrics
from training.state import EarlyStopping, epoch_seed, swa_start_epoch
from training.tracking import MODEL_ARTIFACT


def make_loss(recipe: TrainRecipe, data: WorkerData, outputs: list[str]) -> Loss:
    cw = recipe.data.class_weights
    weights = None
    if cw == "balanced" and recipe.task == "multiclass":
        weights = balanced_weights(data.train_counts(len(outputs)))
    elif isinstance(cw, list):
        weights = cw
    return Loss(recipe.task == "multilabel", weights, len(outputs))


def _seed(recipe: TrainRecipe, epoch: int, rank: int) -> None:
    """Per-epoch seeds (dropout, anything random in torch), so a resumed epoch repeats exactly."""
    torch.manual_seed(epoch_seed(recipe.seed, epoch, rank))


def _inject_fault(fault: dict | None, epoch: int, step: int, rank: int) -> None:
    """Test hook: SIGKILL this worker once at ``fault``'s (epoch, step, rank) (only in a run not yet resumed).

    It waits a few seconds first: Ray Train registers a checkpoint only once its controller has polled every
    rank's report (every 0.5 s as Tessera sets it, or up to Ray's default 2 s), and a tiny test epoch can be
    shorter than that.
    """
    if fault and (fault["epoch"], fault["step"], fault["rank"]) == (epoch, step, rank):
        time.sleep(6)
        os.kill(os.getpid(), signal.SIGKILL)


def train_epoch(engine, batches, loss_fn: Loss, device, epoch: int, rank: int, fault=None) -> dict[str, float]:
    """One pass of optimiser micro-steps; mean loss and accuracy over all workers, and how fast they went."""
    engine.train()
    dtype = next(engine.parameters()).dtype
    loss_sum, correct, seen, began = 0.0, 0, 0, time.perf_counter()
    for step, (x, y, _) in enumerate(batches):
        _inject_fault(fault, epoch, step, rank)
        yb = torch.as_tensor(y, device=device)
        logits = engine(torch.as_tensor(x, device=device).to(dtype))
        loss = loss_fn(logits, yb)
        engine.backward(loss)
        engine.step()
        loss_sum += float(loss.detach()) * len(y)
        if not loss_fn.multilabel:
            correct += int((logits.argmax(1) == yb).sum())
        seen += len(y)
    # on the training device: NCCL, a GPU run's backend, reduces CUDA tensors only
    totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    seconds = time.perf_counter() - began  # to the all-reduce: until the slowest rank had finished
    out = {"train_loss": float(totals[0] / totals[2]), "train_seconds": seconds}
    out["train_samples_per_s"] = float(totals[2]) / seconds
    if not loss_fn.multilabel:
        out["train_accuracy"] = float(totals[1] / totals[2])
    return out


@torch.no_grad()
def predict(model, batches, loss_fn: Loss, device, share_errors: bool = False, labelled: bool = True) -> dict[str, Any]:
    """Probabilities, labels, metadata and mean loss of every worker's share, gathered on every rank (of samples
    without labels, not ``labelled``: no loss, NaN).

    ``share_errors``: a rank that fails still joins the gather, which then raises on every rank. Only for a
    model whose forward pass has no collectives: a ZeRO-3 engine's gathers parameters, and its ranks would wait
    on each other in different collectives; there a failing rank raises at once and Ray Train ends the group.
    """
    model.eval()
    dtype = next(model.parameters()).dtype
    probs, labels, metas, loss_sum, error = [], [], [], 0.0, None  # metas: a Metas per batch
    try:
        for x, y, m in batches:
            if len(y) == 0:
                continue
            logits = model(torch.as_tensor(x, device=device).to(dtype))
            if labelled:
                loss_sum += float(loss_fn(logits, torch.as_tensor(y, device=device), class_weighted=False)) * len(y)
            probs.append(loss_fn.probabilities(logits))
            labels.append(y)
            metas.append(Metas.of(m))
    except Exception as exc:
        if not share_errors:
            raise
        error = exc
    gathered: list[Any] = [None] * dist.get_world_size()
    mine = {"probs": probs, "labels": labels, "metas": Metas.concat(metas), "loss": loss_sum, "error": said(error)}
    dist.all_gather_object(gathered, mine)
    raise_any(error, [g["error"] for g in gathered])
    out_p = [p for g in gathered for p in g["probs"]]
    out_y = [y for g in gathered for y in g["labels"]]
    n = sum(len(y) for y in out_y)
    return {
        "probs": np.concatenate(out_p) if out_p else np.zeros((0, 1)),
        "labels": np.concatenate(out_y) if out_y else np.zeros(0, np.int64),
        "metas": Metas.concat(g["metas"] for g in gathered),
        "loss": sum(g["loss"] for g in gathered) / max(1, n) if labelled else float("nan"),
    }


def worker_device(recipe: TrainRecipe) -> torch.device:
    """This worker's GPU (the one Ray Train assigned it) unless ``use_gpu`` is false (in a Ray Train group, as
    :func:`training.launch.worker_group` decided it), else the CPU."""
    if torch.cuda.is_available() and recipe.use_gpu is not False:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Trainer:
    """One worker's run: engine, data, state; ``run()`` trains from wherever the checkpoint left off."""

    def __init__(
        self,
        config: dict[str, Any],
        rank: int,
        world: int,
        checkpoint_dir: str | None = None,
        weights_only: bool = False,
    ) -> None:
        self.config = config
        self.recipe = r = TrainRecipe.model_validate(config["recipe"])
        self.rank, self.world = rank, world
        self.device = worker_device(r)
        cuda = self.device.type == "cuda"
        if not cuda:
            keep_freed_memory()  # every step re-allocates the same activations: keep them mapped
        self.manifest, data = mf.load_head(r.data.dataset)
        who = f"run {config.get('run_id')}"
        mf.check_same_data(config.get("manifest_sha256"), r.data.dataset, self.manifest, data, who)
        self.outputs = outputs_of(r, self.manifest)
        _seed(r, -1, 0)  # the same initial head on every rank
        model = recipe_model(r, len(self.outputs)).to(self.device)
        # the ranks the checkpoint's ZeRO state is partitioned over (None: no state to continue); written by
        # another number of ranks (``--resume RUN workers=N``), it is read universally
        ranks = partition_ranks(checkpoint_dir) if checkpoint_dir and not weights_only else None
        stage = zero_stage(r, world, ranks)
        universal = ranks not in (None, 0, world)
        self.engine, self.scheduler = init_engine(model, r, cuda, stage, universal)
        self.data = WorkerData(r, self.manifest, self.rank, self.world, self.device.index)  # None on the CPU
        self.loss = make_loss(r, self.data, self.outputs)
        self.stopper = EarlyStopping(r.eval.mode, r.early_stopping.patience, r.early_stopping.min_delta)
        self.swa = torch.optim.swa_utils.AveragedModel(self.engine.module) if r.swa.enabled else None
        self.start = 0
        self.resumed = checkpoint_dir is not None
        # rank 0's MLflow writes that waited in the checkpoint for a server that was away (training.outbox)
        self.unsent = adopt(checkpoint_dir, config.get("run_id")) if rank == 0 and not weights_only else None
        if universal:
            print(f"rank {rank}: checkpoint of {ranks} ranks read on {world} (universal)", flush=True)
            with universal_checkpoint(checkpoint_dir, TAG) as converted:  # once per node
                self._restore(str(converted), universal=True)
        elif checkpoint_dir is not None:
            self._restore(checkpoint_dir, weights_only)

    def _restore(self, checkpoint_dir: str, weights_only: bool = False, universal: bool = False) -> None:
        """Continue from a checkpoint: the whole state (``universal``: converted from another number of ranks),
        or (``weights_only``, a PBT exploit of another trial's checkpoint) its weights and epoch count with this
        run's own, freshly built optimiser and schedule."""
        if weights_only:
            _, client = self.engine.load_checkpoint(checkpoint_dir, tag=TAG, load_module_only=True)
            self.start = int(client["epoch"]) + 1
            return
        if universal:
            client = load_universal(self.engine, checkpoint_dir, TAG)
        else:
            _, client = self.engine.load_checkpoint(checkpoint_dir, tag=TAG)
        # an early-stopped run is finished: restored (a worker lost in its held-out step), it trains no more
        self.start = self.recipe.epochs if client.get("stopped") else int(client["epoch"]) + 1
        self.stopper = EarlyStopping.from_state(client["early_stopping"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(client["scheduler"])
        if self.swa is not None and client.get("swa"):
            self.swa.load_state_dict(client["swa"])

    def _client_state(self, epoch: int, stopped: bool) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "stopped": stopped,
            "early_stopping": self.stopper.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "swa": self.swa.state_dict() if self.swa is not None else None,
        }

    def _step_schedule(self, metrics: dict[str, float]) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(metrics[self.recipe.eval.monitor])
        elif self.scheduler is not None:
            self.scheduler.step()

    def _monitor(self, metrics: dict[str, float]) -> float:
        key = self.recipe.eval.monitor
        if key not in metrics:
            raise ValueError(f"eval.monitor: {key!r} is not a reported metric (have {sorted(metrics)})")
        return metrics[key]

    def run(self, report_to: Callable[[dict[str, float], str], None], mlflow: bool = True) -> None:
        """Train the remaining epochs; after each, save this rank's checkpoint files into a folder and hand
        ``(metrics, folder)`` to ``report_to`` (Ray Train's report, or a test's recorder)."""
        from training.reporting import Reporter

        r = self.recipe
        report = Reporter(self, self.config) if self.rank == 0 and mlflow else None
        fault = None if self.resumed else self.config.get("fault")
        if self.resumed and report:
            report.epoch({"resumed_at_epoch": self.start}, self.start)
        swa_from = swa_start_epoch(r.swa.start, r.epochs)
        pred: dict[str, Any] = {}
        for epoch in range(self.start, r.epochs):
            _seed(r, epoch, self.rank)
            lr = self.engine.optimizer.param_groups[0]["lr"]
            metrics, pred = self._epoch(epoch, fault, swa_from)
            metrics |= {"lr": lr, "epoch": epoch}
            stop = self.stopper.update(self._monitor(metrics), epoch) and r.early_stopping.enabled
            improved = self.stopper.best_epoch == epoch
            self._step_schedule(metrics)
            last = stop or epoch == r.epochs - 1
            if last and self.swa is not None:
                pred, swa_metrics = self._finish_swa(epoch)
                metrics |= swa_metrics
            if report:
                report.epoch(metrics, epoch)
            if (improved and self.swa is None) or (last and self.swa is not None):  # the selected model
                self._export(report, MODEL_ARTIFACT, pred["metas"])
                if report:  # its validation pictures and tables, not the last epoch's where that is another
                    report.final(pred)
            with scratch.directory("checkpoint") as tmp:  # what a worker killed while saving leaves is swept
                self.engine.save_checkpoint(tmp, tag=TAG, client_state=self._client_state(epoch, stop))
                if report:
                    report.keep_with(tmp)
                # ``done``: Tune's key for a trial's last result, so that a sweep's scheduler ends the trial on it
                # instead of perturbing it (PBT handed a finished trial another's last epoch: nothing to train)
                report_to(metrics | {"done": last}, tmp)
            if stop:
                break
        self.data.close()
        if report:
            report.drain()

    def _epoch(self, epoch: int, fault: dict | None, swa_from: int) -> tuple[dict[str, float], dict[str, Any]]:
        """Train one epoch, then validate: the metrics, and the validation predictions."""
        r, train = self.recipe, self.data.batches(self.recipe.data.train_split, epoch, True)
        if r.task == "detect":
            inject = functools.partial(_inject_fault, fault)
            metrics = detection.train_epoch(self.engine, train, r, self.device, epoch, self.rank, inject)
        else:
            metrics = train_epoch(self.engine, train, self.loss, self.device, epoch, self.rank, fault)
        same_batchnorm_stats(self.engine.module, self.world)
        if self.swa is not None and epoch >= swa_from:
            self.swa.update_parameters(self.engine.module)
        val = self.data.batches(r.data.val_split, epoch, False)
        if r.task == "detect":
            pred = detection.predict(self.engine, val, r, self.device)
        else:
            pred = predict(self.engine, val, self.loss, self.device)
        return metrics | self._evaluate(pred, "val_"), pred

    def _evaluate(self, pred: dict[str, Any], prefix: str) -> dict[str, float]:
        """The validation metrics of ``pred``, and each site's (``val_site_3_accuracy``) with the worst site's
        (``val_worst_site_patient_weighted_log_loss``) where its samples are of two or more: every epoch, so a
        centre's curve can be read, and monitored. The sites' results stay in ``pred["sites"]``, for the selected
        model's table (:meth:`training.reporting.Reporter.final`)."""
        pred["sites"] = by_site(pred, self.recipe, self.outputs)
        return evaluate(pred, self.recipe, self.outputs, prefix) | site_metrics(pred["sites"], prefix, counts=False)

    def _finish_swa(self, epoch: int) -> tuple[dict[str, Any], dict[str, float]]:
        """Recompute BatchNorm statistics for the averaged weights, then evaluate them (``val_swa_*``)."""
        r = self.recipe
        dtype = next(self.swa.parameters()).dtype
        train = self.data.batches(r.data.train_split, epoch, False)
        torch.optim.swa_utils.update_bn(
            (torch.as_tensor(x, device=self.device).to(dtype) for x, _, _ in train), self.swa
        )
        same_batchnorm_stats(self.swa, self.world)  # each rank's were of its share of the data
        pred = predict(self.swa, self.data.batches(r.data.val_split, epoch, False), self.loss, self.device)
        return pred, self._evaluate(pred, "val_swa_")

    def _export(self, report, folder: str, metas: list[dict]) -> None:
        """Export the selected weights; every rank takes part (under ZeRO-3 parameters are gathered first)."""
        gather = contextlib.nullcontext()
        if self.engine.zero_optimization_stage() == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        with gather:
            if report is not None:
                report.export(self.swa.module if self.swa is not None else self.engine.module, folder, metas)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``recipe`` (dict), ``mlflow_uri``, ``run_id``, optional ``fault``."""
    import ray.train

    from training.console import quiet_worker
    from training.launch import check_checkpoint, storage_filesystem

    quiet_worker()
    ctx = ray.train.get_context()
    data = config["recipe"]["data"]
    wait_for_store(data["dataset"], data["outage_wait_s"], f"rank {ctx.get_world_rank()}")  # before any read
    checkpoint = ray.train.get_checkpoint()
    start = config.get("start_from")
    weights_only = False
    if checkpoint is None and start:  # a new run that starts from another run's checkpoint (sweeps)
        fs = storage_filesystem(start["storage"])
        checkpoint = ray.train.Checkpoint(start["path"], filesystem=fs)
        weights_only = bool(start.get("weights_only"))
        check_checkpoint(start["path"], fs)
    elif checkpoint is not None:  # this run's own latest, after a worker failure or with --resume
        check_checkpoint(checkpoint.path, checkpoint.filesystem, "to resume from")
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as restored:
        trainer = Trainer(config, ctx.get_world_rank(), ctx.get_world_size(), restored, weights_only)

    def report(metrics: dict[str, float], folder: str) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        if config.get("gate") is not None and trainer.rank == 0 and not metrics["done"]:
            await_go_ahead(config["gate"], metrics["epoch"])  # the other ranks wait in the next all-reduce

    trainer.run(report)
    if not trainer.resumed:  # test hook: a worker lost in the held-out step (the fault's epoch: `epochs`)
        _inject_fault(config.get("fault"), trainer.recipe.epochs, 0, trainer.rank)
    held_out_step(trainer)  # on these same workers, where the driver asked for it


def await_go_ahead(gate, epoch: int) -> None:
    """Block until a sweep's trial puts ``epoch`` (or later) in ``gate``, its scheduler having let it go on: one
    it stops or pauses there ends first, with its workers, which otherwise ran an epoch or two past the verdict."""
    while gate.get() < epoch:  # an earlier epoch's, left unread by workers that failed and were restarted
        pass
