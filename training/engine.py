"""DeepSpeed engine set-up, kept apart from the model and the loop (as torchtitan's parallelize.py)."""

from __future__ import annotations

from typing import Any

import torch

from training.config import OptimConfig, ScheduleConfig, TrainRecipe


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


def deepspeed_config(recipe: TrainRecipe, cuda: bool) -> dict[str, Any]:
    """DeepSpeed config: ZeRO stage and accumulation from the recipe; bf16 on GPU (``auto``), fp32 on CPU."""
    bf16 = recipe.deepspeed.bf16 if recipe.deepspeed.bf16 != "auto" else cuda
    return {
        "train_micro_batch_size_per_gpu": recipe.batch_size,
        "gradient_accumulation_steps": recipe.deepspeed.gradient_accumulation,
        "zero_optimization": {"stage": recipe.deepspeed.zero_stage},
        "bf16": {"enabled": bool(bf16 and cuda)},
        # The optimiser is PyTorch's (any of AdamW/Adam/SGD/RMSprop), not a DeepSpeed fused one.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def init_engine(model: torch.nn.Module, recipe: TrainRecipe, cuda: bool):
    """Wrap ``model`` in a DeepSpeed engine on the process group already set up; returns ``(engine, scheduler)``.

    The scheduler drives the wrapped PyTorch optimiser's ``param_groups`` (which ZeRO keeps), once per epoch.
    """
    import deepspeed

    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], recipe.optim)
    scheduler = make_scheduler(optimizer, recipe.schedule, recipe.epochs, recipe.eval.mode)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(recipe, cuda), dist_init_required=False
    )
    return engine, scheduler
