"""Meta's Segment Anything (SAM) prompted with boxes, through ``transformers``: paper 004 segments each detected
lesion with it. A checkpoint is a local folder (``SamModel.save_pretrained``'s: ``config.json``, the weights and
``preprocessor_config.json``) or a hub name such as ``facebook/sam-vit-base``, read from the hub's cache."""

from __future__ import annotations

import numpy as np


def _loaded(ref: str, what):
    try:
        return what.from_pretrained(ref)
    except (OSError, ValueError) as exc:  # no such folder, or the hub cannot be reached and nothing is cached
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"SAM model {ref!r} cannot be loaded: {reason}") from None


def check_sam(ref: str) -> str:
    """The model type of the SAM checkpoint ``ref`` from its configuration alone (read on the driver before any
    work, so a wrong name fails the run at once rather than every image); raises ``ValueError`` naming it."""
    from transformers import AutoConfig

    config = _loaded(ref, AutoConfig)
    if config.model_type != "sam":
        raise ValueError(f"SAM model {ref!r} is a {config.model_type!r} checkpoint, not a Segment Anything one")
    return config.model_type


class SamSegmenter:
    """:class:`ingest.lesion.Segmenter` by SAM: every box of an image in one pass of the image encoder, one mask per
    box (SAM's single-mask output, the one it recommends for box prompts)."""

    def __init__(self, ref: str, device: str = "cpu") -> None:
        from transformers import SamModel, SamProcessor

        check_sam(ref)
        self.model = _loaded(ref, SamModel).eval().to(device)
        self.processor = _loaded(ref, SamProcessor)
        self.device = device

    def masks(self, rgb: np.ndarray, rects: list[tuple[int, int, int, int]]) -> list[np.ndarray]:
        import torch

        if not rects:
            return []
        boxes = [[[float(v) for v in r] for r in rects]]
        inputs = self.processor(images=rgb, input_boxes=boxes, return_tensors="pt")
        with torch.inference_mode():
            out = self.model(**inputs.to(self.device), multimask_output=False)
        (masks,) = self.processor.image_processor.post_process_masks(
            out.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
        )  # bool[boxes, 1, H, W]
        return [m[0].numpy().astype(bool) for m in masks]
