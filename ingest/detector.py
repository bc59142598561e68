"""Paper 004's first stage: a YOLO detector finds each image's lesions, whose boxes then crop (and segment) it.

Paper 004 trains YOLOv8 on the dataset that has boxes and applies it to the one that has none (its classifier's,
7,023 images). The detector is Ultralytics' TorchScript export (``yolo export model=best.pt format=torchscript``):
a module of a fixed input size that carries its metadata (``config.txt``: ``task``, ``imgsz``, ``names``). Its
output is either YOLOv8/v11's ``[B, 4 + classes, anchors]`` (centre, width and height in input pixels, then each
class's probability; non-maximum suppression is the caller's) or an end-to-end model's ``[B, K, 6]`` (corners,
score, class; suppressed already). Images are letterboxed as Ultralytics does (the longer side scaled to the
input, the rest padded grey, centred), so that the model sees what it was trained on; a detector Tessera trained
(``task: detect``, :mod:`training.detection`) says in its metadata that its images were resized to a square.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
import torch

from ingest.images import Box
from ingest.model_files import ModelFiles, fetch_model, get_model
from shards.cpu_kernels import resized

PAD = 114  # the grey Ultralytics pads letterboxed images with
MAX_BOXES = 300  # per image, as Ultralytics keeps at most
METADATA = "config.txt"  # the TorchScript extra file Ultralytics writes its metadata to
SCRIPTED_NOTE = r".*always returns a \(Losses, Detections\) tuple in scripting"  # torchvision's, each call


@dataclass(frozen=True)
class Letterbox:
    """How an image was placed in the model's input: resized by ``scale_x``, ``scale_y`` (the rounded size over
    the image's: the aspect is kept up to a pixel), then shifted by ``left``, ``top`` px."""

    scale_x: float
    scale_y: float
    left: int
    top: int


def letterbox(rgb: np.ndarray, height: int, width: int) -> tuple[np.ndarray, Letterbox]:
    """``rgb`` scaled (aspect kept) to fit ``height`` x ``width`` and centred on grey padding, as Ultralytics'
    ``LetterBox`` with a fixed shape; with the placement, for :func:`to_image`."""
    h, w = rgb.shape[:2]
    scale = min(height / h, width / w)
    new_w, new_h = max(round(w * scale), 1), max(round(h * scale), 1)  # a thin image keeps a pixel
    if (new_w, new_h) != (w, h):
        rgb = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    dw, dh = (width - new_w) / 2, (height - new_h) / 2
    top, left = round(dh - 0.1), round(dw - 0.1)  # an odd padding's extra pixel goes below and right, as theirs
    out = cv2.copyMakeBorder(
        rgb, top, height - new_h - top, left, width - new_w - left, cv2.BORDER_CONSTANT, value=(PAD, PAD, PAD)
    )
    return out, Letterbox(new_w / w, new_h / h, left, top)


def to_image(xyxy: np.ndarray, placed: Letterbox, width: int, height: int) -> np.ndarray:
    """Boxes ``[K, 4]`` in the model's input pixels back to the image's (``width`` x ``height``), clipped to it."""
    scale = [placed.scale_x, placed.scale_y, placed.scale_x, placed.scale_y]
    out = (xyxy - [placed.left, placed.top, placed.left, placed.top]) / scale
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out


def stretched(rgb: np.ndarray, height: int, width: int) -> tuple[np.ndarray, Letterbox]:
    """``rgb`` resized to the square ``height`` x ``width`` whatever its aspect, by the loaders' own resize
    (:func:`shards.cpu_kernels.resized`), as they resized a Tessera detector's training images; with the placement,
    for :func:`to_image`."""
    if height != width:
        raise ValueError(f"a detector of images resized to a square takes a square input, not {height}x{width}")
    h, w = rgb.shape[:2]
    return resized(rgb, width), Letterbox(width / w, height / h, 0, 0)


def decode(
    raw: torch.Tensor, classes: int, confidence: float, iou: float, end2end: bool | None = None
) -> tuple[np.ndarray, ...]:
    """One image's detections ``(xyxy[K, 4], scores[K], class ids[K])`` in input pixels, best first, from a YOLO
    output: ``[4 + classes, anchors]`` (boxes above ``confidence``, suppressed per class at ``iou``) or an
    end-to-end ``[K, 6]`` (above ``confidence``); ``end2end`` says which (the export's metadata), None: by the
    shape."""
    from torchvision.ops import batched_nms

    raw = raw.float()
    if raw.ndim == 2 and raw.shape[0] == 4 + classes and not end2end:
        rows = raw.T
        scores, ids = rows[:, 4:].max(dim=1)
        keep = scores > confidence
        cxcywh, scores, ids = rows[keep, :4], scores[keep], ids[keep]
        half = cxcywh[:, 2:] / 2
        xyxy = torch.cat([cxcywh[:, :2] - half, cxcywh[:, :2] + half], dim=1)
        best = batched_nms(xyxy, scores, ids, iou)[:MAX_BOXES]  # sorted by score
        xyxy, scores, ids = xyxy[best], scores[best], ids[best]
    elif raw.ndim == 2 and raw.shape[1] == 6 and end2end is not False:
        rows = raw[raw[:, 4] > confidence]
        rows = rows[rows[:, 4].argsort(descending=True)][:MAX_BOXES]
        xyxy, scores, ids = rows[:, :4], rows[:, 4], rows[:, 5].long()
    else:
        raise ValueError(
            f"output of shape {list(raw.shape)} is neither YOLO's [4 + {classes} classes, anchors] nor an "
            "end-to-end model's [boxes, 6]"
        )
    return xyxy.numpy(), scores.numpy(), ids.numpy()


def load_export(torchscript: bytes, source: str, device: str = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """A TorchScript export on ``device`` and its Ultralytics metadata, loaded once; a ``ValueError`` naming
    ``source`` where the file is not TorchScript, or not a YOLO detection export."""
    import torchvision  # noqa: F401  # its operators (nms), which a scripted torchvision detector calls

    extra = {METADATA: ""}
    try:
        with warnings.catch_warnings():  # torch 2.10+ calls TorchScript deprecated
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(io.BytesIO(torchscript), map_location=device, _extra_files=extra)
    except (RuntimeError, ValueError) as exc:
        why = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ValueError(f"detector {source}: not TorchScript that loads here ({why})") from None
    try:
        meta = json.loads(extra[METADATA]) if extra[METADATA] else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or "imgsz" not in meta or "names" not in meta:
        raise ValueError(
            f"detector {source}: TorchScript without Ultralytics' metadata ({METADATA} with imgsz and names); "
            "export the model with `yolo export model=best.pt format=torchscript`"
        )
    if meta.get("task", "detect") != "detect":
        raise ValueError(f"detector {source}: a YOLO {meta['task']} model, not a detection one")
    return module.eval(), meta


def read_metadata(torchscript: bytes, source: str) -> dict:
    """The Ultralytics metadata inside a TorchScript export (:func:`load_export`'s checks)."""
    return load_export(torchscript, source)[1]


class YoloDetector:
    """A YOLO TorchScript export applied to one image at a time: boxes above ``confidence``, suppressed at ``iou``
    (Ultralytics' prediction defaults: 0.25 and 0.7)."""

    def __init__(self, model: ModelFiles, confidence: float = 0.25, iou: float = 0.7, device: str = "cpu") -> None:
        self.model, meta = load_export(model.torchscript, model.source, device)
        size = meta["imgsz"]
        self.height, self.width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        names = meta["names"]  # {"0": "tumor"} (JSON keys), or a list
        self.names = [str(names[k]) for k in sorted(names, key=int)] if isinstance(names, dict) else list(names)
        params = list(self.model.parameters())
        self.dtype = params[0].dtype if params else torch.float32  # a half-precision export takes halves
        self.confidence, self.iou, self.device = confidence, iou, device
        self.end2end = meta.get("end2end")  # Ultralytics records it; None: told by the output's shape
        self.place = letterbox if meta.get("letterbox", True) else stretched  # a Tessera export's: stretched

    @torch.no_grad()
    def boxes(self, rgb: np.ndarray) -> list[tuple[Box, float]]:
        """The lesions in ``rgb`` (``uint8[H, W, 3]``) as normalised boxes labelled with the detector's class
        name, each with its score; best first."""
        h, w = rgb.shape[:2]
        placed_rgb, placed = self.place(rgb, self.height, self.width)
        x = torch.from_numpy(placed_rgb).permute(2, 0, 1)[None].to(self.device, self.dtype) / 255.0
        with warnings.catch_warnings():  # a scripted torchvision detector's note, on every call
            warnings.filterwarnings("ignore", message=SCRIPTED_NOTE)
            out = self.model(x)
        out = out[0] if isinstance(out, tuple | list) else out  # some exports return (detections, features)
        xyxy, scores, ids = decode(out[0].cpu(), len(self.names), self.confidence, self.iou, self.end2end)
        xyxy = to_image(xyxy, placed, w, h)
        found = []
        for (x0, y0, x1, y1), score, cls in zip(xyxy.tolist(), scores.tolist(), ids.tolist(), strict=True):
            if x1 > x0 and y1 > y0:  # a box wholly in the padding is nothing of the image
                name = self.names[int(cls)] if 0 <= int(cls) < len(self.names) else str(int(cls))
                found.append((Box(x0 / w, y0 / h, x1 / w, y1 / h, name), round(score, 4)))
        return found


def read_checked(ref: str) -> ModelFiles:
    """The detector at ``ref``, read and loaded once on the driver: a wrong reference or file fails the run before
    it starts, with its reason; the workers get these bytes."""
    model = fetch_model(ref, "detector")
    read_metadata(model.torchscript, model.source)
    return model


@lru_cache(maxsize=1)
def detector_at(url: str, source: str, sha256: str, confidence: float, iou: float, device: str) -> YoloDetector:
    """The run's detector as its driver staged it at ``url`` (one per worker process, loaded at its first image)."""
    return YoloDetector(get_model(url, source, sha256, "detector"), confidence, iou, device)
