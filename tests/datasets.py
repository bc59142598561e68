"""Tiny shard datasets with manifests, written with the real shard writer, for training and loader tests.

Class ``c`` images are brighter with ``c`` (plus noise), so a model can learn them in a few steps.
"""

from __future__ import annotations

import numpy as np

from shards import manifest as mf
from shards import storage
from shards.schema import encode_image, make_sample
from shards.writer import ShardWriter

RSNA = ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]


def _image(rng, label: int, classes: int, size: int) -> bytes:
    level = 40 + 170 * label / max(1, classes - 1)
    rgb = np.clip(rng.normal(level, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    return encode_image(rgb, "png")


def _boxed(rng, label: int, size: int) -> tuple[bytes, list]:
    """A dim image with, unless of class 0 (no lesion), a bright square somewhere; its box, normalised."""
    rgb = np.clip(rng.normal(50, 10, (size, size, 3)), 0, 255).astype(np.uint8)
    if label == 0:
        return encode_image(rgb, "png"), []
    side = int(size * rng.uniform(0.25, 0.45))
    x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
    rgb[y0 : y0 + side, x0 : x0 + side] = 230
    return encode_image(rgb, "png"), [[x0 / size, y0 / size, (x0 + side) / size, (y0 + side) / size, str(label)]]


def _site(patient: str, sites: int) -> str:
    """The site of ``patient`` (``<split>p<n>``) of ``sites`` in turn."""
    return str(int(patient.rsplit("p", 1)[1]) % sites + 1)


def make_dataset(
    prefix: str,
    splits: dict[str, int] | None = None,
    classes: int = 2,
    size: int = 32,
    frames: int = 0,
    multilabel: bool = False,
    samples_per_patient: int = 4,
    shard_samples: int = 6,
    seed: int = 0,
    per_sample_labels: bool = False,
    width_um: float | None = None,
    labelled: bool = True,
    boxes: bool = False,
    sites: int = 0,
) -> mf.Manifest:
    """Write shards (``shard_samples`` per shard) and a manifest under ``prefix``; patients are per split.

    ``per_sample_labels``: each sample draws its own label, as slices labelled one by one (RSNA, CT-ICH), and a
    patient's input is labelled positive when any of its samples is, as ingest labels a series. ``width_um``: the
    µm of specimen each sample records it shows, as slide tiles do. Not ``labelled``: samples without ``.cls``
    and a manifest without classes, as ingest makes of inputs without a label table (the images still differ by
    the class drawn for them). ``boxes``: each image of a class but the first holds a bright square, its box in
    the metadata, as ``tessera ingest images --boxes`` records them (a detector's dataset). ``sites``: the
    patients of each split take sites "1", "2"... in turn, as a label table's ``center_id`` gives them."""
    rng = np.random.default_rng(seed)
    manifest = mf.Manifest(
        dataset=prefix,
        kind="test",
        classes=[f"class{c}" for c in range(classes)],
        multilabel=RSNA if multilabel else None,
    )
    if multilabel:
        manifest.classes = ["no hemorrhage", "hemorrhage"]
    for split, n in (splits or {"train": 24, "val": 12}).items():
        infos, patients = [], {}
        for start in range(0, n, shard_samples):
            with ShardWriter(storage.join(prefix, split), start_index=len(infos)) as w:
                for i in range(start, min(n, start + shard_samples)):
                    patient = f"{split}p{i // samples_per_patient}"
                    # drawn only when needed, so that the default datasets stay as they were
                    new = per_sample_labels or patient not in patients
                    label = int(rng.integers(classes)) if new else patients[patient]
                    patients[patient] = max(label, patients.get(patient, 0))
                    vector = [label] + [int(label and rng.random() < 0.5) for _ in RSNA[1:]] if multilabel else None
                    images = [_image(rng, label, classes, size) for _ in range(max(1, frames))]
                    meta = {"patient": patient, "slide": f"{patient}s", "series": f"{patient}s", "label": label}
                    if boxes:
                        images[0], meta["boxes"] = _boxed(rng, label, size)
                    if vector:
                        meta["labels"] = vector
                    if width_um:
                        meta["width_um"] = width_um
                    if sites:
                        meta["site"] = _site(patient, sites)
                    if not labelled:
                        meta = {k: v for k, v in meta.items() if k not in ("label", "labels")}
                    cls = label if labelled else None
                    w.write(make_sample(f"{split}_{i:05d}", images if frames else images[0], "png", cls, meta))
            infos += w.shards
        manifest.splits[split] = mf.SplitInfo(num_samples=n, shards=infos)
        for patient, label in patients.items():
            manifest.inputs.append(
                mf.InputRecord(
                    id=patient,
                    kind="test",
                    status="ingested",
                    patient=patient,
                    label=label if labelled else None,
                    split=split,
                    site=_site(patient, sites) if sites else None,
                    samples=sum(1 for i in range(n) if f"{split}p{i // samples_per_patient}" == patient),
                )
            )
    if not labelled:
        manifest.classes, manifest.multilabel = [], None
    mf.save(manifest, prefix)
    return manifest


# what a recipe's model needs to run on a small input: Inception's stem more than 64 px, SwinV2 its size told
SMALL = {"strip_ai_inception_v3": 96}
OPTIONS = {"strip_ai_swinv2_tiny": ["model.options={img_size: 64}"]}


def recipe_dataset(recipe, prefix: str) -> mf.Manifest:
    classes = 4 if recipe.name.startswith("brain_tumor") else 2
    return make_dataset(
        prefix,
        {"train": 8, "val": 6},
        classes=classes,
        size=40,
        frames=4 if recipe.data.frames else 0,
        # RSNA datasets carry 6-way vectors; the binary recipe must still read the `.cls` (any) label.
        multilabel=recipe.name.startswith("rsna_ich"),
        boxes=recipe.task == "detect",
    )


def small_recipe(name: str, tmp_path, *extra: str):
    """Recipe ``name`` shrunk to two steps of two samples and a small input (``extra`` overrides too), with a
    tiny dataset for it written under ``tmp_path``; the recipe file keeps the papers' values."""
    from training.config import load_recipe

    base = load_recipe(name)
    size = SMALL.get(name, 32 if base.data.frames else 64)
    overrides = [
        f"data.dataset={tmp_path / 'ds'}",
        f"data.image_size={size}",
        "data.epoch_samples=4",
        "batch_size=2",
        "epochs=1",
        "workers=1",
        "model.pretrained=false",
        *(["data.frames=4"] if base.data.frames else []),
        *OPTIONS.get(name, []),
        *extra,
    ]
    recipe = load_recipe(name, overrides)
    recipe_dataset(recipe, str(tmp_path / "ds"))
    return recipe


def held_manifest(plan, cfg, kind: str = "images") -> mf.Manifest:
    """The manifest of a dataset of ``kind`` made by ``plan`` (every input ingested, one sample each): what
    ``--append`` or the same command again compares a plan against."""
    held = [
        mf.InputRecord(
            id=u.id,
            kind=u.kind,
            status="ingested",
            item=u.item,
            patient=u.patient,
            label=u.label,
            split=u.split,
            samples=1,
            fingerprint=u.fingerprint,
        )
        for u in plan.units
    ]
    return mf.Manifest(dataset=cfg.out, kind=kind, classes=plan.classes, splits={}, inputs=held, config=cfg.public())
