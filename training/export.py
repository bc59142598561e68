"""Model export for use outside training: safetensors weights, a traced TorchScript module and a JSON
description, so that consumers (ingest's background filter, serving) need neither timm nor Tessera's code."""

from __future__ import annotations

import json
from pathlib import Path

import torch

MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"
TORCHSCRIPT = "model.ts"


def save_export(model: torch.nn.Module, folder: Path, name: str, classes: list[str], image_size: int) -> Path:
    """Write ``model.safetensors``, ``model.ts`` and ``model.json`` (timm name, classes, input size)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.zeros(1, 3, image_size, image_size))
    traced.save(str(folder / TORCHSCRIPT))
    desc = {"model": name, "classes": classes, "image_size": image_size, "format": "tessera-timm-v1"}
    (folder / MODEL_JSON).write_text(json.dumps(desc, indent=1))
    return folder


def load_export(folder: Path) -> tuple[torch.nn.Module, dict]:
    """The model and its description from :func:`save_export`'s folder, in eval mode on the CPU."""
    from safetensors.torch import load_file

    from training.models import build_model

    desc = json.loads((folder / MODEL_JSON).read_text())
    model = build_model(desc["model"], len(desc["classes"]))
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model.eval(), desc
