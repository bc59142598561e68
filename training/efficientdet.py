"""EfficientDet (paper 004's third detector) from Ross Wightman's ``effdet``, answering as a torchvision detector
does, so that :mod:`training.detection`'s epoch, prediction, metrics and checkpoints take it as they are: in
training images and targets in, its two losses out; in evaluation images in, each one's boxes out.

``effdet`` counts classes from 1 (its focal loss takes class ``c`` as output ``c - 1``; its detections say
``c``): a background slot of 1 (:func:`training.detection.background_slot`), as Faster R-CNN's, with no output
spent on it. Its targets are ``[y0, x0, y1, x1]``; its detections ``[x0, y0, x1, y1, score, class]``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from training.config import EFFICIENTDET
from training.detection import SCORE_FLOOR  # which imports this module only where it is called

with warnings.catch_warnings():  # effdet scripts its decoding as it is imported; torch 2.10+ calls that deprecated
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from effdet import EfficientDet, get_efficientdet_config
    from effdet.anchors import AnchorLabeler, Anchors
    from effdet.bench import _batch_detection, _post_process
    from effdet.config.model_config import efficientdet_model_param_dict
    from effdet.loss import DetectionLoss


def names() -> list[str]:
    """The EfficientDet configurations effdet builds (``tf_efficientdet_d0`` ... ``d7``, the lite ones...)."""
    return sorted(n for n in efficientdet_model_param_dict if n.startswith(EFFICIENTDET))


class EfficientDetector(nn.Module):
    """``name`` for ``classes`` classes on ``image_size`` px square images (a multiple of 128, its coarsest
    level's stride); ``pretrained_backbone``: its EfficientNet's ImageNet weights from timm's hub. ``options``:
    effdet's config fields (``max_det_per_image``, ``soft_nms``...)."""

    def __init__(self, name: str, classes: int, image_size: int, pretrained_backbone: bool, options: dict) -> None:
        super().__init__()
        config = get_efficientdet_config(name)
        config.num_classes, config.image_size = classes, (image_size, image_size)
        for key, value in options.items():
            setattr(config, key, value)
        self.anchors = Anchors.from_config(config)
        # its top-k runs over every anchor and class: a small input has fewer than its default 5000
        config.max_detection_points = min(config.max_detection_points, self.anchors.boxes.shape[0] * classes)
        self.model = EfficientDet(config, pretrained_backbone=pretrained_backbone)  # makes the config read-only
        self.labeler = AnchorLabeler(self.anchors, classes, match_threshold=0.5)
        self.loss = DetectionLoss(config)
        self.config = config

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        x = torch.stack(images)
        class_out, box_out = self.model(x)
        if self.training:
            assert targets is not None
            cls_t, box_t, positives = self.labeler.batch_label_anchors(*padded(targets))
            total, class_loss, _ = self.loss(class_out, box_out, cls_t, box_t, positives)
            # the total weighs the box loss (box_loss_weight, 50): the two add up to what is optimised
            return {"classification": class_loss, "bbox_regression": total - class_loss}
        c = self.config
        found = decoded(x, class_out, box_out, self.anchors.boxes, c.num_levels, c.num_classes,
                        c.max_detection_points, c.max_det_per_image, c.soft_nms)  # fmt: skip
        return [
            {"boxes": d[:, :4], "scores": d[:, 4], "labels": d[:, 5].long()}
            for d in (row[row[:, 4] >= SCORE_FLOOR] for row in found)
        ]


def decoded(
    x: torch.Tensor, class_out: list[torch.Tensor], box_out: list[torch.Tensor], anchors: torch.Tensor,
    levels: int, classes: int, points: int, most: int, soft: bool,
) -> torch.Tensor:  # fmt: skip
    """The boxes of a batch ``x`` from its network's outputs, ``[B, most, 6]`` (corners in input pixels clipped to
    the square image, as torchvision's detectors clip theirs; score; class from 1; zeros past the last): effdet's
    top ``points`` over anchors and classes, decoded and suppressed. Scripted in the export too."""
    class_out, box_out, indices, found = _post_process(class_out, box_out, levels, classes, points)
    n, side = x.shape[0], float(x.shape[-1])
    scale, size = torch.ones(n, device=x.device), torch.full((n, 2), side, device=x.device)
    return _batch_detection(n, class_out, box_out, anchors, indices, found, scale, size, most, soft)


def padded(targets: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's boxes as effdet's labeler takes them: ``[B, N, 4]`` as ``[y0, x0, y1, x1]`` and ``[B, N]``
    classes, padded with class -1 (which it skips); N at least 1."""
    n = max([1, *(len(t["boxes"]) for t in targets)])
    device = targets[0]["boxes"].device
    boxes = torch.zeros((len(targets), n, 4), device=device)
    cls = torch.full((len(targets), n), -1.0, device=device)
    for i, t in enumerate(targets):
        k = len(t["boxes"])
        boxes[i, :k] = t["boxes"][:, [1, 0, 3, 2]].float()
        cls[i, :k] = t["labels"].float()
    return boxes, cls


class EfficientDetLayout(nn.Module):
    """The Ultralytics end-to-end layout of :class:`training.detection.YoloLayout` for an EfficientDet:
    ``[1, 3, H, W]`` in [0, 1] in, ``[1, K, 6]`` out (classes from 0). Its network is traced (effdet's modules
    loop over lists TorchScript cannot index); its decoding and suppression are scripted."""

    def __init__(self, detector: EfficientDetector, mean: tuple, std: tuple) -> None:
        super().__init__()
        size = detector.config.image_size
        example = torch.zeros((1, 3, *size))
        # its output: a list of each level's outputs, whose number its config fixes (strict=False lets it be a list)
        self.net = torch.jit.trace(detector.model.eval(), example, check_trace=False, strict=False)
        self.register_buffer("anchors", detector.anchors.boxes.clone())
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1))
        c = detector.config
        self.levels, self.classes, self.points = c.num_levels, c.num_classes, c.max_detection_points
        self.most, self.soft, self.floor = c.max_det_per_image, c.soft_nms, SCORE_FLOOR

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        class_out, box_out = self.net(((x[0] - self.mean) / self.std)[None])
        d = decoded(x, class_out, box_out, self.anchors, self.levels, self.classes, self.points, self.most,
                    self.soft)[0]  # fmt: skip
        d = d[d[:, 4] >= self.floor]
        return torch.cat([d[:, :5], d[:, 5:] - 1], 1)[None]
