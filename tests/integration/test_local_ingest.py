"""Local disk in, local disk out, no stack running: the CLI ingest starts Ray in its own process."""

import json
import os
import socket
import subprocess
import sys

from ingest.config import WsiIngestConfig
from ingest.lock import DatasetLock
from ingest.rendering import rendered_with
from ingest.synthetic import make_slides
from shards import manifest as mf
from shards.schema import decode_image
from tests.integration.commands import ingest_wsi_cmd


def _damage_a_tile(slide) -> None:
    """Zero level 0's source tile at (512, 512) of ``slide`` (256 px tiles), under three of its kept 128 px tiles:
    no JPEG is left."""
    import tifffile

    with tifffile.TiffFile(slide) as tif:
        offset, count = tif.pages[0].dataoffsets[10], tif.pages[0].databytecounts[10]
    with open(slide, "r+b") as f:
        f.seek(offset)
        f.write(bytes(count))


def test_cli_ingest_to_local_disk_without_a_stack(tmp_path):
    slides = tmp_path / "slides"
    paths, labels = make_slides(slides, n=2, size=1024, seed=9)
    _damage_a_tile(paths[1])
    env = dict(os.environ)
    env.update(
        {
            "TESSERA_STATE_DIR": str(tmp_path / "nostack"),
            "TESSERA_RAY_DASHBOARD_PORT": "3",
            "TESSERA_PSEUDONYM_KEY": "local-test-key",
        }
    )
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "dataset"
    cmd = ingest_wsi_cmd(slides, out, "--labels", str(labels), "--split", "train=1.0")  # both slides: many shards
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"manifest: {out}/manifest.json" in run.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["status"] for r in manifest["inputs"]] == ["ingested", "ingested"]
    assert manifest["classes"] == ["CE", "LAA"]
    assert [r["site"] for r in manifest["inputs"]] == ["11", "11"]  # the label table's center_id
    # the damaged source tile (of level 0, which these slides' mask is read from too) costs the tissue under it,
    # said, not its slide (its three tiles there: ingest.wsi.read_mask_in_pieces)
    [hurt] = [r for r in manifest["inputs"] if r.get("warnings")]
    assert hurt["samples"] == 19 - 3, hurt
    damaged = "1 of 16 parts of the level the tissue mask is read from could not be read (damaged)"
    assert hurt["warnings"][0].startswith(damaged) and "Not a JPEG file" in hurt["warnings"][0], hurt["warnings"]
    previews = {r["item"]: decode_image((out / f"previews/{r['item']}.png").read_bytes()) for r in manifest["inputs"]}
    crossed = {item: bool((png == [255, 140, 0]).all(axis=2).any()) for item, png in previews.items()}  # orange
    assert crossed == {r["item"]: r is hurt for r in manifest["inputs"]}  # the part not read, on its preview only
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-000000.idx", "shard-000000.tar"]

    # The same command again does nothing but tidy up: a shard that a run stopped between its manifest and its
    # pruning left is deleted. Other options would replace the dataset, so they need --overwrite.
    (out / "train" / "shard-000007.tar").write_bytes(b"an earlier version's shard")
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-2000:]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-000000.idx", "shard-000000.tar"]
    small_cmd = [*cmd, "--shard-size", "20KB"]
    refused = subprocess.run(small_cmd, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "shard_size 1073741824 -> 20480. --overwrite replaces it" in refused.stderr

    # Re-ingest into the same place with small shards, then again with one slide: every file left under a split
    # is one the newest manifest lists, and each input names the shards its samples went to.
    small = subprocess.run([*small_cmd, "--overwrite"], env=env, capture_output=True, text=True, timeout=300)
    assert small.returncode == 0, small.stderr[-2000:]
    many = json.loads((out / "manifest.json").read_text())
    assert len(many["splits"]["train"]["shards"]) > 1
    one = slides / sorted(os.listdir(slides))[0]
    last_cmd = [*ingest_wsi_cmd(one, out), "--overwrite"]
    last = subprocess.run(last_cmd, env=env, capture_output=True, text=True, timeout=300)
    assert last.returncode == 0, last.stderr[-2000:]
    final = json.loads((out / "manifest.json").read_text())
    listed = {f"{split}/{s['name']}" for split, info in final["splits"].items() for s in info["shards"]}
    listed |= {n.replace(".tar", ".idx") for n in listed}
    on_disk = {f"{d.name}/{p.name}" for d in out.iterdir() if d.is_dir() and d.name != "previews" for p in d.iterdir()}
    assert on_disk == listed
    assert {s for r in final["inputs"] for s in r["shards"]} == {n for n in listed if n.endswith(".tar")}
    assert {p.stem for p in (out / "previews").iterdir()} == {r["item"] for r in final["inputs"]}  # the one slide
    assert not (out / "_ingest.lock").exists()  # each run released the dataset


def test_a_grown_slide_folder_is_appended_through_the_cli(tmp_path):
    """A folder and label table that grew (a slide labelled since, a new patient's slide, a held patient's second
    slide): --append ingests those three alone, into new shards, and leaves the dataset's own shards and records
    as they were; the held patient's new slide joins that patient's split."""
    import csv
    import hashlib

    from shards.verify import verify_dataset
    from shards.writer import read_tar_samples

    slides = tmp_path / "slides"
    paths, labels = make_slides(slides, n=5, size=1024, seed=11)
    rows = list(csv.DictReader(labels.open()))
    rows[4]["patient_id"] = rows[0]["patient_id"]  # slide 4: a second slide of slide 0's patient (both CE)
    later = tmp_path / "later"
    later.mkdir()
    for path in paths[3:]:
        path.rename(later / path.name)

    def table(name, chosen):
        out = tmp_path / name
        with out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(chosen)
        return out

    env = dict(os.environ, TESSERA_STATE_DIR=str(tmp_path / "state"), TESSERA_PSEUDONYM_KEY="append-key")
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "dataset"
    first = subprocess.run(
        ingest_wsi_cmd(slides, out, "--labels", str(table("first.csv", rows[:2]))),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    before_bytes = (out / "manifest.json").read_bytes()
    before = json.loads(before_bytes)
    assert sorted(r["status"] for r in before["inputs"]) == ["ingested", "ingested", "skipped"]  # slide 2: no row
    shards_before = {p.relative_to(out): p.read_bytes() for p in out.glob("*/shard-*")}

    for path in paths[3:]:
        (later / path.name).rename(path)
    cmd = ingest_wsi_cmd(slides, out, "--labels", str(table("all.csv", rows)))
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--append adds the new inputs to it (the rest as they are)" in refused.stderr
    dry = subprocess.run([*cmd, "--append", "--dry-run"], env=env, capture_output=True, text=True, timeout=300)
    assert "a run would add 3 input(s), adding their shards to it" in dry.stdout, dry.stderr[-2000:]
    grown = subprocess.run([*cmd, "--append"], env=env, capture_output=True, text=True, timeout=300)
    assert grown.returncode == 0, grown.stderr[-2000:]
    assert "amended 1 time(s); last " in grown.stdout and ": 3 added, 0 retried" in grown.stdout
    assert "rendered otherwise" not in grown.stdout and "amended now by" not in grown.stdout  # rendered alike

    after = json.loads((out / "manifest.json").read_text())
    assert {p: b for p, b in shards_before.items()} == {p: (out / p).read_bytes() for p in shards_before}
    assert [r["status"] for r in after["inputs"]] == ["ingested"] * 5 and after["created"] == before["created"]
    kept = {r["id"]: r for r in before["inputs"] if r["status"] == "ingested"}
    assert all(r == kept[r["id"]] for r in after["inputs"] if r["id"] in kept)
    assert [(a["added"], a["retried"]) for a in after["amended"]] == [(3, 0)]
    assert after["amended"][0]["previous_sha256"] == hashlib.sha256(before_bytes).hexdigest()  # what it grew from
    private = json.loads(next((tmp_path / "state" / "private").glob("*.sources.json")).read_text())
    split_of = {private[r["id"]]: r["split"] for r in after["inputs"]}
    assert split_of[str(paths[4])] == split_of[str(paths[0])]  # the held patient's new slide joins its split
    for split, info in after["splits"].items():  # the dataset's shards first, then the added ones
        assert info["shards"][: len(before["splits"].get(split, {}).get("shards", []))] == before["splits"].get(
            split, {}
        ).get("shards", [])
    assert verify_dataset(str(out)) == []
    keys = [s["__key__"] for p in out.glob("*/shard-*.tar") for s in read_tar_samples(p)]
    assert len(keys) == len(set(keys)) == sum(r["samples"] for r in after["inputs"])
    again = subprocess.run([*cmd, "--append"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-2000:]

    # A slide rescanned in place (here: another slide's bytes under its name) and a corrected diagnosis are
    # differences, --append or not; --replace-changed ingests those two slides again and rewrites the shards that
    # held their old samples without them.
    paths[1].write_bytes(paths[2].read_bytes())
    rows[3]["label"] = "LAA" if rows[3]["label"] == "CE" else "CE"
    table("all.csv", rows)
    rescanned = subprocess.run([*cmd, "--append"], env=env, capture_output=True, text=True, timeout=300)
    assert rescanned.returncode != 0
    assert "1 input(s) whose files changed since it was made" in rescanned.stderr, rescanned.stderr[-2000:]
    assert "1 input(s) with another label, patient or split" in rescanned.stderr
    assert "--replace-changed ingests the changed inputs again (the rest as they are)" in rescanned.stderr
    with DatasetLock(str(out), "ingest wsi --append"):  # another run at work on it: refused, and `dataset` says so
        busy = subprocess.run(
            [*cmd, "--append", "--replace-changed"], env=env, capture_output=True, text=True, timeout=300
        )
        shown = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "dataset", str(out)], env=env, capture_output=True, text=True
        )
    mine = f"ingest wsi --append (pid {os.getpid()} on {socket.gethostname()}, started "
    assert busy.returncode != 0 and f"another ingest is writing to this dataset: {mine}" in busy.stderr, busy.stderr
    assert f"another ingest is writing to it now: {mine}" in shown.stdout, shown.stderr[-2000:]
    assert json.loads((out / "manifest.json").read_text()) == after  # the refused run changed nothing
    replaced = subprocess.run(
        [*cmd, "--append", "--replace-changed"], env=env, capture_output=True, text=True, timeout=300
    )
    assert replaced.returncode == 0 and ": 0 added, 0 retried, 2 replaced" in replaced.stdout, replaced.stderr[-2000:]
    # What rendered the samples: the workers' libraries, recorded by the run that made it and by each amending one.
    # A dataset made with other libraries than a run's: the run says which before its work.
    made = mf.load(str(out))
    assert made.rendered_with == rendered_with(WsiIngestConfig(sources=[str(slides)], out=str(out)))
    assert [a.rendered_with for a in made.amended] == [made.rendered_with] * 2
    made.rendered_with = made.rendered_with | {"numpy": "1.26.4"}
    mf.save(made, str(out))
    # Each slide rescanned once more: the new shards are numbered after the highest number listed, not after how
    # many are listed (a rewrite took new numbers and left gaps), so none is written over a listed one.
    for path in paths[3:]:
        path.write_bytes(path.read_bytes() + b"\0")
    twice = subprocess.run([*cmd, "--append", "--replace-changed"], env=env, capture_output=True, text=True)
    assert twice.returncode == 0 and ": 0 added, 0 retried, 2 replaced" in twice.stdout, twice.stderr[-2000:]
    assert f"{out}: its samples were rendered otherwise than this run renders (numpy 1.26.4 | " in twice.stdout
    final = json.loads((out / "manifest.json").read_text())
    assert verify_dataset(str(out)) == [] and [a["replaced"] for a in final["amended"]] == [0, 2, 2]
    listed = {f"{split}/{s['name']}" for split, info in final["splits"].items() for s in info["shards"]}
    assert {p.relative_to(out).as_posix() for p in out.glob("*/shard-*.tar")} == listed  # the old ones pruned
    assert {s for r in final["inputs"] for s in r["shards"]} == listed
    clean_out = tmp_path / "clean"
    clean = subprocess.run(
        ingest_wsi_cmd(slides, clean_out, "--labels", str(table("all.csv", rows))),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert clean.returncode == 0, clean.stderr[-2000:]

    def samples(root):
        return {s["__key__"]: (s["jpg"], s["cls"]) for p in root.glob("*/shard-*.tar") for s in read_tar_samples(p)}

    assert samples(out) == samples(clean_out)  # every sample, and its label, as made from today's files and table

    # Grown and replaced in small runs, the dataset has more shards than a clean ingest: --compact merges them
    # (a split's shards under half of --shard-size, the default 1 GB, into one), sample for sample the same.
    many = {split: len(info["shards"]) for split, info in final["splits"].items()}
    assert sum(many.values()) > len(list(clean_out.glob("*/shard-*.tar")))
    ds = [sys.executable, "-m", "cluster.cli", "dataset", str(out)]
    merged = subprocess.run([*ds, "--compact"], env=env, capture_output=True, text=True, timeout=300)
    gone = {split: n for split, n in many.items() if n > 1}
    told = ", ".join(f"{split}: {n} into 1" for split, n in gone.items())
    assert f"merged {sum(gone.values())} small shard(s) into {len(gone)} ({told})" in merged.stdout, merged.stderr
    assert f"small shard(s) merged into {len(gone)} (from version " in merged.stdout
    compacted = json.loads((out / "manifest.json").read_text())
    assert all(len(info["shards"]) == 1 for info in compacted["splits"].values()) and verify_dataset(str(out)) == []
    assert samples(out) == samples(clean_out)
    listed = {f"{split}/{s['name']}" for split, info in compacted["splits"].items() for s in info["shards"]}
    assert {p.relative_to(out).as_posix() for p in out.glob("*/shard-*.tar")} == listed
    assert {s for r in compacted["inputs"] for s in r["shards"]} == listed
    again = subprocess.run([*ds, "--compact"], env=env, capture_output=True, text=True, timeout=300)
    assert "nothing to merge" in again.stdout and json.loads((out / "manifest.json").read_text()) == compacted

    # `tessera dataset --verify`: its version, splits and history, every shard read; a damaged shard is named
    show = [*ds, "--verify"]
    (out / "train" / "shard-000099.tar").write_bytes(b"left by a stopped run")  # named, not a problem
    shown = subprocess.run(show, env=env, capture_output=True, text=True, timeout=300)
    assert f"not listed: {out}/train/shard-000099.tar\n1 shard(s), preview(s) or spool" in shown.stdout
    version = hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert shown.returncode == 0 and f"version {version}" in shown.stdout, shown.stderr[-2000:]
    assert ": 3 added, 0 retried, 0 replaced" in shown.stdout and ": 0 added, 0 retried, 2 replaced" in shown.stdout
    assert f"verified {len(listed)} shard(s): all as listed" in shown.stdout and str(slides) not in shown.stdout
    damaged = out / sorted(listed)[0]
    damaged.write_bytes(damaged.read_bytes() + b"\0")
    broken = subprocess.run(show, env=env, capture_output=True, text=True, timeout=300)
    assert broken.returncode == 1 and f"problem: {damaged}: size" in broken.stdout, broken.stdout[-2000:]


def test_a_real_scanner_file_through_the_cli_leaves_its_identity_behind(tmp_path):
    """The Aperio file of ``tests/data`` (its label photo, file name, user and scanner in its properties) with a
    STRIP AI label table: the shards, index, preview and manifest carry pseudonyms only."""
    import openslide

    from tests.vendor_checks import REAL_SLIDE as SLIDE

    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / SLIDE.name).symlink_to(SLIDE)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"image_id,center_id,patient_id,image_num,label\n{SLIDE.stem},11,PT-0042,0,CE\n")
    env = {**os.environ, "TESSERA_STATE_DIR": str(tmp_path / "state"), "TESSERA_PSEUDONYM_KEY": "real-file-key"}
    env["TESSERA_RAY_DASHBOARD_PORT"] = "3"
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "dataset"
    cmd = ingest_wsi_cmd(slides, out, "--labels", str(labels), "--split", "train=1.0", "--magnification", "10")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    [record] = manifest["inputs"]
    assert record["status"] == "ingested" and record["samples"] > 0 and manifest["classes"] == ["CE"]
    assert (out / "previews" / f"{record['item']}.png").exists()
    with openslide.OpenSlide(str(SLIDE)) as slide:
        private = [slide.properties[f"aperio.{k}"] for k in ("Filename", "User", "ImageID", "ScanScope ID", "Date")]
    private += [SLIDE.stem, "PT-0042", str(slides)]  # the dataset names its own location, not the sources
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(p.encode() in data for p in private), path
