"""Model export for use outside training: safetensors weights, a traced TorchScript module and a JSON
description, so that consumers (ingest's background filter, serving) need neither timm nor Tessera's code."""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from shards.schema import scale_ratio
from training.config import ModelConfig
from training.console import debugging

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


@contextlib.contextmanager
def quiet_tracing() -> Iterator[None]:
    """Tracing's own chatter left out: TracerWarnings about shape checks that the traced input size makes
    constant (:func:`traced_differs` checks the result instead), and what scanning a transformers model's
    attributes sets off (deprecated properties' FutureWarnings, a note on a language-model loss it never uses).
    All of it shows with ``TESSERA_DEBUG`` set."""
    if debugging():
        yield
        return
    chatty = logging.getLogger("transformers")
    level = chatty.level
    chatty.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        chatty.setLevel(level)


def traced_differs(model: torch.nn.Module, traced: torch.nn.Module, shape: tuple[int, ...]) -> float | None:
    """The largest difference between ``traced`` and ``model`` on a random input of ``shape``, if they differ
    (a branch on the data, which a trace records as taken once); None when they agree."""
    probe = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), pytorch_linear():
        want, got = model(probe), traced(probe)
    return None if torch.allclose(got, want, rtol=1e-3, atol=1e-4) else float((got - want).abs().max())


def save_export(
    model: torch.nn.Module,
    folder: Path,
    model_cfg: ModelConfig,
    classes: list[str],
    image_size: int,
    frames: int = 0,
    outputs: list[str] | None = None,
    tile_um: float | None = None,
) -> Path:
    """Write ``model.safetensors``, ``model.ts`` and ``model.json`` (model config, classes, input shape).

    ``outputs`` names the logits of a multi-label model (one sigmoid each); otherwise they are ``classes``
    (softmax). ``tile_um``: the width of specimen its training images showed (:func:`tile_width_um`), for a user
    of a tile classifier to read tiles of the same scale.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    shape = (1, frames, 3, image_size, image_size) if frames else (1, 3, image_size, image_size)
    with torch.no_grad(), pytorch_linear(), quiet_tracing():
        traced = torch.jit.trace(model, torch.zeros(shape), check_trace=False)
    traced.save(str(folder / TORCHSCRIPT))
    if (diff := traced_differs(model, traced, shape)) is not None:
        warnings.warn(
            f"{folder / TORCHSCRIPT} differs from the model by up to {diff:.3g} on a random input (the trace took one "
            f"branch of a decision on the data): load {WEIGHTS} with the model's code instead",
            RuntimeWarning,
            stacklevel=2,
        )
    desc = {
        "model": model_cfg.name,
        "model_config": model_cfg.model_dump() | {"pretrained": False, "freeze": "none"},
        "classes": classes,
        "outputs": outputs or classes,
        "activation": "sigmoid" if outputs else "softmax",
        "image_size": image_size,
        "frames": frames,
        "tile_um": tile_um,
        "format": "tessera-model-v2",
    }
    (folder / MODEL_JSON).write_text(json.dumps(desc, indent=1))
    return folder


def tile_width_um(metas: list[dict], ingest_options: dict) -> float | None:
    """The median width in µm of specimen the samples ``metas`` show: each one's ``width_um`` (slide tiles, and
    images ingested with ``--mpp``), or, in a dataset ingested before samples recorded it, the tile's stored µm/px
    times the stored size its ingest options give; None where no sample has a scale."""
    from training.metas import values

    stored = ingest_options.get("store_size") or ingest_options.get("tile_size")
    pairs = zip(values(metas, "width_um"), values(metas, "mpp"), strict=True)
    widths = [width or mpp * stored for width, mpp in pairs if width or (stored and mpp)]
    return round(statistics.median(widths), 1) if widths else None


def scale_difference(
    trained_um: float | None, seen_um: float | None, so: str = "the metrics measure it at a scale it was not trained on"
) -> str | None:
    """A warning when samples showing ``seen_um`` µm of specimen each (:func:`tile_width_um`) are of another scale
    (:func:`shards.schema.scale_ratio`) than the ``trained_um`` a model's training samples showed: its metrics
    there measure it at a scale it never saw (``so``: what follows, for calls without metrics). None where they
    agree or either is unknown."""
    if (ratio := scale_ratio(trained_um, seen_um)) is None:
        return None
    return (
        f"these samples show {seen_um:.0f} µm of specimen each and the model's training samples {trained_um:.0f} µm "
        f"({ratio:.2g}x): {so}"
    )


def samples_scale_warning(desc: dict, metas: list[dict], ingest_options: dict, **so: str) -> str | None:
    """:func:`scale_difference` of the samples ``metas`` (:func:`tile_width_um`, with their dataset's
    ``ingest_options``) from the export ``desc``'s training samples (its ``tile_um``)."""
    return scale_difference(desc.get("tile_um"), tile_width_um(metas, ingest_options), **so)


def export_outputs(desc: dict) -> list[str]:
    """The names of an export's outputs (its ``model.json``): its classes, or multi-label names."""
    return list(desc.get("outputs") or desc["classes"])


def class_map(model_outputs: list[str], outputs: list[str], dataset: str, task: str = "multiclass") -> list[int] | None:
    """Each of a dataset's class indices -> the model's index of that class, where a classifier's dataset holds
    its classes in another order or some of them alone (an external cohort of one class); None where they are the
    model's, in order. Refuses a class the model does not know, and other label names than a multi-label model's."""
    if list(model_outputs) == list(outputs):
        return None
    if task == "multiclass" and outputs and set(outputs) <= set(model_outputs):
        return [list(model_outputs).index(c) for c in outputs]
    some = ", nor some of them" if task == "multiclass" else ""
    raise ValueError(f"{dataset}: its classes {outputs} are not the model's {model_outputs}{some}")


def load_export(folder: Path) -> tuple[torch.nn.Module, dict]:
    """The model and its description from :func:`save_export`'s folder, in eval mode on the CPU."""
    from safetensors.torch import load_file

    from training.models import build_model

    desc = json.loads((folder / MODEL_JSON).read_text())
    cfg = ModelConfig.model_validate(desc.get("model_config") or {"name": desc["model"]})
    model = build_model(cfg, len(export_outputs(desc)), desc.get("frames", 0), desc["image_size"])
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model.eval(), desc
