"""Second tissue stage (paper 000): a tile classifier that drops tiles it calls background.

Takes either a TorchScript module (input ``float[N, 3, S, S]`` ImageNet-normalised, output class logits) or a
Tessera model export (``model.json`` and ``model.ts``, as training writes, e.g. from the ``strip_ai_background``
recipe), as the bytes :func:`ingest.model_files.fetch_model` read once on the driver: every actor, on whatever
node, builds its filter from them. Applied in batches.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

import cv2
import numpy as np
import torch

from ingest.model_files import ModelFiles, fetch_model
from shards.dali import IMAGENET_MEAN, IMAGENET_STD

T = TypeVar("T")
MEAN = (np.array(IMAGENET_MEAN) / 255).astype(np.float32)  # the loaders' normalisation, for images in [0, 1]
STD = (np.array(IMAGENET_STD) / 255).astype(np.float32)


class BackgroundFilter:
    """Keeps tiles whose background probability is below ``threshold``.

    Args:
        model: the classifier's files (:class:`ModelFiles`).
        threshold: drop a tile when P(background) >= this.
        background_class: index of the background class for TorchScript models (exports name theirs).
        input_size: model input size for TorchScript models (exports record theirs).
        device: where the model runs (``cuda`` on an actor that holds a GPU).
    """

    def __init__(
        self,
        model: ModelFiles,
        threshold: float = 0.5,
        background_class: int = 0,
        input_size: int = 128,
        batch: int = 64,
        device: str = "cpu",
    ) -> None:
        self.sigmoid, self.tile_um = False, model.tile_um
        if desc := model.description:  # a Tessera export: TorchScript plus its description
            names = [c.lower() for c in desc.get("outputs") or desc["classes"]]
            if "background" not in names:
                raise ValueError(f"background model {model.source}: its classes {names} have no 'background'")
            if desc.get("frames"):
                raise ValueError(f"background model {model.source}: a model of slice sequences, not of tiles")
            background_class, input_size = names.index("background"), int(desc["image_size"])
            self.sigmoid = desc.get("activation") == "sigmoid"  # one of a multi-label model's outputs
        try:
            with warnings.catch_warnings():  # torch 2.10+ calls TorchScript deprecated, in each actor's output
                warnings.simplefilter("ignore", FutureWarning)
                self.model = torch.jit.load(io.BytesIO(model.torchscript), map_location=device).eval()
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"background model {model.source}: not TorchScript ({exc})") from exc
        self.background_class, self.input_size, self.device = background_class, input_size, device
        self.threshold = threshold
        self.batch = batch
        self.dropped: list[T] = []  # what it called background, since the caller last cleared it

    def _tensor(self, tiles: list[np.ndarray]) -> torch.Tensor:
        s = self.input_size
        x = np.stack([cv2.resize(t, (s, s), interpolation=cv2.INTER_AREA) for t in tiles]).astype(np.float32)
        x = (x / 255.0 - MEAN) / STD
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(self.device)

    @torch.no_grad()
    def background_prob(self, tiles: list[np.ndarray]) -> np.ndarray:
        """P(background) of each ``uint8[H, W, 3]`` tile."""
        logits = self.model(self._tensor(tiles)).float()
        if self.sigmoid:
            return torch.sigmoid(logits[:, self.background_class]).cpu().numpy()
        return torch.softmax(logits, dim=1)[:, self.background_class].cpu().numpy()

    def filter(self, items: Iterable[tuple[T, np.ndarray]]) -> Iterator[tuple[T, np.ndarray]]:
        """Pass through the ``(tag, rgb)`` items the model does not call background, batch by batch."""
        buf: list[tuple[T, np.ndarray]] = []
        for item in items:
            buf.append(item)
            if len(buf) == self.batch:
                yield from self._keep(buf)
                buf = []
        if buf:
            yield from self._keep(buf)

    def _keep(self, buf: list[tuple[T, np.ndarray]]) -> Iterator[tuple[T, np.ndarray]]:
        probs = self.background_prob([rgb for _, rgb in buf])
        for (tag, rgb), p in zip(buf, probs, strict=True):
            if p < self.threshold:
                yield tag, rgb
            else:
                self.dropped.append(tag)


def read_checked(ref: str, threshold: float) -> ModelFiles:
    """The classifier at ``ref``, read and loaded once on the driver: a wrong reference or file fails the run
    before it starts, with its reason, rather than every worker as it is created; the workers get these bytes."""
    model = fetch_model(ref)
    BackgroundFilter(model, threshold)
    return model
