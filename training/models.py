"""Model factory: timm image models, multi-head models and video models. Never imports DeepSpeed.

Every model maps ``x[N, 3, S, S]`` (or ``x[N, T, 3, S, S]`` for video) to ``logits[N, K]``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from training.config import ModelConfig


def _timm(name: str, num_classes: int, pretrained: bool, weights: str | None, **kwargs) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head (``0``: features only).

    With ``pretrained``, weights come from ``weights`` when it is a local file (``.safetensors``/``.pth``),
    or from the model hub otherwise (``weights`` may name a ``hf-hub:`` id). A head of different size in
    the file is dropped, as timm does for hub weights.
    """
    import timm

    kwargs["num_classes"] = num_classes
    weights = os.path.expanduser(weights) if weights else weights
    if pretrained and weights and os.path.isfile(weights):
        kwargs["pretrained_cfg_overlay"] = {"file": os.path.abspath(weights)}
        return timm.create_model(name, pretrained=True, **kwargs)
    if pretrained and weights:
        return timm.create_model(weights, pretrained=True, **kwargs)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


class MultiHead(nn.Module):
    """A shared backbone with one single-logit head per name (paper 003: ``any`` plus five subtypes)."""

    def __init__(self, backbone: nn.Module, names: list[str], drop_rate: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.names = list(names)
        self.dropout = nn.Dropout(drop_rate)
        self.heads = nn.ModuleList(nn.Linear(backbone.num_features, 1) for _ in names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x[N, 3, S, S]`` -> ``logits[N, H]``, one column per head."""
        f = self.dropout(self.backbone(x))
        return torch.cat([h(f) for h in self.heads], dim=1)


class TemporalClassifier(nn.Module):
    """A timm backbone per slice, then a transformer encoder over the slices (an image model made a video one)."""

    def __init__(self, backbone: nn.Module, frames: int, num_classes: int, layers: int = 2) -> None:
        super().__init__()
        dim = backbone.num_features
        heads = next(h for h in (8, 4, 2, 1) if dim % h == 0)
        self.backbone = backbone
        self.position = nn.Parameter(torch.zeros(1, frames, dim))
        block = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, batch_first=True, norm_first=True)
        self.temporal = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x[N, T, 3, S, S]`` -> ``logits[N, K]`` (mean over the encoded slices)."""
        n, t = x.shape[:2]
        f = self.backbone(x.flatten(0, 1)).view(n, t, -1)
        return self.head(self.temporal(f + self.position[:, :t]).mean(dim=1))


class Vivit(nn.Module):
    """Hugging Face ViViT (paper 002: ``google/vivit-b-16x2-kinetics400``) returning plain logits."""

    def __init__(self, cfg: ModelConfig, frames: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        from transformers import VivitConfig, VivitForVideoClassification

        options = {"num_frames": frames, "image_size": image_size} | cfg.options
        if cfg.pretrained:
            source = cfg.weights or "google/vivit-b-16x2-kinetics400"
            self.net = VivitForVideoClassification.from_pretrained(
                source, num_labels=num_classes, ignore_mismatched_sizes=True, **options
            )
        else:
            self.net = VivitForVideoClassification(VivitConfig(num_labels=num_classes, **options))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x[N, T, 3, S, S]`` -> ``logits[N, K]``."""
        return self.net(pixel_values=x).logits


WEIGHT_FILES = (".safetensors", ".pth", ".pt", ".bin")


def check_model(cfg: ModelConfig, task: str = "multiclass") -> None:
    """Refuse, on the driver, what would fail in every worker once the cluster had started: a model name timm
    (or, for ``task`` detect, torchvision's detectors) does not know (with the closest it does), or local weights
    that are not there. Raises RecipeError."""
    import difflib

    import timm

    from training.config import RecipeError

    if task == "detect":
        from training.detection import check_detector

        return check_detector(cfg)

    name = cfg.name.removeprefix("temporal:")
    if cfg.name != "vivit" and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise RecipeError(f"model.name: timm has no model {name!r}{hint}")
    w = cfg.weights
    local = w and not w.startswith("hf-hub:") and (w.startswith(("/", "./", "../", "~")) or w.endswith(WEIGHT_FILES))
    if cfg.pretrained and local and not os.path.exists(os.path.expanduser(w)):
        raise RecipeError(f"model.weights: no file or folder {w} (local weights must be at this path on every worker)")


def build_model(cfg: ModelConfig, num_outputs: int, frames: int = 0, image_size: int = 224) -> nn.Module:
    """The recipe's model with ``num_outputs`` logits (classes, or one per head); frozen per ``cfg.freeze``."""
    if cfg.name == "vivit":
        model: nn.Module = Vivit(cfg, frames, image_size, num_outputs)
    elif cfg.name.startswith("temporal:"):
        backbone = _timm(cfg.name.split(":", 1)[1], 0, cfg.pretrained, cfg.weights, **cfg.options)
        model = TemporalClassifier(backbone, frames, num_outputs, cfg.temporal_layers)
    elif cfg.heads:
        if len(cfg.heads) != num_outputs:
            raise ValueError(f"model.heads: {len(cfg.heads)} heads for {num_outputs} labels")
        backbone = _timm(cfg.name, 0, cfg.pretrained, cfg.weights, **cfg.options)
        model = MultiHead(backbone, cfg.heads, cfg.drop_rate)
    else:
        model = _timm(cfg.name, num_outputs, cfg.pretrained, cfg.weights, drop_rate=cfg.drop_rate, **cfg.options)
    if cfg.freeze == "backbone":
        freeze_backbone(model)
    return model


def recipe_model(recipe, num_outputs: int, pretrained: bool = True) -> nn.Module:
    """The model of ``recipe`` (a :class:`~training.config.TrainRecipe`): :func:`build_model`'s, or for task detect
    a torchvision detector (:func:`training.detection.build_detector`); without its pretrained weights unless
    ``pretrained``."""
    cfg = recipe.model if pretrained else recipe.model.model_copy(update={"pretrained": False})
    if recipe.task == "detect":
        from training.detection import build_detector

        return build_detector(cfg, num_outputs, recipe.data.image_size)
    return build_model(cfg, num_outputs, recipe.data.frames, recipe.data.image_size)


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The modules a head-only fine-tune trains."""
    if isinstance(model, MultiHead):
        return [model.heads]
    if isinstance(model, TemporalClassifier):
        return [model.temporal, model.head]
    if isinstance(model, Vivit):
        return [model.net.classifier]
    return [model.get_classifier()]


def freeze_backbone(model: nn.Module) -> None:
    """Train only the head(s) (paper 002: only the final layer's weights change)."""
    model.requires_grad_(False)
    for m in head_modules(model):
        m.requires_grad_(True)
    if isinstance(model, TemporalClassifier):
        model.position.requires_grad_(True)


def count_parameters(model: nn.Module, trainable: bool = True) -> int:
    """Parameters (only trainable ones unless ``trainable=False``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)
