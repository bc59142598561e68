"""``tessera demo``: synthetic slides, CT and MR in, shards on S3, a model trained and tracked in MLflow."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from cluster.errors import TesseraError
from cluster.settings import Settings


def _stage(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def run_demo(settings: Settings, workdir: Path, small: bool = False) -> dict[str, Any]:
    """Run the main job on a connected local stack; returns the URLs it printed, the run and the new slides'
    calls."""
    from cluster.cli_ingest import keep_private, private_map
    from cluster.cli_predict import heatmaps, private_names, revealed_tables
    from ingest.config import DicomIngestConfig, ImagesIngestConfig, WsiIngestConfig
    from ingest.runner import manifest_summary, run_ingest
    from ingest.synthetic import make_ct_series, make_mri_folders, make_slides
    from shards.verify import verify_dataset
    from training.config import load_recipe
    from training.inference import predict_run
    from training.launch import run_training

    t0 = time.time()
    n_slides, size = (4, 1024) if small else (8, 2048)
    _stage(
        f"generating {n_slides} synthetic slides ({size} px, JPEG-tiled pyramids), 2 CT series and 8 MR images "
        "with tumour boxes"
    )
    _, labels = make_slides(workdir / "slides", n=n_slides, size=size)
    _, ct_labels = make_ct_series(workdir / "ct", n=2, slices=8 if small else 16)
    boxes = make_mri_folders(workdir / "mri", per_class=2, size=128)

    wsi_url, ct_url = settings.dataset_url("demo/wsi"), settings.dataset_url("demo/ct")
    mri_url = settings.dataset_url("demo/mri")
    _stage(f"ingesting slides -> {wsi_url}")
    wsi = WsiIngestConfig(
        sources=[str(workdir / "slides")],
        out=wsi_url,
        labels=str(labels),
        tile_size=128,
        store_size=64,
        split="train=0.5,val=0.5" if small else "train=0.5,val=0.25,test=0.25",
        shard_size="2MB",
        overwrite=True,  # the whole pipeline each time, not the dataset an earlier demo made
    )
    manifest, _ = run_ingest("wsi", wsi)
    print(manifest_summary(manifest))
    _stage(f"ingesting CT series -> {ct_url}")
    ct = DicomIngestConfig(
        sources=[str(workdir / "ct")], out=ct_url, labels=str(ct_labels), split="train=0.5,val=0.5", overwrite=True
    )
    print(manifest_summary(run_ingest("dicom", ct)[0]))
    _stage(f"ingesting MR images -> {mri_url}: each tumour box's lesion segmented (GrabCut) and cut out")
    mri = ImagesIngestConfig(
        sources=[str(workdir / "mri" / "images")], out=mri_url, boxes=str(boxes), crop=True, segment="grabcut",
        median=3, split="train=0.5,val=0.5", overwrite=True,
    )  # fmt: skip
    print(manifest_summary(run_ingest("images", mri)[0]))

    _stage("verifying shards against the manifests (size, sha256, sample counts)")
    problems = verify_dataset(wsi_url) + verify_dataset(ct_url) + verify_dataset(mri_url)
    if problems:
        raise TesseraError("shard verification failed:\n  " + "\n  ".join(problems))
    print("all shards match their manifests")

    _stage("training on Ray Train (2 workers) + DeepSpeed ZeRO-2, reading shards through DALI from S3")
    overrides = [f"data.dataset={wsi_url}", "eval.heatmaps=true"] + (["epochs=2"] if small else [])
    recipe = load_recipe("demo_tiles", overrides)
    outcome = run_training(recipe, settings.mlflow_url, settings.checkpoints)
    if outcome.error:
        raise TesseraError(f"training failed: {outcome.error}; {outcome.resume}")
    for line in outcome.heatmaps:  # the validation and held-out slides' (the recipe's eval.heatmaps)
        print(line)
    new_url = settings.dataset_url("demo/new")
    _stage(f"2 new slides without labels -> {new_url}, called by the trained model per tile and per patient")
    make_slides(workdir / "new", n=2, size=size, seed=7, first=n_slides)
    new = WsiIngestConfig(
        sources=[str(workdir / "new")], out=new_url, tile_size=128, store_size=64, split="test=1.0",
        shard_size="2MB", overwrite=True,
    )  # fmt: skip
    run_ingest("wsi", new, on_private=keep_private(settings, new_url))
    calls = predict_run(outcome.run_id, settings.mlflow_url, settings.checkpoints, dataset=new_url)
    map_path = private_map(settings, new_url)
    named = revealed_tables(calls.tables, private_names(map_path), map_path)["patient"]  # as `--reveal` names them
    print(f"{calls.samples} tiles called; per patient, named as `--reveal` names them (made CE, LAA in turn):")
    print("  " + named.strip().replace("\n", "\n  "))
    heatmaps(calls, settings.mlflow_url, str(workdir / "predictions-new"), None)  # as `--heatmaps` draws them
    m = outcome.metrics
    _stage(f"done in {time.time() - t0:.0f}s")
    print(
        f"validation: tile accuracy {m.get('val_accuracy', float('nan')):.3f}, "
        f"patient accuracy {m.get('val_patient_accuracy', float('nan')):.3f}"
    )
    if outcome.held_out is not None:
        t = outcome.held_out.metrics

        def held(key: str) -> str:  # with its interval, from a bootstrap of the test split's patients
            low, high = t.get(f"{key}_ci_low", float("nan")), t.get(f"{key}_ci_high", float("nan"))
            bounds = "" if math.isnan(low) or math.isnan(high) else f" [{low:.3f}, {high:.3f}]"
            return f"{t.get(key, float('nan')):.3f}{bounds}"

        print(
            f"test (held out): tile accuracy {held('test_accuracy')}, patient accuracy {held('test_patient_accuracy')}"
        )
        if outcome.held_out.intervals:
            print(f"                 in brackets, {outcome.held_out.intervals};")
            print("                 a demo's test split holds few patients, too few for a bootstrap to mean much")
    print(f"shards:     {wsi_url}  {ct_url}  {mri_url}  {new_url}")
    print(f"MLflow run: {outcome.run_url} (the new slides' calls and heatmaps under predictions/{calls.name}/)")
    urls = {"wsi": wsi_url, "ct": ct_url, "mri": mri_url, "new": new_url}
    return urls | {"run_url": outcome.run_url, "run_id": outcome.run_id, "calls": calls}
