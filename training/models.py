"""Model factory: timm models by name, head sized for the recipe's classes. Never imports DeepSpeed."""

from __future__ import annotations

import os

import torch


def build_model(
    name: str, num_classes: int, pretrained: bool = False, weights: str | None = None, drop_rate: float = 0.0
) -> torch.nn.Module:
    """A timm model with a fresh ``num_classes`` head.

    With ``pretrained``, weights come from ``weights`` when it is a local file (``.safetensors``/``.pth``),
    or from the model hub otherwise (``weights`` may name a ``hf-hub:`` id). The classifier head of the file
    is dropped when its size differs, as timm does for hub weights.
    """
    import timm

    kwargs: dict = {"num_classes": num_classes, "drop_rate": drop_rate}
    if pretrained and weights and os.path.isfile(weights):
        kwargs["pretrained_cfg_overlay"] = {"file": os.path.abspath(weights)}
        return timm.create_model(name, pretrained=True, **kwargs)
    if pretrained and weights:
        return timm.create_model(weights, pretrained=True, **kwargs)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def count_parameters(model: torch.nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
