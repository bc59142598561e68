"""DeepSpeed engine set-up, kept apart from the model and the loop (as torchtitan's parallelize.py)."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from shards import scratch
from training import console
from training.config import OptimConfig, ScheduleConfig, TrainRecipe

TAG = "ds"  # the DeepSpeed tag of every checkpoint: its files are under TAG/ in the checkpoint folder


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``params`` (only trainable ones are passed: head-only fine-tunes).

    PyTorch's fused kernels (CPU and CUDA) where it has them: one pass over each tensor instead of a
    temporary per operation, which halves the AdamW step of a resnet50 on CPU (0.058 -> 0.026 s) and of
    ZeRO's one flat partition (0.20 -> 0.10 s). RMSprop has no fused kernel; it gets the multi-tensor one.
    """
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int, mode: str):
    """A per-epoch PyTorch LR scheduler, or ``None`` for a constant rate. ``plateau`` steps on the monitor."""
    sched = torch.optim.lr_scheduler
    if cfg.name == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=cfg.min_lr)
    if cfg.name == "step":
        return sched.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.name == "plateau":
        return sched.ReduceLROnPlateau(
            optimizer, mode=mode, factor=cfg.factor, patience=cfg.patience, min_lr=cfg.min_lr
        )
    return None


def partition_ranks(path: str | Path, fs=None) -> int:
    """How many data-parallel ranks a checkpoint's ZeRO state is partitioned over (its ``zero_pp_rank_<r>_*``
    files, on pyarrow ``fs``, local by default); 0 when it is not (stage 0, or ZeRO-1/2 on one worker, which
    runs as stage 0)."""
    from training.launch import checkpoint_files

    names = (f.base_name for f in checkpoint_files(str(path), fs))
    return len({m.group(1) for name in names if (m := re.match(r"zero_pp_rank_(\d+)_", name))})


def to_universal(checkpoint_dir: str | Path, out_dir: str | Path, tag: str) -> Path:
    """Convert a ZeRO checkpoint written by one number of ranks into DeepSpeed's universal form, which an
    engine with ``checkpoint.load_universal`` reads on any number of ranks (each takes its slice of every
    parameter's optimiser state). Returns the folder to load from, with the same ``tag``."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(Path(checkpoint_dir) / tag),
        output_folder=str(Path(out_dir) / tag),
        num_extract_workers=1,  # in-process: no process pool inside a Ray worker
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our client state does not carry DeepSpeed's universal-checkpoint marker
    )
    ds_to_universal.main(args)  # prints what it converts, and progress bars: once per rank, in the run's log
    return Path(out_dir)


@contextlib.contextmanager
def node_lock(path: Path) -> Iterator[Callable[[], None]]:
    """An exclusive lock among this node's processes on the file ``path`` (``flock``); yields ``remove``, with
    which its holder deletes the file: a process that waited on the deleted file then takes the lock again on the
    file at ``path`` now, so no two hold it at once and no lock file outlives its last user."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        os.close(fd)
    try:
        yield lambda: path.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def universal_checkpoint(checkpoint_dir: str | Path, tag: str) -> Iterator[Path]:
    """:func:`to_universal` once per node, in a folder its workers share: the first to arrive converts while the
    others wait, and the last to leave removes it (a reader killed while loading does not count: each reader's
    file names its process). Converting loads every rank's partitions, so a node of 8 workers converting each
    on its own would hold 8 copies of the model and optimiser state and write 8 folders. ``checkpoint_dir``
    names the checkpoint: Ray Train gives a node's workers the same local folder (the storage path itself, or
    its one shared download)."""
    key = hashlib.sha256(str(Path(checkpoint_dir).resolve()).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"tessera-universal-{key}"
    readers = out.with_name(f"{out.name}.readers")  # one file per reader of the folder: <pid>-<uuid>
    reader = readers / f"{os.getpid()}-{uuid.uuid4().hex}"
    lock = out.with_name(f"{out.name}.lock")
    with node_lock(lock):
        readers.mkdir(exist_ok=True)
        reader.touch()
        if not (out / ".complete").exists():  # also a crashed conversion's leftovers: convert again
            shutil.rmtree(out, ignore_errors=True)
            to_universal(checkpoint_dir, out, tag)
            (out / ".complete").touch()
    try:
        yield out
    finally:
        with node_lock(lock) as remove:
            reader.unlink(missing_ok=True)
            if not any(scratch.owner_running(f.name, prefix="") for f in readers.iterdir()):
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(readers)
                remove()


def zero_stage(recipe: TrainRecipe, world: int, written_by: int | None = None) -> int:
    """The ZeRO stage a run uses: the recipe's, except stages 1 and 2 on a single data-parallel rank.

    Those stages partition optimiser state (and gradients) across ranks. On one rank there is nothing to
    partition: they only add a flat fp32 copy of the weights and copy every gradient twice more per step
    (resnet50, 256 px, batch 8 on 2 CPU cores: 0.10-0.17 s of a 1.1 s step; stage 0's forward, backward and
    step time as plain PyTorch's, +5 ms). So one rank runs stage 0, the same arithmetic (tested against a
    plain loop and a real ZeRO-2 engine). A run that continues a checkpoint keeps the stage it was written
    with, whatever the worker count now: ZeRO's partitioned optimiser state is read only by a ZeRO engine (on
    another number of ranks through :func:`to_universal`), and a stage-0 checkpoint (one worker) is read by a
    stage-0 engine on any number of workers. Stage 3 is kept: it changes how parameters are held, not only where
    optimiser state lives. ``written_by``: for a run that continues a checkpoint, the number of ranks its ZeRO
    state is partitioned over (:func:`partition_ranks`; 0 when it is not); None for a new run.
    """
    stage = recipe.deepspeed.zero_stage
    if stage not in (1, 2):
        return stage
    if written_by is not None:
        return stage if written_by > 0 else 0
    return 0 if world == 1 else stage


def load_universal(engine, folder: str | Path, tag: str) -> dict[str, Any]:
    """``engine.load_checkpoint`` of a universal checkpoint (:func:`to_universal`), with the module's buffers:
    DeepSpeed's universal load restores parameters only, so BatchNorm's running statistics would stay at their
    initial values. Returns the client state."""
    _, client = engine.load_checkpoint(str(folder), tag=tag)
    states = Path(folder) / tag / "mp_rank_00_model_states.pt"
    if not states.exists():  # ZeRO-3: each rank's file holds the (replicated) buffers
        states = states.with_name("zero_pp_rank_0_mp_rank_00_model_states.pt")
    # mmap: only the buffers are read, not the whole model again (load_checkpoint has just read the file)
    saved = torch.load(states, map_location="cpu", weights_only=True, mmap=True)["module"]
    engine.module.load_state_dict({n: saved[n] for n, _ in engine.module.named_buffers() if n in saved}, strict=False)
    return client


def mixed_precision(recipe: TrainRecipe, cuda: bool) -> bool:
    """Whether the run computes in bf16: the recipe's ``bf16``; ``auto`` is bf16 on a GPU and fp32 on the CPU
    (where bf16 is emulated unless the CPU has bf16 instructions)."""
    bf16 = recipe.deepspeed.bf16
    return cuda if bf16 == "auto" else bool(bf16)


def deepspeed_config(recipe: TrainRecipe, cuda: bool, stage: int, universal: bool = False) -> dict[str, Any]:
    """DeepSpeed config: ZeRO ``stage`` (:func:`zero_stage`), the recipe's accumulation and clipping, bf16
    (:func:`mixed_precision`); ``universal``: the checkpoint to load is universal (:func:`to_universal`).

    bf16 is torch autocast (fp32 weights, bf16 matmuls and convolutions, gradients of those layers reduced in
    bf16), not DeepSpeed's ``bf16`` mode. That mode casts the parameters and leaves buffers alone, so a
    BatchNorm's bf16 weight meets its fp32 running statistics and PyTorch refuses the mix ("expected scalar
    type BFloat16 but found Float": resnet, efficientnet, inception, mobilenet); it would also name its ZeRO
    files ``bf16_zero_pp_rank_*`` and write bf16 weights, so a GPU run's checkpoint would differ from a CPU
    run's. Under autocast the checkpoints are the same fp32 files either way.
    """
    return {
        "train_micro_batch_size_per_gpu": recipe.batch_size,
        "gradient_accumulation_steps": recipe.deepspeed.gradient_accumulation,
        "gradient_clipping": recipe.deepspeed.gradient_clipping,
        "zero_optimization": {"stage": stage},
        "checkpoint": {"load_universal": universal},
        "torch_autocast": {"enabled": mixed_precision(recipe, cuda), "dtype": "bfloat16"},
        # The optimiser is PyTorch's (any of AdamW/Adam/SGD/RMSprop), not a DeepSpeed fused one.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def deepspeed_on(cuda: bool) -> None:
    """Point DeepSpeed at the worker's device. DeepSpeed picks its accelerator once a process, CUDA wherever torch
    sees a GPU, and moves rank r's model to CUDA device r: a CPU worker on a GPU machine (a group with fewer GPUs
    than workers, or ``use_gpu: false``) names the CPU before that, or rank 1 of two on a one-GPU machine fails with
    "invalid device ordinal" (seen on an H200)."""
    if cuda or not torch.cuda.is_available():
        return
    os.environ["DS_ACCELERATOR"] = "cpu"  # read where deepspeed is first imported
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() != "cpu":  # imported before in this process
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())


def init_engine(
    model: torch.nn.Module, recipe: TrainRecipe, cuda: bool, stage: int | None = None, universal: bool = False
):
    """Wrap ``model`` in a DeepSpeed engine on the process group already set up; returns ``(engine, scheduler)``.

    ``stage``: the ZeRO stage, by default :func:`zero_stage` for this process group; ``universal``: it will load
    a universal checkpoint (:func:`to_universal`). The scheduler drives the wrapped PyTorch optimiser's
    ``param_groups`` (which ZeRO keeps), once per epoch.
    """
    deepspeed_on(cuda)
    import deepspeed
    import torch.distributed as dist

    if stage is None:
        stage = zero_stage(recipe, dist.get_world_size())

    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], recipe.optim)
    scheduler = make_scheduler(optimizer, recipe.schedule, recipe.epochs, recipe.eval.mode)
    with console.routine_prints_dropped():
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=deepspeed_config(recipe, cuda, stage, universal),
            dist_init_required=False,
        )
    if engine.dp_world_size == 1 and stage == 0:
        # Averaging gradients over one rank is the identity; DeepSpeed would still flatten, "reduce" and copy
        # every gradient back each step.
        engine.enable_backward_allreduce = False
    return engine, scheduler


def same_batchnorm_stats(module: torch.nn.Module, world: int) -> None:
    """Average BatchNorm's running statistics over the ``world`` ranks, in place (timm's ``distribute_bn``).

    DeepSpeed, unlike DDP, never syncs buffers: each rank's statistics follow its own batches, so the ranks
    validated their shares with different models, rank 0's checkpoint and export held one the metrics were not
    measured on, and a resumed run's other ranks restarted from rank 0's statistics (its next validation
    differed from an uninterrupted run's). Called after each training pass, the ranks hold one model.
    """
    if world > 1:
        from timm.utils import distribute_bn

        distribute_bn(module, world, reduce=True)


def checkpoint_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The module weights of a Tessera DeepSpeed checkpoint of ZeRO stage 0-2, a folder or an ``s3://`` URL (read
    on the CPU, no engine needed). A ZeRO-3 checkpoint holds each rank's slice of the weights only: its run's
    exported model (the MLflow artifact ``model``) has them whole.

    Loaded with ``weights_only=True``: a checkpoint may come from anywhere, and unpickling runs code.
    """
    member = f"{TAG}/mp_rank_00_model_states.pt"
    if str(checkpoint).startswith("s3://"):
        from training.launch import storage_location

        prefix, fs = storage_location(str(checkpoint))
        with fs.open_input_file(f"{prefix.rstrip('/')}/{member}") as f:
            source: Any = io.BytesIO(f.read())
    else:
        source = Path(checkpoint) / member
    return torch.load(source, map_location="cpu", weights_only=True)["module"]
