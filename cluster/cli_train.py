"""``tessera train``'s arguments, and its ``--dry-run``: what a run would be, checked before any worker starts."""

from __future__ import annotations

from cluster.cli_evaluate import held_out_line


def bundled(package: str, folder: str) -> str:
    """Names of the YAML files a package ships in ``folder``, for a command's help (its modules not imported)."""
    from importlib.resources import files

    return ", ".join(sorted(p.name.removesuffix(".yaml") for p in (files(package) / folder).iterdir()))


def add_train_parser(sub, cmd) -> None:
    tr = sub.add_parser(
        "train",
        help="train a recipe on Ray Train + DeepSpeed, tracked in MLflow",
        epilog="bundled recipes: " + bundled("training", "recipes"),
    )
    tr.add_argument("recipe", nargs="?", help="recipe name (training/recipes/) or YAML path")
    tr.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    tr.add_argument(
        "--resume",
        metavar="RUN",
        help="continue a stopped run (MLflow run id or name) from its checkpoint, with its own recipe; "
        "workers=N, cpus_per_worker=N and placement=... may change where it continues",
    )
    tr.add_argument("--dry-run", action="store_true", help="validate, print the resolved recipe and exit")
    tr.set_defaults(fn=cmd)


def outputs_for_dry_run(recipe, manifest) -> tuple[int, str]:
    """How many logits the model would have: from the heads, the manifest if readable, else 2 (said so)."""
    from training.outputs import outputs_of

    if recipe.model.heads:
        return len(recipe.model.heads), "heads"
    if manifest is None:
        return 2, "assumed: the manifest is not readable"
    return len(outputs_of(recipe, manifest)), "manifest"


def input_size(recipe, manifest) -> str:
    """How the stored images meet the recipe's input size: a resize per sample and epoch, unless they match."""
    size, cfg = recipe.data.image_size, manifest.config
    stored = cfg.get("store_size") or (cfg.get("tile_size") if manifest.kind == "wsi" else None)
    if stored is None:
        return f"input: stored at their own sizes (no --store-size), resized to {size} px where they differ"
    if stored == size:
        return f"input: stored at {size} px, the training size: decoded without a resize"
    return (
        f"input: stored at {stored} px, resized to {size} px for every sample in every epoch "
        f"(ingest with --store-size {size} to store them at the training size)"
    )


def train_dry_run(recipe) -> None:
    """``tessera train RECIPE --dry-run``: the resolved recipe, the model's size and precision, and what the
    dataset says about it (when its manifest is readable from here)."""
    import yaml

    from shards import manifest as mf
    from shards import provenance
    from training.engine import mixed_precision
    from training.models import check_model, count_parameters, recipe_model
    from training.preflight import check_against, untrained_classes

    print(yaml.safe_dump(recipe.model_dump(), sort_keys=False))
    check_model(recipe.model, recipe.task)
    manifest = None
    try:
        manifest, data = mf.load_brief(recipe.data.dataset)
    except Exception as exc:  # the dataset may live on a cluster this machine cannot reach: said, not fatal
        print(f"dataset: manifest not readable from here: {exc}")
    n, source = outputs_for_dry_run(recipe, manifest)
    model = recipe_model(recipe, n, pretrained=False)
    total, trainable = count_parameters(model, trainable=False), count_parameters(model)
    print(f"parameters: {total:,} ({trainable:,} trainable), {n} outputs ({source})")
    gpu, cpu = ("bf16 (autocast)" if mixed_precision(recipe, cuda) else "fp32" for cuda in (True, False))
    print(f"precision: {gpu} on a GPU worker, {cpu} on a CPU worker (deepspeed.bf16: {recipe.deepspeed.bf16})")
    print(loader_line(recipe))
    if manifest is not None:
        check_against(recipe, manifest)
        made_by = manifest.made_by or "not recorded (made before Tessera recorded it)"
        print(f"dataset: version {mf.sha256_of(data)[:12]} (the run's manifest_sha256), made by {made_by}")
        if mixed := provenance.mixed(manifest.renderings()):  # amended by runs that rendered otherwise
            said = "; ".join(mixed)
            print(f"dataset: its samples were rendered more than one way ({said}; `tessera dataset` says which run)")
        print(held_out_line(recipe, manifest))
        if warning := untrained_classes(recipe, manifest):
            print(warning)
        print(input_size(recipe, manifest))


def loader_line(recipe) -> str:
    """What reads each worker's data: DALI's threads and, on a CPU worker, the pipelines they are split into
    (:func:`shards.lanes.wanted_lanes`, for a split of enough batches per worker: a small one gets fewer)."""
    from shards.lanes import describe, wanted_lanes

    threads = recipe.dali_threads
    cpu = describe(threads, wanted_lanes(threads, recipe.data.loader_lanes))
    gpu = "one pipeline (mixed decoding)"
    return f"loader: {threads} DALI thread(s) per worker; on a GPU worker {gpu}, on a CPU worker {cpu}"


def cluster_fit(settings, recipe, connect) -> None:
    """The dry run's last check, where the cluster answers: the one a run makes before it starts, whether the
    cluster's nodes hold the run's worker group (it raises where they cannot and the cluster cannot grow).
    ``connect``: the CLI's connection of this process to the cluster."""
    from cluster import health
    from shards.nodes import alive_resources
    from training.capacity import check_capacity, gpu_choice

    ok, detail = health.ray_ok(settings)
    if not ok:
        print(f"cluster: Ray at {settings.ray_dashboard_url}: {detail}; whether it holds the workers is checked "
              "when the run starts")  # fmt: skip
        return
    connect(settings)
    gpu, shortfall = gpu_choice(recipe)
    check_capacity(recipe, gpu)
    nodes = alive_resources()
    held = f"{sum(n.get('CPU', 0) for n in nodes):g} CPU, {sum(n.get('GPU', 0) for n in nodes):g} GPU"
    each = f"{recipe.cpus_per_worker:g} CPU" + (" and 1 GPU" if gpu else "")
    print(f"cluster: {len(nodes)} node(s) ({held}) for {recipe.workers} workers of {each} each")
    if shortfall:
        print(shortfall)
