"""Model checkpoints of random weights, saved as a user's local files are, for the tests of the code that loads
them (nothing is downloaded here)."""

from __future__ import annotations


def tiny_sam(folder) -> str:
    """A SAM checkpoint of random weights, small enough for a test, saved as a user's local folder is."""
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    torch.manual_seed(0)
    vision = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_dim": 64, "image_size": 256,
              "output_channels": 32, "window_size": 4, "global_attn_indexes": [1], "num_pos_feats": 16}  # fmt: skip
    config = SamConfig(
        vision_config=vision,
        prompt_encoder_config={"hidden_size": 32, "image_size": 256, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_dim": 64,
                             "iou_head_hidden_dim": 32},
    )  # fmt: skip
    SamModel(config).save_pretrained(folder)
    processor = SamImageProcessor(size={"longest_edge": 256}, pad_size={"height": 256, "width": 256})
    SamProcessor(image_processor=processor).save_pretrained(folder)
    return str(folder)


def yolo_export(path, names: list[str], imgsz: int = 64, end2end: bool = False, task: str = "detect") -> str:
    """A TorchScript module in the layout of an Ultralytics detection export (``yolo export format=torchscript``):
    its metadata in ``config.txt``, its output ``[1, 4 + classes, anchors]`` (centre, size, class scores) or, an
    end-to-end model's, ``[1, K, 6]``. Hand-made rather than trained: it answers with the box around the input's
    bright pixels (a synthetic lesion) as class 0 at score 0.9, a weaker near-copy of it (for suppression to
    remove; an end-to-end model leaves none) and a box scoring under any threshold; nothing on an image without
    bright pixels."""
    import json
    import warnings

    import torch
    from torch import nn

    class BrightBox(nn.Module):
        def __init__(self, classes: int, end2end: bool) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(1))
            self.classes, self.end2end = classes, end2end

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bright = x[0].mean(0) * self.gain > 0.7
            boxes = torch.zeros(3, 6)  # x0, y0, x1, y1, score, class
            if bool(bright.any()):
                ys = torch.nonzero(bright.any(1)).flatten().float()
                xs = torch.nonzero(bright.any(0)).flatten().float()
                found = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                boxes[0, :4], boxes[0, 4] = found, 0.9
                boxes[1, :4], boxes[1, 4] = found + 0.5, 0.6
                boxes[2, :4], boxes[2, 4] = torch.tensor([2.0, 2.0, 9.0, 9.0]), 0.05
            if self.end2end:  # such a model suppresses its near-copies itself
                boxes[1, 4] = 0.0
                return boxes[None]
            out = torch.zeros(1, 4 + self.classes, 8)
            out[0, 0, :3] = (boxes[:, 0] + boxes[:, 2]) / 2
            out[0, 1, :3] = (boxes[:, 1] + boxes[:, 3]) / 2
            out[0, 2, :3] = boxes[:, 2] - boxes[:, 0]
            out[0, 3, :3] = boxes[:, 3] - boxes[:, 1]
            out[0, 4, :3] = boxes[:, 4]
            return out

    meta = {"task": task, "imgsz": [imgsz, imgsz], "names": dict(enumerate(names)), "stride": 32, "batch": 1}
    with warnings.catch_warnings():  # torch 2.10+ calls TorchScript deprecated; Ultralytics still exports it
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(BrightBox(len(names), end2end))
    scripted.save(str(path), _extra_files={"config.txt": json.dumps(meta)})
    return str(path)
