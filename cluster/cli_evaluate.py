"""``tessera evaluate``: a trained run's selected model on a held-out split, or on another dataset."""

from __future__ import annotations


def add_run_arguments(parser) -> None:
    """RUN and where its model runs (KEY=VALUE), of the commands that apply a trained run's model."""
    parser.add_argument("run", metavar="RUN", help="MLflow run id or name, as `tessera train` printed it")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="where it runs, instead of the recipe's: workers, cpus_per_worker, placement, use_gpu; and the "
        "operating point its calls are also made at, chosen on the run's validation split: eval.operating_point="
        "youden|sensitivity:S|specificity:S, eval.positive=CLASS; eval.calibration=temperature, the probabilities "
        "scaled by a temperature fitted on the validation split (and for evaluate, eval.bootstrap=N, "
        "eval.confidence=C)",
    )


# what `tessera evaluate` may change besides where it runs: how its intervals are drawn, its operating point, its
# calibration
REPORT_KEYS = ("eval.bootstrap", "eval.confidence", "eval.operating_point", "eval.positive", "eval.calibration")


def add_evaluate_parser(sub) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="evaluate a run's selected model on a held-out split or another dataset, into its MLflow run",
        description="The run's exported model (its best epoch, or the SWA average: the registered one) on SPLIT, "
        "distributed over the recipe's workers (or KEY=VALUE's); sample- and aggregation-level metrics and "
        "pictures are logged into the run under the split's name (test_accuracy, test_patient_accuracy, ...), "
        "each with its confidence interval from a bootstrap of the split's patients (test_accuracy_ci_low, "
        "test_accuracy_ci_high; eval.bootstrap=N resamples, 1000 by default, 0 for none; eval.confidence=0.95), "
        "and with eval.operating_point=youden|sensitivity:S|specificity:S (and a binary classifier's "
        "eval.positive=CLASS) the sensitivity, specificity, PPV and NPV at the threshold that rule chooses on the "
        "validation split; with eval.calibration=temperature, the probabilities scaled at each level by a "
        "temperature fitted on the validation split (test_temperature, test_patient_temperature). "
        "`tessera train` does this for the recipe's data.test_split after training.",
    )
    add_run_arguments(ev)
    ev.add_argument("--split", default="test", help="the split to evaluate (default: %(default)s)")
    ev.add_argument("--dataset", help="another dataset's URL (external validation; the same classes)")
    ev.add_argument(
        "--name",
        help="prefix of the logged metrics (default: the split's name; external_<split> with --dataset; "
        "eval_val, eval_train for the splits whose names training's own curves use)",
    )
    ev.add_argument(
        "--heatmaps",
        action="store_true",
        help="also draw each slide's tile probabilities over its preview, a panel per class, titled with its "
        "label (slides only), into the run's <prefix>heatmaps/",
    )
    ev.set_defaults(fn=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from cluster import health
    from cluster.cli import _connect, _settings
    from training.eval_summary import summary
    from training.evaluation import evaluate_run
    from training.launch import EVALUATE_KEYS, check_where_overrides

    # where it runs, and what it reports besides the metrics: neither changes the model or its metrics
    check_where_overrides(args.overrides, (*EVALUATE_KEYS, *REPORT_KEYS), "tessera evaluate")
    s = _settings()
    _connect(s)
    health.require(s, "mlflow")
    options = {"split": args.split, "dataset": args.dataset, "name": args.name, "overrides": args.overrides}
    outcome = evaluate_run(args.run, s.mlflow_url, s.checkpoints, **options)
    print(summary(outcome))
    if args.heatmaps:
        from training.inference import evaluation_heatmaps

        folder, drawn, note = evaluation_heatmaps(s.mlflow_url, outcome.run_id, outcome.prefix, outcome.dataset)
        print(f"  heatmaps: {drawn} slide{'' if drawn == 1 else 's'} in the run's {folder}/")
        if note:
            print(f"note: {note}")
    return 0


def held_out_line(recipe, manifest) -> str:
    """What ``tessera train --dry-run`` says about the held-out evaluation that would follow training."""
    from training.evaluation import no_held_out

    why = no_held_out(recipe, manifest)
    heatmaps = "" if not recipe.eval.heatmaps else "; then heatmaps of the validation slides"
    if why:
        return f"held-out: none ({why}){heatmaps}"
    split = recipe.data.test_split
    samples = manifest.num_samples(split)
    heatmaps += " and of these" if heatmaps else ""
    line = f"held-out: the {split} split ({samples} samples), with the selected model after training{heatmaps}"
    ev = recipe.eval
    if ev.bootstrap and recipe.task != "detect":
        line += (
            f"\n  its metrics' {ev.confidence:.0%} intervals from {ev.bootstrap} bootstrap resamples of its patients"
        )
    if ev.operating_point:
        of = f"for {ev.positive}" if ev.positive else "for each label"
        rates = "sensitivity, specificity, PPV and NPV"
        line += f"\n  {rates} at the threshold {ev.operating_point} chooses {of} on validation"
    if ev.calibration == "temperature" and recipe.task != "detect":
        line += "\n  its probabilities scaled at each level by a temperature fitted on validation"
    return line


def print_held_out(outcome) -> None:
    """What ``tessera train`` says about its held-out evaluation, and the heatmaps the recipe asked for."""
    from training.eval_summary import summary

    if outcome.held_out is not None:
        print(summary(outcome.held_out))
    if outcome.held_out_error:
        print(f"held-out evaluation failed (`tessera evaluate {outcome.run_id}` retries it): {outcome.held_out_error}")
    for line in outcome.heatmaps:
        print(line)
