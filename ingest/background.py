"""Second tissue stage (paper 000): a tile classifier that drops tiles it calls background.

Loads either a TorchScript module (input ``float[N, 3, S, S]`` ImageNet-normalised, output class logits) or a
Tessera model export (a folder with ``model.json`` and ``model.ts``, as training writes, e.g. from the
``strip_ai_background`` recipe). Loaded once per ingest actor, applied in batches.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import torch

T = TypeVar("T")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


class BackgroundFilter:
    """Keeps tiles whose background probability is below ``threshold``.

    Args:
        path: TorchScript file, or a Tessera export folder (``model.json`` + ``model.ts``).
        threshold: drop a tile when P(background) >= this.
        background_class: index of the background class for TorchScript models (exports name theirs).
        input_size: model input size for TorchScript models (exports record theirs).
    """

    def __init__(
        self, path: str, threshold: float = 0.5, background_class: int = 0, input_size: int = 128, batch: int = 64
    ) -> None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"background model {path}: no such file or folder")
        if p.is_dir():  # a Tessera export: TorchScript plus its description
            desc = json.loads((p / "model.json").read_text())
            self.model = torch.jit.load(str(p / "model.ts"), map_location="cpu").eval()
            names = [c.lower() for c in desc["classes"]]
            if "background" not in names:
                raise ValueError(f"background model classes {desc['classes']} have no 'background'")
            self.background_class, self.input_size = names.index("background"), int(desc["image_size"])
        else:
            try:
                self.model = torch.jit.load(str(p), map_location="cpu").eval()
            except (RuntimeError, ValueError) as exc:
                why = f"not TorchScript nor a Tessera export folder ({exc})"
                raise ValueError(f"background model {path}: {why}") from exc
            self.background_class, self.input_size = background_class, input_size
        self.threshold = threshold
        self.batch = batch

    def _tensor(self, tiles: list[np.ndarray]) -> torch.Tensor:
        s = self.input_size
        x = np.stack([cv2.resize(t, (s, s), interpolation=cv2.INTER_AREA) for t in tiles]).astype(np.float32)
        x = (x / 255.0 - MEAN) / STD
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def background_prob(self, tiles: list[np.ndarray]) -> np.ndarray:
        """P(background) of each ``uint8[H, W, 3]`` tile."""
        logits = self.model(self._tensor(tiles))
        return torch.softmax(logits.float(), dim=1)[:, self.background_class].numpy()

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
