"""DeepSpeed engine set-up, kept apart from the model and the loop (as torchtitan's parallelize.py)."""

from __future__ import annotations

from typing import Any

import torch

from training.config import OptimConfig, TrainRecipe


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``params``."""
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


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
    """Wrap ``model`` in a DeepSpeed engine on the process group Ray Train already set up."""
    import deepspeed

    optimizer = make_optimizer(model.parameters(), recipe.optim)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(recipe, cuda), dist_init_required=False
    )
    return engine
