"""Training-step benchmark: seconds per optimiser step of Tessera's engine (Ray Train worker + DeepSpeed, the
recipe's optimiser) against a plain PyTorch loop, same model (resnet50), input (256 px), batch and threads.

Both sides time the same synthetic batch (data loading is benchmarks/loader.py's business). The Ray Train side
runs one worker owning all the cores (``cpus_per_worker``), as a one-GPU-per-worker cluster would; where CUDA is
present it is given GPU 0 with Ray Train's NCCL group, and both sides run there.

Step times on a small shared VM drift by 20-30 % over a minute, more than the overhead being measured, so the
sides are interleaved: the plain loop runs before and after the Ray run (its median over both), and inside the
Ray worker a plain step and a DeepSpeed step alternate, so drift hits both alike.
On one worker Tessera runs the recipe's ZeRO-1/2 as stage 0 (``training.engine.zero_stage``: nothing to
partition); ``--force-stage`` times the recipe's stage as DeepSpeed would run it, for comparison. The worker
keeps freed memory in its heap as Tessera's CPU training worker does (``shards.allocator``; both steps in the
worker get it, the plain loop outside does not: that one is the loop a user would write);
``--default-malloc`` leaves glibc's defaults.
``--bf16`` runs both sides in bf16 (torch autocast), as a GPU run does by default, on the CPU.
``--no-ray`` alternates the two steps in this process, as the Ray worker does, under a one-rank process group of
its own (NCCL on a GPU, gloo otherwise): for a machine without Ray, such as a lent GPU machine. Where CUDA is
present both sides run on GPU 0, each step timed to its end (with ``--bf16`` for the bf16 a GPU run uses).
Usage: ``python benchmarks/train_step.py [--batch 8] [--steps 8] [--size 256] [--zero 2] [--cores 2]
[--force-stage] [--default-malloc] [--bf16] [--no-ray]``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch


def _recipe(args):
    from training.config import load_recipe

    return load_recipe(
        "strip_ai_resnet50",
        [
            "model.pretrained=false",
            f"batch_size={args.batch}",
            f"deepspeed.zero_stage={args.zero}",
            "workers=1",
            f"cpus_per_worker={args.cores}",
            "swa.enabled=false",
            f"deepspeed.bf16={str(args.bf16).lower()}",
        ],
    )


def _batch(batch: int, size: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 2, (batch,), generator=g)
    return x.to(device), y.to(device)


def _median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def _finish() -> None:
    """Wait for the GPU's queued work, so that a step's time includes its kernels."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(step, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step()``, after one warm-up call."""
    step()
    times = []
    for _ in range(steps):
        _finish()
        t = time.perf_counter()
        step()
        _finish()
        times.append(time.perf_counter() - t)
    return times


def _plain_step(recipe, x, y):
    """One plain PyTorch optimiser step of the recipe's model and optimiser, as a closure."""
    from training.engine import make_optimizer, mixed_precision
    from training.models import build_model

    model = build_model(recipe.model, 2).to(x.device).train()
    opt = make_optimizer(model.parameters(), recipe.optim)
    cuda = x.device.type == "cuda"

    def step():
        # bf16 as a user would write it: torch autocast around the forward (the engine's own bf16, see engine.py)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=mixed_precision(recipe, cuda=cuda)):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _deepspeed_step(recipe, x, y, force_stage: bool):
    """One step of Tessera's engine (DeepSpeed around the recipe's model and optimiser), as a closure, and the
    ZeRO stage it runs."""
    from training.engine import init_engine
    from training.losses import Loss
    from training.models import build_model

    stage = recipe.deepspeed.zero_stage if force_stage else None
    model = build_model(recipe.model, 2).to(x.device)
    engine, _ = init_engine(model, recipe, cuda=x.device.type == "cuda", stage=stage)
    loss_fn = Loss(False)

    def step():
        engine.backward(loss_fn(engine(x), y))
        engine.step()

    return step, engine.zero_optimization_stage()


def plain(args) -> list[float]:
    torch.set_num_threads(args.cores)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    times = _timed(_plain_step(_recipe(args), *_batch(args.batch, args.size, device)), args.steps)
    if device == "cuda":  # what this process cached goes back to the GPU, which the Ray worker shares
        torch.cuda.empty_cache()
    return times


def _alternate(config: dict) -> dict:
    """Median seconds per step of the plain loop and of Tessera's engine, alternating in this process, as a Ray
    Train worker runs them; on GPU 0 where CUDA is present."""
    from shards.allocator import keep_freed_memory
    from training.config import TrainRecipe

    recipe = TrainRecipe.model_validate(config["recipe"])
    # as Tessera's CPU training worker does (training.loop.Trainer); the plain step in here gets it too
    cuda = torch.cuda.is_available()
    kept = keep_freed_memory() if config["keep_freed_memory"] and not cuda else False
    x, y = _batch(config["batch"], config["size"], "cuda" if cuda else "cpu")
    plain_step = _plain_step(recipe, x, y)
    ds_step, stage = _deepspeed_step(recipe, x, y, config["force_stage"])
    plain_step(), ds_step()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "deepspeed": []}
    for _ in range(config["steps"]):  # alternate, so that drift on a shared machine hits both sides alike
        for name, step in (("plain", plain_step), ("deepspeed", ds_step)):
            _finish()
            t = time.perf_counter()
            step()
            _finish()
            times[name].append(time.perf_counter() - t)
    metrics = {f"{k}_s": _median(v) for k, v in times.items()}
    return metrics | {"threads": torch.get_num_threads(), "stage": stage, "kept": kept, "cuda": cuda}


def _config(args) -> dict:
    return {
        "recipe": _recipe(args).model_dump(),
        "batch": args.batch,
        "size": args.size,
        "steps": args.steps,
        "force_stage": args.force_stage,
        "keep_freed_memory": not args.default_malloc,
    }


def _worker(config: dict) -> None:
    import ray.train

    metrics = _alternate(config)
    with tempfile.TemporaryDirectory() as tmp:  # Ray Train v2 returns the metrics of checkpointed reports
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def in_process(args) -> dict:
    """:func:`_alternate` here, under a one-rank process group of its own, as Ray Train would have made."""
    from training.local_group import one_rank_group

    torch.set_num_threads(args.cores)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(0)
    with one_rank_group("nccl" if cuda else "gloo"):
        return _alternate(_config(args))


def cpu_worker_env() -> dict[str, str]:
    """The worker environment Tessera's stack gives Ray on a CPU-only machine (imported only there: the stack's
    settings need pydantic-settings, which a GPU machine's image may lack)."""
    from cluster.stack import CPU_WORKER_ENV

    return CPU_WORKER_ENV


def in_ray(args) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # on a GPU machine the worker gets GPU 0 and Ray Train's NCCL group, as `tessera train` gives it; otherwise
    # the CPU worker's environment (one malloc arena)
    cuda = torch.cuda.is_available()
    env = {} if cuda else {"env_vars": cpu_worker_env()}
    # the workers' lines stay out: the results come back as metrics, a failure's cause with TrainingFailedError, and
    # without a dashboard Ray Train's placement-group cleaner logs every second that it cannot ask for its state
    ray.init(
        num_cpus=args.cores,
        num_gpus=int(cuda),
        include_dashboard=False,
        logging_level="ERROR",
        runtime_env=env,
        log_to_driver=False,
    )
    store = tempfile.mkdtemp(prefix="tessera-bench-train-")  # a run of its own, not an earlier run's snapshot
    try:
        trainer = TorchTrainer(
            _worker,
            train_loop_config=_config(args),
            scaling_config=ScalingConfig(
                num_workers=1, use_gpu=cuda, resources_per_worker={"CPU": args.cores} | ({"GPU": 1} if cuda else {})
            ),
            torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
            run_config=RunConfig(storage_path=store, name="train_step"),
        )
        return trainer.fit().metrics
    finally:
        ray.shutdown()
        shutil.rmtree(store, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--force-stage", action="store_true", help="run the recipe's ZeRO stage even on one worker")
    ap.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc settings in the worker")
    ap.add_argument("--bf16", action="store_true", help="both sides in bf16 (torch autocast), as on a GPU")
    ap.add_argument("--no-ray", action="store_true", help="alternate both steps in this process (GPU 0 if any)")
    args = ap.parse_args()
    if args.no_ray:
        return main_in_process(args)
    before = plain(args)
    ray_side = in_ray(args)
    after = plain(args)
    base = _median(before + after)
    ours, worker_plain = ray_side["deepspeed_s"], ray_side["plain_s"]
    precision = "bf16 autocast" if args.bf16 else "fp32"
    where = f"GPU 0 ({torch.cuda.get_device_name(0)}), NCCL" if ray_side["cuda"] else f"{args.cores} cores"
    print(f"resnet50, {args.size} px, batch {args.batch}, {where}, {precision}, medians of {args.steps} steps per side")
    print(f"plain PyTorch loop (before and after): {base:7.4f} s/step ({_median(before):.4f}, {_median(after):.4f})")
    malloc = "heap kept, as Tessera's CPU worker" if ray_side["kept"] else "glibc defaults"
    print(f"plain loop inside the Ray Train worker: {worker_plain:7.4f} s/step (malloc: {malloc})")
    stage = f"ZeRO-{ray_side['stage']}" + (f" (recipe: ZeRO-{args.zero})" if ray_side["stage"] != args.zero else "")
    print(f"Ray Train + DeepSpeed {stage}, alternating: {ours:7.4f} s/step (threads {ray_side['threads']})")
    print(f"ratio Tessera / plain: {ours / base:.3f}x (target <= 1.10x); DeepSpeed alone {ours / worker_plain:.3f}x")


def main_in_process(args: argparse.Namespace) -> None:
    side = in_process(args)
    where = f"GPU 0 ({torch.cuda.get_device_name(0)})" if side["cuda"] else f"{args.cores} cores"
    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(f"resnet50, {args.size} px, batch {args.batch}, {where}, {precision}, medians of {args.steps} steps per side")
    print(f"plain PyTorch loop, alternating:     {side['plain_s'] * 1000:8.2f} ms/step")
    stage = f"ZeRO-{side['stage']}" + (f" (recipe: ZeRO-{args.zero})" if side["stage"] != args.zero else "")
    print(f"DeepSpeed {stage}, alternating: {side['deepspeed_s'] * 1000:8.2f} ms/step")
    print(f"ratio DeepSpeed / plain: {side['deepspeed_s'] / side['plain_s']:.3f}x (target <= 1.10x; no Ray here)")


if __name__ == "__main__":
    main()
