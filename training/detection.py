"""Paper 004's first stage trained in Tessera (``task: detect``): a torchvision detector (Faster R-CNN, RetinaNet,
FCOS) or an EfficientDet (``effdet``: :mod:`training.efficientdet`; the paper compared these three with YOLOv8) on
images whose boxes travel in their metadata (``tessera ingest images --boxes``, without ``--crop``). A box is a
``lesion`` (``data.box_classes``; the paper's detector says where the tumour is, its classifier which) or of its
image's class; images without a box are negatives. Exported as TorchScript in the layout of an Ultralytics
end-to-end export (:func:`save_detector`), which ``tessera ingest images --detector`` applies to images without
boxes.

The model computes its own losses in training mode (torchvision's detectors do) and returns boxes in evaluation
mode; the loop's engine, checkpoints and MLflow are the classifiers' (:mod:`training.loop`).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from shards.dali import IMAGENET_MEAN, IMAGENET_STD
from training.box_augment import moved
from training.collective import raise_any, said
from training.config import EFFICIENTDET, ModelConfig, RecipeError, TrainRecipe

FAMILIES = ("fasterrcnn_", "retinanet_", "fcos_")  # torchvision's detectors whose input size a recipe sets
SCORE_FLOOR = 0.05  # boxes scoring less are dropped: COCO's evaluation floor (FCOS's own is 0.2)
SCRIPTED_NOTE = r".*always returns a \(Losses, Detections\) tuple in scripting"  # as ingest.detector's
MEAN = tuple(v / 255 for v in IMAGENET_MEAN)  # the loaders' normalisation, for images in [0, 1]
STD = tuple(v / 255 for v in IMAGENET_STD)
MATCH_IOU = 0.5  # a found box is a hit where it overlaps an unmatched true box of its class by this much
EXPORT = "detector.torchscript"  # the export's file in the run's model folder


def detector_names() -> list[str]:
    import torchvision.models.detection as detection
    from torchvision.models import list_models

    from training import efficientdet

    return [n for n in list_models(module=detection) if n.startswith(FAMILIES)] + efficientdet.names()


def check_detector(cfg: ModelConfig) -> None:
    """Refuse, on the driver, a detector torchvision does not have, or local weights that are not there."""
    import difflib
    import os

    names = detector_names()
    if cfg.name not in names:
        close = difflib.get_close_matches(cfg.name, names, n=3, cutoff=0.5)
        one_of = ", ".join(close or names)
        raise RecipeError(f"model.name: task detect takes a torchvision detector or an EfficientDet, one of {one_of}")
    if cfg.weights and not os.path.exists(cfg.weights):
        raise RecipeError(f"model.weights: no file {cfg.weights} (a detector's state dict, here on every worker)")


def background_slot(name: str) -> int:
    """1 where the detector's class 0 is the background (Faster R-CNN's softmax; EfficientDet counts from 1), 0
    where every class is one of ours (RetinaNet's and FCOS's sigmoids: a slot for a background would be a class
    never trained positive)."""
    return 1 if name.startswith(("fasterrcnn_", EFFICIENTDET)) else 0


def build_detector(cfg: ModelConfig, classes: int, image_size: int) -> nn.Module:
    """``cfg.name`` for ``classes`` classes (and Faster R-CNN's background: :func:`background_slot`), taking
    ``image_size`` px images as they come (ImageNet-normalised, square). ``pretrained``: its backbone's ImageNet
    weights from torchvision's hub (an EfficientDet's from timm's), or (``weights``) a local state dict of a whole
    detector (a COCO one: every tensor whose shape fits). ``cfg.options`` go to torchvision's builder
    (``detections_per_img``, ``score_thresh``...) or to effdet's config (``max_det_per_image``...)."""
    from torchvision.models import get_model

    hub = cfg.pretrained and not cfg.weights
    if cfg.name.startswith(EFFICIENTDET):
        from training.efficientdet import EfficientDetector

        model = EfficientDetector(cfg.name, classes, image_size, hub, cfg.options)
        if cfg.pretrained and cfg.weights:  # effdet's own checkpoints (COCO's) hold its network's tensors
            state = torch.load(cfg.weights, map_location="cpu", weights_only=True)
            load_matching(model.model, {k.removeprefix("model."): v for k, v in state.items()}, cfg.weights)
        return model
    # boxes down to the floor: mAP ranks them, ingest's confidence cuts them
    floor = {"box_score_thresh" if cfg.name.startswith("fasterrcnn_") else "score_thresh": SCORE_FLOOR}
    model = get_model(
        cfg.name, weights=None, weights_backbone="DEFAULT" if hub else None,
        num_classes=classes + background_slot(cfg.name), min_size=image_size, max_size=image_size,
        image_mean=[0.0] * 3, image_std=[1.0] * 3,
        **(floor | cfg.options),
    )  # fmt: skip
    if cfg.pretrained and cfg.weights:
        load_matching(model, torch.load(cfg.weights, map_location="cpu", weights_only=True), cfg.weights)
    return model


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> int:
    """Load the tensors of ``state`` whose name and shape ``model`` has (a detector of other classes differs in its
    class layers only); how many. None fitting is an error naming ``source``."""
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fits:
        raise ValueError(f"model.weights {source}: none of its tensors fits {type(model).__name__}")
    model.load_state_dict(fits, strict=False)
    return len(fits)


def targets(
    metas: list[dict], labels: np.ndarray, size: int, device, by_image: bool = False, slot: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Each sample's boxes in pixels of its ``size`` px input, of class 0 (a lesion) or, ``by_image``, of the
    image's class, plus ``slot`` (:func:`background_slot`); an image without boxes is a negative."""
    out = []
    for meta, label in zip(metas, labels, strict=True):
        boxes = torch.tensor([b[:4] for b in meta.get("boxes") or []], dtype=torch.float32).reshape(-1, 4) * size
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes = boxes[keep]
        cls = (int(label) if by_image else 0) + slot
        out.append({"boxes": boxes.to(device), "labels": torch.full((len(boxes),), cls, device=device)})
    return out


def train_epoch(engine, batches, recipe: TrainRecipe, device, epoch: int, rank: int, inject) -> dict[str, float]:
    """One pass of optimiser micro-steps of the detector's summed losses; their means over all workers."""
    engine.train()
    aug, size = recipe.data.augment, recipe.data.image_size
    rng = np.random.default_rng([recipe.seed, epoch, rank, 7])  # the moves, the same again when resumed
    black = -torch.tensor(IMAGENET_MEAN, device=device) / torch.tensor(IMAGENET_STD, device=device)
    by_image, slot = recipe.data.box_classes == "image", background_slot(recipe.model.name)
    sums: dict[str, float] = {}
    seen, began = 0, time.perf_counter()
    for step, (x, y, metas) in enumerate(batches):
        inject(epoch, step, rank)
        tgts = targets(metas, y, size, device, by_image, slot)
        images, tgts = moved(torch.as_tensor(x, device=device), tgts, aug, rng, black)
        losses = engine(list(images), tgts)
        loss = sum(losses.values())
        engine.backward(loss)
        engine.step()
        for k, v in {"loss": loss, **losses}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(y)
        seen += len(y)
    keys = sorted(sums)
    totals = torch.tensor([sums[k] for k in keys] + [seen], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    seconds = time.perf_counter() - began
    out = {f"train_{k}": float(v / totals[-1]) for k, v in zip(keys, totals[:-1], strict=True)}
    return out | {"train_seconds": seconds, "train_samples_per_s": float(totals[-1]) / seconds}


@torch.no_grad()
def predict(model, batches, recipe: TrainRecipe, device) -> dict[str, Any]:
    """Every worker's boxes found and true, per sample (NumPy; classes from 0), gathered on every rank, with the
    samples' metadata."""
    model.eval()
    slot = background_slot(recipe.model.name)

    def found(x) -> list[dict[str, torch.Tensor]]:
        return [out | {"labels": out["labels"] - slot} for out in model(list(torch.as_tensor(x, device=device)))]

    return _gathered(batches, recipe, found)


@torch.no_grad()
def predict_export(scripted, batches, recipe: TrainRecipe, device) -> dict[str, Any]:
    """:func:`predict` by an export (:func:`save_detector`), one image at a time as ingest applies it."""
    mean, std = torch.tensor(MEAN, device=device).view(3, 1, 1), torch.tensor(STD, device=device).view(3, 1, 1)

    def found(x) -> list[dict[str, torch.Tensor]]:
        with warnings.catch_warnings():  # a scripted torchvision detector notes its (losses, detections) each call
            warnings.filterwarnings("ignore", message=SCRIPTED_NOTE)
            rows = [scripted((image * std + mean)[None])[0] for image in torch.as_tensor(x, device=device)]
        return [{"boxes": r[:, :4], "scores": r[:, 4], "labels": r[:, 5].long()} for r in rows]

    return _gathered(batches, recipe, found, share_errors=True)  # no collectives in an export's forward


def _gathered(batches, recipe: TrainRecipe, find, share_errors: bool = False) -> dict[str, Any]:
    """What ``find`` finds in each batch, with the true boxes, gathered on every rank; ``share_errors`` as
    :func:`training.loop.predict`'s (a failing rank joins the gather, which raises on every rank)."""
    size, by_image = recipe.data.image_size, recipe.data.box_classes == "image"
    found, true, metas, error = [], [], [], None
    try:
        for x, y, m in batches:
            if len(y) == 0:
                continue
            for out, t in zip(find(x), targets(m, y, size, "cpu", by_image), strict=True):
                found.append({k: v.detach().cpu().numpy() for k, v in out.items()})
                true.append({k: v.numpy() for k, v in t.items()})
            metas.extend(m)
    except Exception as exc:
        if not share_errors:
            raise
        error = exc
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"found": found, "true": true, "metas": metas, "error": said(error)})
    raise_any(error, [g["error"] for g in gathered])
    return {k: [s for g in gathered for s in g[k]] for k in ("found", "true", "metas")}


def matches(found: dict, true: dict, threshold: float) -> tuple[int, int, int]:
    """``(hits, false alarms, misses)`` of one image: its boxes scoring at least ``threshold``, best first, each a
    hit where it overlaps a true box of its class not yet hit by :data:`MATCH_IOU`."""
    from torchvision.ops import box_iou

    keep = found["scores"] >= threshold
    order = np.argsort(-found["scores"][keep], kind="stable")
    boxes, labels = found["boxes"][keep][order], found["labels"][keep][order]
    free = np.ones(len(true["boxes"]), bool)
    if len(boxes) and len(true["boxes"]):
        iou = box_iou(torch.as_tensor(boxes), torch.as_tensor(true["boxes"])).numpy()
        for i, label in enumerate(labels):
            candidates = np.where(free & (true["labels"] == label), iou[i], 0.0)
            j = int(candidates.argmax())
            free[j] = free[j] and candidates[j] < MATCH_IOU
    hits = len(true["boxes"]) - int(free.sum())
    return hits, len(boxes) - hits, int(free.sum())


def _tensors(items: list[dict]) -> list[dict[str, torch.Tensor]]:
    return [{k: torch.as_tensor(v) for k, v in item.items()} for item in items]


def metrics(pred: dict[str, Any], classes: list[str], threshold: float, prefix: str = "val_") -> dict[str, float]:
    """COCO's mean average precision (torchmetrics), at IoU 0.5 and over 0.5-0.95, the mean recall of 100 boxes,
    each class's AP at 0.5; and paper 004's precision, recall and F1 of the boxes scoring at least
    ``threshold`` (each a hit where it overlaps a true box of its class by 0.5), with the share of images it gets
    right (``image_accuracy``: a lesion found where there is one, nothing found where there is none; the paper's
    Table 3 gives an accuracy it does not define)."""
    from torchmetrics.detection import MeanAveragePrecision

    from training.metrics import metric_name

    found, true = _tensors(pred["found"]), _tensors(pred["true"])
    coco = MeanAveragePrecision(iou_type="bbox", backend="pycocotools")
    coco.update(found, true)
    got = coco.compute()
    out = {f"{prefix}map": float(got["map"]), f"{prefix}map50": float(got["map_50"]),
           f"{prefix}mar100": float(got["mar_100"])}  # fmt: skip
    at_half = MeanAveragePrecision(iou_type="bbox", class_metrics=True, iou_thresholds=[0.5], backend="pycocotools")
    at_half.update(found, true)
    ap = at_half.compute()
    for c, v in zip(ap["classes"].reshape(-1).tolist(), ap["map_per_class"].reshape(-1).tolist(), strict=True):
        if 0 <= c < len(classes) and v >= 0:  # -1: a class with no true box
            out[f"{prefix}ap50_{metric_name(classes[c])}"] = float(v)
    counts = np.array([matches(f, t, threshold) for f, t in zip(pred["found"], pred["true"], strict=True)])
    counts = counts.reshape(-1, 3).astype(np.int64)
    hits, alarms, misses = counts.sum(0).tolist()
    lesion = counts[:, 0] + counts[:, 2] > 0  # an image with a true box is right where one is hit, one without
    right = np.where(lesion, counts[:, 0] > 0, counts[:, 1] == 0)  # where nothing is found
    out[f"{prefix}image_accuracy"] = float(right.mean()) if len(right) else 0.0
    precision = hits / (hits + alarms) if hits + alarms else 0.0
    recall = hits / (hits + misses) if hits + misses else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return out | {f"{prefix}precision": precision, f"{prefix}recall": recall, f"{prefix}f1": f1}


class YoloLayout(nn.Module):
    """A detector answering as an Ultralytics end-to-end export does: ``[1, 3, H, W]`` in [0, 1] in, ``[1, K, 6]``
    (corners in input pixels, score, class from 0) out."""

    def __init__(self, model: nn.Module, slot: int) -> None:
        super().__init__()
        self.model, self.slot = model, slot  # slot: Faster R-CNN's background class 0 (background_slot)
        self.register_buffer("mean", torch.tensor(MEAN).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = [(x[0] - self.mean) / self.std]
        _, found = self.model(images)  # scripted, a torchvision detector answers (losses, detections)
        d = found[0]
        cls = (d["labels"] - self.slot).to(d["boxes"].dtype)
        return torch.cat([d["boxes"], d["scores"][:, None], cls[:, None]], 1)[None]


def save_detector(model: nn.Module, folder: Path, cfg: ModelConfig, classes: list[str], image_size: int) -> Path:
    """Write ``folder``: ``detector.torchscript``, the model in Ultralytics' end-to-end layout with its metadata
    (``config.txt``: task, input size, class names; ``letterbox`` false: trained on images resized to a square, it
    wants them so), which ``tessera ingest images --detector`` takes; ``model.safetensors`` (its weights) and
    ``model.json`` (what it is)."""
    from safetensors.torch import save_file

    from training.export import MODEL_JSON, WEIGHTS

    folder.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    meta = {"task": "detect", "imgsz": [image_size, image_size], "names": dict(enumerate(classes)),
            "end2end": True, "letterbox": False, "author": "tessera"}  # fmt: skip
    with warnings.catch_warnings():  # torch 2.10+ calls TorchScript deprecated; the ingest side reads it
        warnings.simplefilter("ignore", FutureWarning)
        if cfg.name.startswith(EFFICIENTDET):
            from training.efficientdet import EfficientDetLayout

            scripted = torch.jit.script(EfficientDetLayout(model, MEAN, STD))
        else:
            scripted = torch.jit.script(YoloLayout(model, background_slot(cfg.name)))
    scripted.save(str(folder / EXPORT), _extra_files={"config.txt": json.dumps(meta)})
    desc = {"model": cfg.name, "model_config": cfg.model_dump() | {"pretrained": False}, "task": "detect",
            "classes": classes, "outputs": classes, "image_size": image_size, "torchscript": EXPORT,
            "format": "tessera-detector-v1"}  # fmt: skip
    (folder / MODEL_JSON).write_text(json.dumps(desc, indent=1))
    return folder


def detections_table(pred: dict[str, Any], classes: list[str], threshold: float, size: int) -> str:
    """Each image's true boxes and the boxes found scoring at least ``threshold`` (CSV; corners normalised from
    the ``size`` px input, each with its class, a found one with its score), and its hits, false alarms and
    misses: where the detector goes wrong."""
    import csv
    import io

    def listed(d: dict) -> str:
        pairs = zip(d["boxes"], d["labels"], strict=True)
        rows = [[*(round(float(v) / size, 4) for v in b), classes[int(c)]] for b, c in pairs]
        if "scores" in d:
            rows = [[*r, round(float(s), 4)] for r, s in zip(rows, d["scores"], strict=True)]
        return json.dumps(rows)

    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["image", "patient", "true_boxes", "found_boxes", "hits", "false_alarms", "misses"])
    for meta, f, t in zip(pred["metas"], pred["found"], pred["true"], strict=True):
        kept = {k: v[f["scores"] >= threshold] for k, v in f.items()}
        w.writerow([meta.get("image"), meta.get("patient"), listed(t), listed(kept), *matches(f, t, threshold)])
    return out.getvalue()


def load_detector(folder: Path) -> tuple[torch.jit.ScriptModule, dict]:
    """The TorchScript detector and description :func:`save_detector` wrote in ``folder``."""
    from training.export import MODEL_JSON

    desc = json.loads((folder / MODEL_JSON).read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(folder / desc.get("torchscript", EXPORT)), map_location="cpu").eval(), desc
