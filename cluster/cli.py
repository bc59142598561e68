"""The ``tessera`` command line. Each command prints where its results are and exits non-zero on failure."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from cluster.cli_dataset import add_dataset_parser
from cluster.cli_evaluate import add_evaluate_parser, print_held_out
from cluster.cli_ingest import add_ingest_parser, ingest_config, ingest_dry_run, keep_private
from cluster.cli_predict import add_predict_parser, add_score_parser
from cluster.cli_train import add_train_parser, cluster_fit, train_dry_run
from cluster.cli_tune import add_compare_parser, add_tune_parser
from cluster.errors import TesseraError
from shards.nodes import FIXED_ENV
from training.console import debugging, drop_ray_routine_lines, quiet_libraries


def _settings():
    from pydantic import ValidationError

    from cluster.settings import load_settings

    try:
        return load_settings()
    except ValidationError as exc:
        fields = "; ".join(f"TESSERA_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        raise TesseraError(f"invalid settings: {fields}") from None


def _connect(settings) -> None:
    """Export the stack's endpoints and connect to its Ray cluster (token auth), releasing the placement groups
    Ray kept after their jobs ended (:mod:`cluster.orphans`), which would hold room a run waits for."""
    from cluster import health

    settings.apply()
    if settings.ray_address is None:  # the local stack: no node will join (training.capacity)
        os.environ.setdefault(FIXED_ENV, "1")
    health.require(settings, "ray", "s3")
    import ray

    if not ray.is_initialized():
        ray.init(address=settings.ray_gcs_address, log_to_driver=True, logging_level="WARNING")
        drop_ray_routine_lines()
    _release_orphans()


def _release_orphans() -> None:
    """Release the placement groups Ray kept after their jobs ended (:mod:`cluster.orphans`), saying so."""
    from cluster.orphans import release_orphans, released_line

    if released := release_orphans():
        print(released_line(released), flush=True)


def cmd_up(args) -> int:
    from cluster.stack import LocalStack

    s = _settings()
    for st in LocalStack(s).up():
        print(f"{st.name:7s} {st.url:28s} {'healthy' if st.healthy else 'UNHEALTHY'}  {st.detail}")
    print(f"state: {s.state}")
    return 0


def cmd_down(args) -> int:
    from cluster.stack import LocalStack

    s = _settings()
    stopped = LocalStack(s).down()
    if stopped:
        print(f"local stack stopped ({', '.join(stopped)}; state: {s.state})")
    else:  # another folder's stack, if one answers, runs on
        print(f"no local stack was running from the state folder {s.state}")
    return 0


def cmd_status(args) -> int:
    from cluster import health
    from cluster.stack import LocalStack

    s = _settings()
    rows = LocalStack(s).status()
    refused = [st for st in rows if st.detail.startswith(health.REFUSED)]
    for st in rows:
        state = "healthy" if st.healthy else ("running, not answering" if st.running else "down")
        state, detail = ("answers, but", st.detail) if st in refused else (state, f"({st.detail})")
        print(f"{st.name:7s} {st.url:28s} {state}  {detail}")
    print(f"state: {s.state}")
    if refused:
        print(health.other_stack(s.state))
    if any(st.name == "ray" and st.healthy for st in rows):
        _print_usage(s)
    return 0 if all(st.healthy for st in rows) else 1


def _print_usage(settings) -> None:
    """What holds the cluster's CPUs and GPUs, job by job (:mod:`cluster.usage`), after releasing what Ray kept
    for no one (:mod:`cluster.orphans`): where a user looks when a run says it waits for room."""
    import ray

    from cluster.usage import cluster_usage

    settings.apply()
    try:
        if not ray.is_initialized():
            ray.init(address=settings.ray_gcs_address, log_to_driver=False, logging_level="ERROR")
        _release_orphans()
        print("\n".join(cluster_usage()))
    except Exception as exc:  # the services' lines stand; what holds the cluster is an extra
        print(f"cluster: what holds it could not be read: {type(exc).__name__}: {exc}")


def cmd_ingest(args) -> int:
    from cluster import health
    from ingest.runner import manifest_summary, run_ingest

    s = _settings()
    cfg = ingest_config(args)
    if args.dry_run:
        return ingest_dry_run(args.kind, cfg, keep_private(s, cfg.out))
    uses_s3 = any(u.startswith("s3://") for u in [cfg.out, *cfg.sources])
    if uses_s3 or health.ray_ok(s)[0]:
        _connect(s)
    else:  # local disk and no cluster: the ingest starts Ray inside this process
        os.environ.pop("RAY_ADDRESS", None)
    saved = []
    manifest, url = run_ingest(args.kind, cfg, on_private=lambda m: saved.append(keep_private(s, cfg.out)(m)))
    print(f"shards: {cfg.out}\nmanifest: {url}\n{manifest_summary(manifest)}")
    for line in manifest.reasons("skipped"):  # each failure is named below
        print(f"  skipped {line}")
    for r in [r for r in manifest.inputs if r.status == "failed"]:
        print(f"  failed {r.id}: {r.reason}", file=sys.stderr)
    print(f"what the pseudonyms (inputs, slides, patients) stand for: {saved[0]} (private to you)")
    return 0


def cmd_train(args) -> int:
    from cluster import health
    from training.config import load_recipe
    from training.launch import check_where_overrides, resume_training, run_training

    s = _settings()
    if args.resume:
        overrides = [args.recipe, *args.overrides] if args.recipe else args.overrides  # `workers=2` lands in recipe
        check_where_overrides(overrides)
        _connect(s)
        health.require(s, "mlflow")
        outcome = resume_training(args.resume, s.mlflow_url, s.checkpoints, overrides)
    else:
        if not args.recipe:
            raise SystemExit("a RECIPE (name or YAML path) or --resume RUN is needed")
        recipe = load_recipe(args.recipe, args.overrides)
        if args.dry_run:
            train_dry_run(recipe)
            cluster_fit(s, recipe, _connect)
            return 0
        _connect(s)
        health.require(s, "mlflow")
        outcome = run_training(recipe, s.mlflow_url, s.checkpoints)
    print(f"MLflow run: {outcome.run_url}")
    if outcome.error:
        print(f"training failed: {outcome.error}\n{outcome.resume}", file=sys.stderr)
        return 1
    print(f"checkpoint: {outcome.checkpoint}")
    if outcome.model_version:
        from training.tracking import model_url

        page = model_url(s.mlflow_url, outcome.model_name, outcome.model_version)
        where = f" ({page})" if page else ""
        print(f"registered model: models:/{outcome.model_name}/{outcome.model_version}{where}")
    print_held_out(outcome)
    return 0


def cmd_submit(args) -> int:
    from cluster import health
    from cluster.submit import submit

    s = _settings()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.address:
        health.require(s, "ray")
    job_id, status = submit(s, command, args.address, args.working_dir, follow=not args.no_wait)
    print(f"job {job_id}: {status}")
    if args.no_wait:
        return 0
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args) -> int:
    from cluster import health
    from cluster.submit import list_jobs, stop_job

    s = _settings()
    if not args.address:
        health.require(s, "ray")
    if args.action == "stop":
        if not args.job:
            raise TesseraError("tessera jobs stop JOB_ID")
        print(f"{args.job}: {'stopping' if stop_job(s, args.job, args.address) else 'not running'}")
        return 0
    for job_id, status, entrypoint in list_jobs(s, args.address):
        print(f"{job_id:28s} {status:10s} {entrypoint}")
    return 0


def cmd_demo(args) -> int:
    from cluster.demo import run_demo
    from cluster.stack import LocalStack

    s = _settings()
    LocalStack(s).up()
    _connect(s)
    run_demo(s, Path(args.workdir) if args.workdir else s.state / "demo", small=args.small)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera", description="Medical-imaging training at scale: ingest, train, track.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("up", help="start the embedded local stack (Ray head, S3 server, MLflow)").set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop the local stack, leaving no process behind").set_defaults(fn=cmd_down)
    sub.add_parser("status", help="each service, its URL and whether it is healthy").set_defaults(fn=cmd_status)

    add_ingest_parser(sub, cmd_ingest)
    add_dataset_parser(sub)

    add_train_parser(sub, cmd_train)
    add_evaluate_parser(sub)
    add_predict_parser(sub)
    add_score_parser(sub)

    add_tune_parser(sub)
    add_compare_parser(sub)

    sm = sub.add_parser("submit", help="run a tessera command as a Ray job (token auth), following its logs")
    sm.add_argument("--address", help="Ray dashboard URL of the cluster (default: the local stack)")
    sm.add_argument("--working-dir", help="ship this directory with the job (default: the installed package)")
    sm.add_argument("--no-wait", action="store_true", help="return once submitted")
    sm.add_argument("command", nargs=argparse.REMAINDER, help="-- tessera train|tune|ingest ...")
    sm.set_defaults(fn=cmd_submit)

    jb = sub.add_parser("jobs", help="list Ray jobs, or stop one")
    jb.add_argument("action", nargs="?", choices=["list", "stop"], default="list")
    jb.add_argument("job", nargs="?", help="job id (for stop)")
    jb.add_argument("--address", help="Ray dashboard URL of the cluster (default: the local stack)")
    jb.set_defaults(fn=cmd_jobs)

    demo = sub.add_parser("demo", help="the whole pipeline on the local stack with synthetic data")
    demo.add_argument("--workdir", help="where synthetic inputs are generated (default: STATE/demo)")
    demo.add_argument("--small", action="store_true", help="a smaller dataset (for tests)")
    demo.set_defaults(fn=cmd_demo)
    return p


def _stop_on_sigterm(signum, frame) -> None:
    """``tessera jobs stop`` (Ray's job stop), Kubernetes and ``kill`` end a command with SIGTERM, whose default
    ends Python at once: no ``finally``, so a training run stayed RUNNING in MLflow. It is an interrupt instead
    (Ray blocks SIGINT in a job's processes, so Ctrl+C's own path is closed there)."""
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def _stdout_gone() -> bool:
    """Whether stdout's reader has left (``| head``); if so, stdout is pointed at /dev/null, so that Python's
    flush at exit does not fail again."""
    import select

    try:
        poll = select.poll()  # a pipe whose reader closed polls as an error on its writing end
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no real stdout (captured), or no poll on this system
        return False
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return gone


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, a command's ``key=value`` overrides taken wherever they stand: argparse gives a
    command's positionals only what comes before its first option (`train demo_tiles --dry-run epochs=2`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        # Ray reads its auth settings when first imported, so the environment is exported before any command.
        _settings().apply()
        quiet_libraries()
        return int(args.fn(args) or 0)
    except KeyboardInterrupt as exc:
        print(f"tessera: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_gone():  # a server's connection, not the terminal's reader
            print("tessera: error: BrokenPipeError: a connection was closed while writing to it", file=sys.stderr)
            return 1
        return 141  # `tessera status | head`: the reader left; a shell's status for SIGPIPE, and no message
    except Exception as exc:
        if debugging():
            raise
        from ingest.decisions import IngestStopped
        from shards.storage import StorageError
        from training.config import RecipeError
        from training.endings import RunFailed

        known = (TesseraError, RecipeError, RunFailed, StorageError, IngestStopped, FileNotFoundError, ValueError)
        msg = str(exc) if isinstance(exc, known) else f"{type(exc).__name__}: {exc}"
        print(f"tessera: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
