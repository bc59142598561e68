import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.cli import build_parser, main
from ingest.config import WsiIngestConfig, parse_bytes
from training.config import RecipeError, load_recipe


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
    """No Ray cluster for these tests, though a developer's own stack may run: `train --dry-run` asks whether
    one answers (and would connect this process to it)."""
    monkeypatch.setenv("TESSERA_RAY_DASHBOARD_PORT", "1")


def test_recipe_loads_with_overrides():
    r = load_recipe("demo_tiles", ["epochs=5", "optim.lr=0.01", "data.dataset=s3://b/x"])
    assert (r.epochs, r.optim.lr, r.data.dataset) == (5, 0.01, "s3://b/x")
    assert r.deepspeed.zero_stage == 2


def test_unknown_recipe_field_names_the_field_and_the_closest_of_its_section():
    with pytest.raises(RecipeError, match=r"optim\.lrr: no such field \(closest: lr\); its section has name, lr"):
        load_recipe("demo_tiles", ["optim.lrr=0.1"])
    with pytest.raises(RecipeError, match=r"\n  optimizer: no such field \(closest: optim\); its section has name, "):
        load_recipe("demo_tiles", ["optimizer.lr=0.1"])  # the recipe's own keys
    with pytest.raises(RecipeError, match=r"data\.augment\.flipp: no such field \(closest: [hv]flip, [hv]flip\)"):
        load_recipe("demo_tiles", ["data.augment.flipp=0.5"])  # a section two deep
    with pytest.raises(RecipeError, match=r"zzz: no such field; its section has name, "):
        load_recipe("demo_tiles", ["zzz=1"])
    with pytest.raises(RecipeError, match=r"deepspeed\.zero_stage"):
        load_recipe("demo_tiles", ["deepspeed.zero_stage=7"])
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("no_such_recipe")


def test_sizes_and_ingest_validation():
    assert parse_bytes("1GB") == 1 << 30 and parse_bytes("256MB") == 256 << 20 and parse_bytes(1000) == 1000
    with pytest.raises(ValueError, match="tissue_threshold"):
        WsiIngestConfig(sources=["x"], out="y", tissue_threshold=2)
    with pytest.raises(ValueError, match="give mpp or magnification, not both"):
        WsiIngestConfig(sources=["x"], out="y", mpp=0.5, magnification=20)


def test_every_command_has_help():
    parser = build_parser()
    for argv in (
        ["--help"],
        ["up", "--help"],
        ["ingest", "wsi", "--help"],
        ["ingest", "dicom", "--help"],
        ["train", "--help"],
        ["demo", "--help"],
        ["status", "--help"],
        ["down", "--help"],
    ):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(argv)
        assert exc.value.code == 0


def test_ingest_options_take_the_models_defaults_and_show_them(capsys):
    """An option not typed is the pydantic model's default (one place for defaults); its help shows that value."""
    from cluster.cli_ingest import ingest_config
    from ingest.config import DicomIngestConfig

    parse = build_parser().parse_args
    assert ingest_config(parse(["ingest", "wsi", "a", "--out", "o"])) == WsiIngestConfig(sources=["a"], out="o")
    typed = ingest_config(parse(["ingest", "wsi", "a", "b", "--out", "o", "--format", "jpeg", "--quality", "75"]))
    assert (typed.sources, typed.format, typed.quality, typed.tile_size) == (["a", "b"], "jpg", 75, 600)
    assert (
        typed.fetch_ahead
        and not ingest_config(parse(["ingest", "wsi", "a", "--out", "o", "--no-fetch-ahead"])).fetch_ahead
    )
    dicom = ingest_config(parse(["ingest", "dicom", "a", "--out", "o", "--windows", "bone,brain,soft"]))
    assert dicom == DicomIngestConfig(sources=["a"], out="o", windows=["bone", "brain", "soft"])
    assert dicom.format == "png" and not dicom.allow_burned_in
    with pytest.raises(SystemExit):
        parse(["ingest", "wsi", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for text in ("(default: 600)", "(default: 0.3)", "(default: 1GB)", "(default: jpg)", "(default: 90)"):
        assert text in shown
    assert main(["ingest", "wsi", "a", "--out", "o", "--quality", "0"]) == 1
    assert "--quality: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert main(["ingest", "wsi", "a", "--out", "o", "--mpp", "1", "--magnification", "20"]) == 1
    assert "invalid ingest options: give mpp or magnification, not both" in capsys.readouterr().err


def test_ingest_dry_run_lists_what_would_be_ingested_and_writes_nothing(capsys, tmp_path, monkeypatch):
    """Slides are not opened by the plan, so empty files stand in for them; the label table names three of four."""
    monkeypatch.setenv("TESSERA_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("TESSERA_PSEUDONYM_KEY", "k")
    src = tmp_path / "slides"
    src.mkdir()
    for name in ("a", "b", "c", "d"):
        (src / f"{name}.svs").touch()
    (src / "notes.txt").write_text("not a slide")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label,patient\na,CE,p1\nb,LAA,p1\nc,LAA,p2\nz,CE,p3\n")  # no slide z
    out = tmp_path / "out"
    argv = ["ingest", "wsi", str(src), "--out", str(out), "--labels", str(labels), "--dry-run"]
    assert main([*argv, "--split", "train=1.0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        f"dry run: ingest wsi into {out} (nothing written there)",
        "3 slides to ingest, 2 input(s) skipped",
        "  train: 3 (CE 1, LAA 2) from 2 patient(s)",
        "classes: 0 CE, 1 LAA",
    ]
    assert not out.exists()
    # Skipped inputs as pseudonyms (the output may reach job logs); the private map names them.
    private = tmp_path / "state" / "private" / f"{str(out).replace('/', '_')}.sources.json"
    assert lines[-1] == f"the inputs behind these pseudonyms: {private} (private to you)"
    where = {loc: uid for uid, loc in json.loads(private.read_text()).items()}
    assert f"skipped 1: not in the label table: {where[str(src / 'd.svs')]}" in lines
    assert f"skipped 1: not a slide file (extension .txt): {where[str(src / 'notes.txt')]}" in lines
    assert f"label rows naming no input found 1: {where[f'{labels}: row z']}" in lines
    assert not any(str(src) in line for line in lines)
    # A later plan over other sources adds to the map and keeps what is there.
    other = tmp_path / "other"
    other.mkdir()
    (other / "e.svs").touch()
    (other / "e.xml").touch()
    assert main(["ingest", "wsi", str(other), "--out", str(out), "--dry-run"]) == 0
    names = "a.svs", "b.svs", "c.svs", "d.svs", "notes.txt"
    # the sources, and the slide and patient pseudonyms that samples and prediction tables carry, traced back
    assert set(json.loads(private.read_text()).values()) == {str(src / name) for name in names} | {
        str(other / "e.svs"),
        str(other / "e.xml"),
        f"{labels}: row z",
        "patient p1",
        "patient p2",
        "patient e",
    }


def test_ingest_without_a_pseudonym_key_says_how_to_get_one(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("TESSERA_PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("TESSERA_PSEUDONYM_KEY_FILE", raising=False)
    assert main(["ingest", "wsi", str(tmp_path), "--out", str(tmp_path / "out"), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tessera: error: no pseudonym key: set TESSERA_PSEUDONYM_KEY") and "`tessera up`" in err


def test_an_ingest_that_would_make_an_empty_dataset_fails_saying_why_and_writes_nothing(capsys, tmp_path, monkeypatch):
    from ingest.synthetic import make_slides

    monkeypatch.setenv("TESSERA_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("TESSERA_PSEUDONYM_KEY", "k")
    make_slides(tmp_path / "slides", n=2, size=512)
    (tmp_path / "ids.csv").write_text("slide,label\nS-001,CE\nS-002,LAA\n")  # not how the files are named
    out = tmp_path / "out"
    assert (
        main(["ingest", "wsi", str(tmp_path / "slides"), "--out", str(out), "--labels", str(tmp_path / "ids.csv")]) == 1
    )
    err = capsys.readouterr().err
    assert err.startswith(
        "tessera: error: nothing to ingest: all 2 input(s) were skipped (2 not in the label table); do"
    )
    assert err.endswith(f"`--dry-run` lists what was found; nothing was written to {out}\n")
    assert not (out / "manifest.json").exists()
    (tmp_path / "empty").mkdir()
    assert main(["ingest", "wsi", str(tmp_path / "empty"), "--out", str(out)]) == 1
    assert (
        capsys.readouterr().err == f"tessera: error: nothing to ingest: no input found; nothing was written to {out}\n"
    )


def test_train_and_tune_help_list_the_bundled_plans(capsys):
    from training.config import RECIPES
    from tune.config import SWEEPS

    for argv, folder in ((["train", "--help"], RECIPES), (["tune", "--help"], SWEEPS)):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        shown = capsys.readouterr().out.replace("\n", " ")
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        assert names and ", ".join(names) in " ".join(shown.split())


def test_compare_takes_two_or_more_groups_and_refuses_one_before_connecting(capsys):
    args = build_parser().parse_args(["compare", "a", "b", "c", "--metrics", "val_loss", "--alpha", "0.01"])
    assert args.groups == ["a", "b", "c"] and args.alpha == 0.01  # three groups: three pairs at 0.01 / 3
    assert main(["compare", "only-one", "--metrics", "val_loss"]) == 1
    err = capsys.readouterr().err
    assert "compare needs at least two groups, got 1: only-one" in err and "Traceback" not in err


def test_bad_recipe_field_fails_without_traceback(capsys):
    assert main(["train", "demo_tiles", "optim.momentum=3", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "optim.momentum" in err and "Traceback" not in err


@pytest.mark.parametrize("extra", [["demo_tiles"], ["workers=2", "epochs=9"]])
def test_resume_takes_only_where_to_run_overrides(capsys, extra):
    """Refused before anything connects (no stack runs here); ``workers=N`` is what may change."""
    assert main(["train", "--resume", "0123456789abcdef", *extra]) == 1
    err = capsys.readouterr().err
    assert (
        "--resume changes only workers, cpus_per_worker, placement, tracking.outage_wait_s, data.outage_wait_s" in err
    )
    assert repr(extra[-1]) in err
    assert "Traceback" not in err


def test_evaluate_takes_only_where_to_run_overrides(capsys):
    """A run trained on a GPU cluster may be evaluated elsewhere (fewer workers, CPUs); not retrained otherwise."""
    assert main(["evaluate", "0123456789abcdef", "workers=1", "data.image_size=64"]) == 1
    err = capsys.readouterr().err
    assert "tessera evaluate changes only workers, cpus_per_worker, placement, use_gpu" in err
    assert "'data.image_size=64'" in err and "Traceback" not in err


def test_a_submission_needs_the_patients_ids(capsys):
    """A submission names patients (STRIP AI) or images (RSNA) by their IDs: refused without --reveal, before
    anything connects."""
    assert main(["predict", "0123456789abcdef", "--submission", "submission.csv"]) == 1
    err = capsys.readouterr().err
    assert "--submission: it names patients or images by their IDs; give --reveal and a local file" in err


def test_a_submission_of_a_run_without_patients_is_refused_before_any_work(mlflow_uri, tmp_path, monkeypatch):
    """A run whose recipe does not aggregate to patients has no rows for a submission: said before any worker
    starts (none could here)."""
    import yaml
    from mlflow import MlflowClient

    import training.capacity
    from cluster.cli_predict import submission_layout
    from training.export import MODEL_JSON
    from training.inference import predict_run
    from training.launch import RECIPE_ARTIFACT
    from training.tracking import MODEL_ARTIFACT

    monkeypatch.setattr(training.capacity, "check_capacity", lambda *a, **k: None)  # no cluster here
    uri = mlflow_uri
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x", str(tmp_path / "artifacts"))).info.run_id
    from tests.datasets import make_dataset

    make_dataset(str(tmp_path / "ds"), {"test": 2})
    recipe = load_recipe("demo_tiles", [f"data.dataset={tmp_path / 'ds'}", "eval.levels=[slide]"])
    (tmp_path / RECIPE_ARTIFACT).write_text(yaml.safe_dump(recipe.model_dump()))
    client.log_artifact(run_id, str(tmp_path / RECIPE_ARTIFACT))
    (tmp_path / MODEL_JSON).write_text(json.dumps({"classes": ["CE", "LAA"]}))  # the export's description
    client.log_artifact(run_id, str(tmp_path / MODEL_JSON), MODEL_ARTIFACT)
    refused = r"--submission: no submission layout fits this run: STRIP AI's .* this multiclass one's: \['slide'\]"
    # the driver reads the manifest's head, not its input records (a million images: seconds and GBs)
    from shards import manifest as mf

    monkeypatch.setattr(mf, "load_with_bytes", lambda *a: pytest.fail("predict's driver read every input record"))
    with pytest.raises(ValueError, match=refused):
        predict_run(run_id, uri, str(tmp_path / "ckpt"), overrides=["use_gpu=false"], check=submission_layout)


def test_unreachable_endpoint_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("TESSERA_S3_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("TESSERA_RAY_DASHBOARD_PORT", "2")
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "ingest", "wsi", str(tmp_path), "--out", "s3://b/x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert "endpoint http://127.0.0.1:2 is unreachable" in out.stderr and "Traceback" not in out.stderr


def test_the_state_folder_is_found_from_any_directory(tmp_path, monkeypatch):
    """A project's ``.tessera`` from any folder below it, else the user's; TESSERA_STATE_DIR wins; a job on the
    local stack is told the folder, since it runs from another directory."""
    from cluster.settings import find_state_dir, load_settings
    from cluster.submit import runtime_env

    project, home = tmp_path / "project", tmp_path / "home"
    (project / ".tessera").mkdir(parents=True)
    deep = project / "data" / "slides"
    deep.mkdir(parents=True)
    assert find_state_dir(deep, home) == find_state_dir(project, home) == project / ".tessera"
    assert find_state_dir(tmp_path, home) == home / ".tessera"  # not created: `tessera up` makes it
    with monkeypatch.context() as m:
        m.setattr(Path, "cwd", lambda: (_ for _ in ()).throw(FileNotFoundError("deleted")))
        assert find_state_dir(home=home) == home / ".tessera"  # run from a folder deleted since
    monkeypatch.delenv("TESSERA_STATE_DIR", raising=False)
    monkeypatch.chdir(deep)
    settings = load_settings()
    monkeypatch.chdir(tmp_path)  # found once: a later directory does not move it
    assert settings.state == project / ".tessera"
    monkeypatch.setenv("TESSERA_STATE_DIR", str(tmp_path / "explicit"))
    assert load_settings().state == tmp_path / "explicit"
    assert runtime_env(load_settings())["env_vars"]["TESSERA_STATE_DIR"] == str(tmp_path / "explicit")
    monkeypatch.delenv("TESSERA_STATE_DIR")
    assert "TESSERA_STATE_DIR" not in runtime_env(settings, local=False)["env_vars"]  # a cluster has its own


def test_down_says_when_no_stack_ran_from_its_state_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TESSERA_STATE_DIR", str(tmp_path / "state"))
    assert main(["down"]) == 0
    assert capsys.readouterr().out == f"no local stack was running from the state folder {tmp_path / 'state'}\n"


def test_a_reader_that_leaves_ends_a_command_quietly(tmp_path, monkeypatch, capsys):
    """`tessera status | head -1` ended with "tessera: error: BrokenPipeError": the reader's leaving is no error
    of the command's (status 141 as for SIGPIPE, nothing said); a broken connection to a server still is."""
    env = dict(os.environ, TESSERA_STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "down"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # the reader gone before the command prints
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode, err) == (141, b"")

    import cluster.cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cluster.cli, "cmd_down", broken)
    monkeypatch.setenv("TESSERA_STATE_DIR", str(tmp_path / "state"))
    assert main(["down"]) == 1
    assert "BrokenPipeError: a connection was closed while writing to it" in capsys.readouterr().err


def test_job_commands_without_a_ray_token_say_so(tmp_path, monkeypatch, capsys):
    """Ray's job client aborts the process with a C++ stack trace when it finds no token; Tessera says what to
    set instead."""
    from cluster import submit

    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TESSERA_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setattr(submit, "RAY_TOKEN_FILE", tmp_path / "none")
    assert main(["jobs", "--address", "http://127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "tessera: error: no Ray token for http://127.0.0.1:1: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
        f"(the local stack's is {tmp_path / 'secrets' / 'ray_token'})\n"
    )


def test_dry_run_prints_recipe_and_parameters(capsys):
    assert main(["train", "demo_tiles", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "mobilenetv3_small_050" in out and "parameters:" in out
    assert "precision: bf16 (autocast) on a GPU worker, fp32 on a CPU worker (deepspeed.bf16: auto)" in out
    assert main(["train", "demo_tiles", "deepspeed.bf16=true", "--dry-run"]) == 0
    assert "precision: bf16 (autocast) on a GPU worker, bf16 (autocast) on a CPU" in capsys.readouterr().out


def test_dry_run_says_why_the_manifest_cannot_be_read(capsys, tmp_path):
    assert main(["train", "demo_tiles", f"data.dataset={tmp_path / 'none'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"dataset: manifest not readable from here: {tmp_path / 'none'}: no dataset there: no manifest.json" in out
    assert "2 outputs (assumed: the manifest is not readable)" in out
    # and whether the cluster holds the workers is left to the run, where no cluster answers
    assert "cluster: Ray at http://127.0.0.1:1: ConnectionError; whether it holds the workers is checked" in out


def test_dicom_windows_must_fill_three_channels():
    from ingest.config import DicomIngestConfig

    with pytest.raises(ValidationError, match="exactly 3 windows"):
        DicomIngestConfig(sources=["x"], out="y", windows=["brain", "bone"])
    assert DicomIngestConfig(sources=["x"], out="y", windows=["bone", "brain", "soft"]).windows[0] == "bone"


def test_dry_run_counts_head_only_parameters(capsys, tmp_path):
    from shards import manifest as mf
    from tests.datasets import make_dataset

    made = make_dataset(str(tmp_path / "ds"), {"train": 2, "val": 2}, frames=2)
    mf.save(made.model_copy(update={"made_by": "tessera 0.1.0 (abc)"}), str(tmp_path / "ds"))
    assert main(["train", "ct_ich_sequence_vivit", f"data.dataset={tmp_path / 'ds'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "(1,538 trainable), 2 outputs (manifest)" in out  # ViViT-b's 768-wide classifier, 2 classes
    version = mf.sha256_of((tmp_path / "ds" / mf.MANIFEST_NAME).read_bytes())
    assert f"dataset: version {version[:12]} (the run's manifest_sha256), made by tessera 0.1.0 (abc)\n" in out
    assert "rendered more than one way" not in out
    # amended by a run with another pydicom: said, as what the run will train on
    rendered = {"tessera": "dicom rendering 1", "pydicom": "3.0.2"}
    amended = [mf.Amendment(time="t", added=1, rendered_with=rendered | {"pydicom": "3.0.1"})]
    mf.save(made.model_copy(update={"rendered_with": rendered, "amended": amended}), str(tmp_path / "ds"))
    assert main(["train", "ct_ich_sequence_vivit", f"data.dataset={tmp_path / 'ds'}", "--dry-run"]) == 0
    assert "dataset: its samples were rendered more than one way (pydicom 3.0.1 | 3.0.2; " in capsys.readouterr().out


def test_dry_run_says_whether_the_stored_images_need_a_resize(capsys, tmp_path):
    from shards import manifest as mf
    from tests.datasets import make_dataset

    url = str(tmp_path / "ds")
    manifest = make_dataset(url, {"train": 2, "val": 2})

    def last_line(kind: str, config: dict) -> str:
        mf.save(manifest.model_copy(update={"kind": kind, "config": config}), url)
        assert main(["train", "demo_tiles", f"data.dataset={url}", "--dry-run"]) == 0  # demo_tiles: 64 px
        return capsys.readouterr().out.splitlines()[-2]  # before the cluster's line

    assert last_line("wsi", {"tile_size": 600, "store_size": None}) == (
        "input: stored at 600 px, resized to 64 px for every sample in every epoch "
        "(ingest with --store-size 64 to store them at the training size)"
    )
    assert last_line("wsi", {"tile_size": 600, "store_size": 64}) == (
        "input: stored at 64 px, the training size: decoded without a resize"
    )
    assert last_line("images", {"store_size": None}) == (
        "input: stored at their own sizes (no --store-size), resized to 64 px where they differ"
    )


def test_dry_run_says_which_split_is_held_out(capsys, tmp_path):
    from tests.datasets import make_dataset

    def held_out(splits: dict[str, int], *overrides: str) -> str:
        url = str(tmp_path / "-".join(splits))
        make_dataset(url, splits)
        assert main(["train", "demo_tiles", f"data.dataset={url}", *overrides, "--dry-run"]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("held-out:"))

    three = {"train": 2, "val": 2, "test": 3}
    assert held_out(three) == "held-out: the test split (3 samples), with the selected model after training"
    assert held_out(three, "data.test_split=null") == "held-out: none (data.test_split: null)"
    assert held_out({"train": 2, "val": 2}) == "held-out: none (the dataset has no test split; it has train, val)"
    # and what it reports besides the metrics
    point = ["eval.operating_point=sensitivity:0.9", "eval.positive=class1", "eval.calibration=temperature"]
    assert main(["train", "demo_tiles", f"data.dataset={tmp_path / 'train-val-test'}", *point, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    at = out.index("held-out: the test split (3 samples), with the selected model after training")
    assert out[at + 1 : at + 4] == [
        "  its metrics' 95% intervals from 1000 bootstrap resamples of its patients",
        "  sensitivity, specificity, PPV and NPV at the threshold sensitivity:0.9 chooses for class1 on validation",
        "  its probabilities scaled at each level by a temperature fitted on validation",
    ]


def test_dry_run_says_which_slides_get_heatmaps(capsys, tmp_path):
    from shards import manifest as mf
    from tests.datasets import make_dataset

    def said(splits: dict[str, int]) -> str:
        url = str(tmp_path / "-".join(splits))
        mf.save(make_dataset(url, splits).model_copy(update={"kind": "wsi"}), url)  # heatmaps are of slides
        assert main(["train", "demo_tiles", f"data.dataset={url}", "eval.heatmaps=true", "--dry-run"]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("held-out:"))

    assert said({"train": 2, "val": 2, "test": 3}) == (
        "held-out: the test split (3 samples), with the selected model after training; then heatmaps of the "
        "validation slides and of these"
    )
    assert said({"train": 2, "val": 2}) == (
        "held-out: none (the dataset has no test split; it has train, val); then heatmaps of the validation slides"
    )


def test_evaluation_prefixes_checks_and_summary():
    from training.eval_summary import summary
    from training.evaluation import EvalOutcome, check_prefix_free, metric_prefix
    from training.export import class_map

    assert metric_prefix("test") == "test_"
    assert metric_prefix("f0+f1") == "f0_f1_"
    assert metric_prefix("test", "site-2 holdout") == "site_2_holdout_"
    # training logs val_* and train_* per epoch: an evaluation of those splits must not add points to its curves
    assert metric_prefix("val") == "eval_val_"
    assert metric_prefix("train") == "eval_train_"
    assert metric_prefix("val", "valid") == "valid_"
    with pytest.raises(ValueError, match=r"evaluation name 'val swa': its metrics \(val_swa_\*\) would mix"):
        metric_prefix("val", "val swa")
    tags = {"dataset": "s3://x", "test_dataset": "s3://x", "external_test_dataset": "s3://y", "mlflow.user": "u"}
    for free in ("test_", "external_test_", "site_2_", "eval_val_"):
        check_prefix_free(tags, free, "r")
    for nested, other in (("test_patient_", "test_"), ("external_", "external_test_")):
        with pytest.raises(
            ValueError, match=rf"run r: metrics {nested}\* would mix with those of its evaluation {other}\*"
        ):
            check_prefix_free(tags, nested, "r")
    # a classifier's dataset of its classes, in another order or some alone: labels mapped to the model's order
    assert class_map(["a", "b"], ["a", "b"], "s3://x") is None
    assert class_map(["a", "b"], ["b", "a"], "s3://x") == [1, 0]
    assert class_map(["a", "b", "c"], ["c"], "s3://x") == [2]
    with pytest.raises(ValueError, match=r"s3://x: its classes \['a', 'd'\] are not the model's \['a', 'b'\], nor"):
        class_map(["a", "b"], ["a", "d"], "s3://x")
    with pytest.raises(ValueError, match=r"its classes \['any'\] are not the model's \['any', 'epidural'\]$"):
        class_map(["any", "epidural"], ["any"], "s3://x", "multilabel")
    metrics = {"test_accuracy": 0.75, "test_auc": 0.8, "test_loss": 0.4, "test_patient_accuracy": 1.0}
    metrics |= {"test_patient_f1": 1.0, "test_precision_a": 0.5}
    assert summary(EvalOutcome("r", "test_", "s3://x", "test", metrics, ["slide", "patient"])) == (
        "test split of s3://x, metrics test_* in the run:\n"
        "  sample: accuracy 0.7500, auc 0.8000\n"
        "  patient: accuracy 1.0000, f1 1.0000"
    )


def test_a_tune_dry_run_prints_each_sweep_and_leaves_the_cluster_check_to_the_run(capsys):
    # overrides after an option too, as users type them (argparse alone refused `workers=2` here)
    assert main(["tune", "demo_tiles", "--replicates", "2", "workers=2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "recipe: demo_tiles" in out and "- workers=2" in out
    assert out.splitlines()[-1].startswith("cluster: Ray at http://127.0.0.1:1: ConnectionError; whether it holds")


def test_a_tune_dry_run_checks_the_objective_against_a_dataset_it_can_read(tmp_path, capsys):
    import yaml

    from tests.datasets import make_dataset

    make_dataset(str(tmp_path / "ds"), {"train": 4, "val": 8}, size=16, shard_samples=4, sites=2)
    sweep = {
        "name": "lr", "recipe": "demo_tiles", "overrides": [f"data.dataset={tmp_path / 'ds'}"],
        "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}, "metric": "val_worst_site_acuracy", "mode": "max",
    }  # fmt: skip
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["tune", str(path), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "metric: 'val_worst_site_acuracy' is not a metric demo_tiles reports each epoch" in err
    assert "close: val_worst_site_accuracy" in err
    path.write_text(yaml.safe_dump(sweep | {"metric": "val_worst_site_accuracy"}))
    assert main(["tune", str(path), "--dry-run"]) == 0
    assert "the objective val_worst_site_accuracy checked against it" in capsys.readouterr().out


def test_overrides_are_taken_wherever_they_stand_and_other_words_are_refused(capsys):
    from cluster.cli import parse

    args = parse(["train", "demo_tiles", "epochs=2", "--dry-run", "epochs=3", "workers=1"])
    assert (args.recipe, args.overrides, args.dry_run) == ("demo_tiles", ["epochs=2", "epochs=3", "workers=1"], True)
    assert main(["train", "demo_tiles", "epochs=2", "--dry-run", "epochs=3"]) == 0
    assert "\nepochs: 3\n" in capsys.readouterr().out  # the later one wins
    for argv in (["train", "demo_tiles", "--dry-run", "oops"], ["status", "x=1"]):  # no override; no overrides
        with pytest.raises(SystemExit):
            parse(argv)
        assert "unrecognized arguments: " + argv[-1] in capsys.readouterr().err


def test_the_private_map_is_found_under_another_spelling_of_the_dataset(tmp_path, monkeypatch):
    """An ingest given `--out ./ds` keeps its map under the dataset's absolute path; `tessera predict --dataset
    /abs/ds/ --reveal` finds it, as does the manifest's own spelling; a map named before names were made absolute
    (after `./ds` as given) is still found."""
    from cluster.cli_ingest import keep_private, private_map
    from cluster.settings import load_settings

    monkeypatch.chdir(tmp_path)
    settings = load_settings(state_dir=tmp_path / "state")
    saved = keep_private(settings, "./ds")({"aa": "patient 1"})
    assert saved.name == f"{tmp_path}/ds.sources.json".replace("/", "_")
    assert saved.parent.stat().st_mode & 0o777 == 0o700
    assert private_map(settings, f"{tmp_path}/ds/") == private_map(settings, "ds") == saved
    assert private_map(settings, "s3://b/elsewhere", "./ds") == saved  # the manifest's spelling, given as well
    assert private_map(settings, "s3://b/new/").name == "s3_b_new.sources.json"  # none yet: the URL's own
    saved.rename(saved.with_name("._old.sources.json"))  # as an earlier version named `--out ./old`'s map
    assert private_map(settings, "./old") == saved.with_name("._old.sources.json")


def test_local_paths_are_made_absolute_where_the_command_runs(tmp_path, monkeypatch):
    """Ray workers do not share the command's working directory (an ingest actor's is the node's where the
    cluster started; Ray Train runs its workers in its run folder): `--out ./ds` wrote the shards under the
    cluster's folder and the manifest under the command's. Every local path is anchored on the driver; URLs and
    hub names stay as they are."""
    from ingest.config import ImagesIngestConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sam").mkdir()
    (tmp_path / "w.pth").touch()
    cfg = WsiIngestConfig(sources=["slides"], out="./ds/", labels="labels.csv", background_model="bg.ts")
    assert (cfg.out, cfg.labels) == (str(tmp_path / "ds"), str(tmp_path / "labels.csv"))
    assert cfg.background_model == "bg.ts"  # not here: a reference for elsewhere, refused by name where read
    images = ImagesIngestConfig(sources=["x"], out="s3://b/ds", boxes="yolo", sam_model="sam")
    assert (images.out, images.boxes, images.sam_model) == ("s3://b/ds", str(tmp_path / "yolo"), str(tmp_path / "sam"))
    assert ImagesIngestConfig(sources=["x"], out="o").sam_model == "facebook/sam-vit-base"  # a hub name
    recipe = load_recipe("demo_tiles", ["data.dataset=ds", "model.weights=w.pth"])
    assert (recipe.data.dataset, recipe.model.weights) == (str(tmp_path / "ds"), str(tmp_path / "w.pth"))
    assert load_recipe("demo_tiles", ["model.weights=timm/resnet50.a1_in1k"]).model.weights == "timm/resnet50.a1_in1k"
