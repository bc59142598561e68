"""``tessera tune`` and ``tessera compare``: Ray Tune sweeps and replicates of a recipe, and the statistical
comparison of groups of runs."""

from __future__ import annotations

from cluster.cli_train import bundled, cluster_fit
from cluster.errors import TesseraError


def add_tune_parser(sub) -> None:
    tu = sub.add_parser(
        "tune",
        help="Ray Tune sweeps and replicates of a recipe, tracked in MLflow",
        epilog="bundled sweeps and studies: " + bundled("tune", "sweeps"),
    )
    tu.add_argument("plan", nargs="?", help="sweep or study (tune/sweeps/ or YAML path), or a RECIPE with --replicates")
    tu.add_argument("overrides", nargs="*", help="key.sub=value overrides (of the sweep file; of the recipe with -r)")
    tu.add_argument("--replicates", "-r", type=int, help="run the RECIPE this many times with seeds seed+i")
    tu.add_argument("--resplit", help="with --replicates: ingest splits to re-split per replicate (f0,f1,...)")
    tu.add_argument("--resume", metavar="NAME", help="finish an interrupted sweep (its printed name)")
    tu.add_argument("--dry-run", action="store_true", help="validate and print the resolved sweep(s)")
    tu.set_defaults(fn=cmd_tune)


def add_compare_parser(sub) -> None:
    cp = sub.add_parser("compare", help="compare run groups (sweep/replicates names or MLflow filters), each pair")
    cp.add_argument(
        "groups",
        nargs="+",
        metavar="GROUP",
        help="two or more: a sweep or replicates name, a parent run id, or a filter (tags.x = 'y'); each is "
        "compared with each later one (A the earlier)",
    )
    cp.add_argument("--metrics", required=True, help="comma-separated metric names, e.g. val_patient_accuracy")
    cp.add_argument(
        "--alpha", type=float, default=0.05, help="significance level, shared among the pairs (default: 0.05)"
    )
    cp.add_argument(
        "--level",
        default="patient",
        help="confusion-matrix level to average: sample, slide, patient... (default: %(default)s); with --paired, "
        "the level whose held-out predictions are compared",
    )
    cp.add_argument(
        "--paired",
        action="store_true",
        help="GROUPs are trained runs (ids or names), each compared with each on the same held-out patients, "
        "prediction by prediction: B - A of each metric (unprefixed: accuracy, auc, f1, brier_loss, "
        "weighted_log_loss, recall_<class>, specificity_<class>; of labels: rsna_log_loss, auc_<label>...) "
        "with its interval and p-value from a bootstrap of the patients, McNemar's exact test for accuracy",
    )
    cp.add_argument(
        "--split",
        default="test",
        help="with --paired: the evaluation compared, its split's name or --name (external_test for another "
        "dataset; default: %(default)s)",
    )
    cp.set_defaults(fn=cmd_compare)


def cmd_tune(args) -> int:
    from cluster import health
    from cluster.cli import _connect, _settings
    from tune.config import StudyConfig, load_plan, replicate_sweep
    from tune.sweep import run_sweep

    s = _settings()
    stores = {"tune_storage": s.sweeps, "train_storage": s.checkpoints}
    if args.resume:
        if args.plan or args.overrides:
            raise TesseraError("--resume NAME takes no sweep or overrides: the sweep's own file is used")
        plans, study = {None: None}, None
    elif not args.plan:
        raise TesseraError("a SWEEP (name or YAML), a RECIPE with --replicates N, or --resume NAME is needed")
    elif args.replicates:
        folds = args.resplit.split(",") if args.resplit else None
        plans, study = {None: replicate_sweep(args.plan, args.overrides, args.replicates, folds)}, None
    else:
        plan = load_plan(args.plan, args.overrides)
        study = plan if isinstance(plan, StudyConfig) else None
        plans = plan.sweeps() if study else {None: plan}
        if study:
            s.apply()  # the stack's endpoints: the groups' datasets may lie on its object store
            study.check_compared()
    if args.dry_run:
        import yaml

        for sweep in plans.values():
            print(yaml.safe_dump(sweep.model_dump(exclude_none=True), sort_keys=False) if sweep else "resume")
            if sweep:  # its dataset, and each trial's worker group, as the sweep checks them before it starts
                dataset_fit(s, sweep)
                cluster_fit(s, sweep.base(), _connect)
        return 0
    _connect(s)
    health.require(s, "mlflow")
    names = []
    for sweep in plans.values():
        outcome = run_sweep(sweep, s.mlflow_url, resume=args.resume, **stores)
        names.append(outcome.name)
        again = f"`tessera tune --resume {outcome.name}` trains the failed ones again from their last checkpoints"
        if outcome.trials and outcome.errors == outcome.trials:
            raise TesseraError(f"sweep {outcome.name}: every trial failed; see {outcome.parent_url}; {again}")
        failed = f"{outcome.errors} failed ({again})" if outcome.errors else "none failed"
        print(f"sweep {outcome.name}: {outcome.trials} trials, {failed}; MLflow {outcome.parent_url}")
        print(f"best: {outcome.best_params} -> {outcome.best_metric} (run {outcome.best_run_id})")
    if study:  # every group ran (their sweeps' names in the file's order): each compared with each
        return _compare_all(s, names, study.compare.metrics, study.compare.alpha, "patient")
    return 0


def dataset_fit(s, sweep) -> None:
    """The dry run's check of the sweep's dataset, where its manifest is readable from here: the base recipe
    against it, and the objective among what each epoch reports (:func:`training.preflight.check_each_epoch`)."""
    from shards import manifest as mf
    from training.preflight import check_against, check_each_epoch

    base = sweep.base()
    s.apply()  # the stack's endpoints: the dataset may lie on its object store
    try:
        manifest, _ = mf.load_brief(base.data.dataset)
    except Exception as exc:  # the dataset may live on a cluster this machine cannot reach: said, not fatal
        print(f"dataset: manifest not readable from here: {exc}")
        return
    check_against(base, manifest)
    check_each_epoch(base, manifest, sweep.objective()[0], "metric")
    print(f"dataset: {base.data.dataset}: the recipe and the objective {sweep.objective()[0]} checked against it")


def _compare_all(s, groups: list[str], metrics: list[str], alpha: float, level: str) -> int:
    """Each of ``groups`` compared with each other one, at ``alpha`` shared among the pairs (Bonferroni)."""
    from tune.config import pairwise

    pairs, each = pairwise(groups, alpha)
    if len(pairs) > 1:
        print(f"{len(groups)} groups, {len(pairs)} comparisons: each at alpha {alpha} / {len(pairs)} = {each:.4g} "
              "(Bonferroni)")  # fmt: skip
    for a, b in pairs:
        _compare(s, a, b, metrics, each, level)
    return 0


def _compare(s, a: str, b: str, metrics: list[str], alpha: float, level: str) -> None:
    from tune.compare import run_compare

    _, report, run_id = run_compare(s.mlflow_url, a, b, metrics, alpha, level)
    print(report)
    from training import tracking

    print(f"comparison logged: {tracking.run_url_of(s.mlflow_url, run_id)}")


def cmd_compare(args) -> int:
    from cluster import health
    from cluster.cli import _settings
    from tune.config import pairwise

    pairwise(args.groups, args.alpha)  # one group is refused here, before anything connects
    s = _settings()
    s.apply()
    health.require(s, "mlflow")
    if args.paired:
        return _compare_paired(s, args)
    return _compare_all(s, args.groups, args.metrics.split(","), args.alpha, args.level)


def _compare_paired(s, args) -> int:
    """Each run of ``args.groups`` with each later one on the same held-out patients (:mod:`tune.paired`), at
    ``args.alpha`` shared among the pairs (Bonferroni)."""
    from training import tracking
    from tune.config import pairwise
    from tune.paired import run_paired

    pairs, each = pairwise(args.groups, args.alpha)
    if len(pairs) > 1:
        print(f"{len(args.groups)} runs, {len(pairs)} comparisons: each at alpha {args.alpha} / {len(pairs)} = "
              f"{each:.4g} (Bonferroni)")  # fmt: skip
    for a, b in pairs:
        _, report, run_id = run_paired(s.mlflow_url, a, b, args.metrics.split(","), args.split, args.level, each)
        print(report)
        print(f"comparison logged: {tracking.run_url_of(s.mlflow_url, run_id)}")
    return 0
