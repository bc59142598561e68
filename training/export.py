"""Model export for use outside training: safetensors weights, a traced TorchScript module and a JSON
description, so that consumers (ingest's background filter, serving) need neither timm nor Tessera's code."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from training.config import ModelConfig

MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"
TORCHSCRIPT = "model.ts"


@contextlib.contextmanager
def pytorch_linear() -> Iterator[None]:
    """PyTorch's own ``torch.nn.functional.linear`` for the duration: a ZeRO-3 engine replaces it for the whole
    process with an autograd Function of DeepSpeed's (it keeps activations, not weights, for backward), and
    tracing cannot export that Function into TorchScript."""
    current = torch.nn.functional.linear
    torch.nn.functional.linear = torch._C._nn.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = current


def save_export(
    model: torch.nn.Module,
    folder: Path,
    model_cfg: ModelConfig,
    classes: list[str],
    image_size: int,
    frames: int = 0,
    outputs: list[str] | None = None,
) -> Path:
    """Write ``model.safetensors``, ``model.ts`` and ``model.json`` (model config, classes, input shape).

    ``outputs`` names the logits of a multi-label model (one sigmoid each); otherwise they are ``classes``
    (softmax).
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    shape = (1, frames, 3, image_size, image_size) if frames else (1, 3, image_size, image_size)
    with torch.no_grad(), pytorch_linear():
        traced = torch.jit.trace(model, torch.zeros(shape), check_trace=False)
    traced.save(str(folder / TORCHSCRIPT))
    desc = {
        "model": model_cfg.name,
        "model_config": model_cfg.model_dump() | {"pretrained": False, "freeze": "none"},
        "classes": classes,
        "outputs": outputs or classes,
        "activation": "sigmoid" if outputs else "softmax",
        "image_size": image_size,
        "frames": frames,
        "format": "tessera-model-v2",
    }
    (folder / MODEL_JSON).write_text(json.dumps(desc, indent=1))
    return folder


def load_export(folder: Path) -> tuple[torch.nn.Module, dict]:
    """The model and its description from :func:`save_export`'s folder, in eval mode on the CPU."""
    from safetensors.torch import load_file

    from training.models import build_model

    desc = json.loads((folder / MODEL_JSON).read_text())
    cfg = ModelConfig.model_validate(desc.get("model_config") or {"name": desc["model"]})
    model = build_model(cfg, len(desc.get("outputs") or desc["classes"]), desc.get("frames", 0), desc["image_size"])
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model.eval(), desc
