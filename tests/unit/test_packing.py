"""Staged parts are cut into shards by the writer's size rule, before any shard is written; sources from the
object store are downloaded once per worker; a complete dataset is pruned of leftovers, and made again only when
asked."""

import json
import os
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from ingest.packing import SHARD_FILE, group_parts
from shards import provenance


def test_group_parts_closes_a_shard_once_it_reaches_the_target():
    parts = [("a", 40), ("b", 40), ("c", 40), ("d", 200), ("e", 10)]
    assert group_parts(parts, 100) == [["a", "b", "c"], ["d"], ["e"]]
    assert group_parts(parts, 1 << 30) == [["a", "b", "c", "d", "e"]]
    assert group_parts([], 100) == []


def test_only_split_shards_count_as_prunable():
    assert SHARD_FILE.fullmatch("train/shard-000003.tar") and SHARD_FILE.fullmatch("val/shard-000000.idx")
    assert not SHARD_FILE.fullmatch("_staging/w-0001/shard-000000.tar")
    assert not SHARD_FILE.fullmatch("other/train/shard-000000.tar")
    assert not SHARD_FILE.fullmatch("previews/shard-000000.png")


def test_prune_keeps_listed_shards_and_removes_stale_ones_and_crashed_spools(tmp_path):
    from ingest.packing import prune
    from shards import manifest as mf
    from shards.manifest import InputRecord, ShardInfo

    for rel in (
        "train/shard-000000.tar",
        "train/shard-000000.idx",
        "train/shard-000001.tar",  # an earlier run's: the new manifest lists one shard
        "train/.tessera-spool-x1/shard-000001.tar.tmp",  # a crashed run's shard in progress
        "previews/a.png",  # not a name Tessera gives: left alone
        "previews/0a1b2c3d4e5f6a7b.png",  # the preview of an input the manifest lists
        "previews/deadbeefdeadbeef.png",  # an earlier run's slide, not among this run's inputs
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    info = ShardInfo(name="shard-000000.tar", size=1, sha256="0" * 64, samples=1)
    manifest = mf.Manifest(
        dataset=str(tmp_path),
        kind="wsi",
        splits={"train": mf.SplitInfo(num_samples=1, shards=[info])},
        inputs=[InputRecord(id="5ce", kind="wsi", status="skipped", item="0a1b2c3d4e5f6a7b")],
    )
    prune(str(tmp_path), manifest)
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == [
        "previews",
        "previews/0a1b2c3d4e5f6a7b.png",
        "previews/a.png",
        "train",
        "train/shard-000000.idx",
        "train/shard-000000.tar",
    ]


def test_source_cache_downloads_each_slide_once_and_keeps_the_last_few(tmp_path, monkeypatch):
    from ingest.source_cache import SourceCache
    from shards import storage

    fetched = []
    real_get_file = storage.get_file

    def counting_get_file(url, local):  # the real copy, counted
        fetched.append(url)
        return real_get_file(url, local)

    monkeypatch.setattr(storage, "get_file", counting_get_file)
    sources = []
    for name in "abc":
        (tmp_path / f"{name}.svs").write_bytes(name.encode() * 10)
        sources.append(str(tmp_path / f"{name}.svs"))
    cache = SourceCache(slots=2, remote=lambda loc: loc.endswith(".svs"))
    a = cache.path(sources[0])
    assert a != sources[0] and Path(a).read_bytes() == b"a" * 10 and a.endswith(".svs")
    assert cache.path(sources[0]) == a and fetched == [sources[0]]  # every region of a slide: one download
    b = cache.path(sources[1])
    cache.path(sources[0])  # a is now the most recently used...
    c = cache.path(sources[2])  # ...so b makes room for c
    assert not os.path.exists(b) and os.path.exists(a) and os.path.exists(c)
    assert fetched == sources
    assert SourceCache(remote=lambda loc: False).path(sources[0]) == sources[0]  # local files pass through
    cache.clear()
    assert not os.path.exists(a) and not os.path.exists(c)


def test_source_cache_fetches_a_slide_ahead_while_the_current_one_is_used(tmp_path, monkeypatch):
    from ingest.source_cache import SourceCache
    from shards import storage

    started, release, fetched = threading.Event(), threading.Event(), []
    real_get_file = storage.get_file

    def slow_get_file(url, local):  # b's download waits for the test to let it finish
        fetched.append(url)
        if url.endswith("b.svs"):
            started.set()
            assert release.wait(10)
        if url.endswith("d.svs") and fetched.count(url) == 1:
            raise OSError(f"{url}: connection reset")  # its first try, in the background
        return real_get_file(url, local)

    monkeypatch.setattr(storage, "get_file", slow_get_file)
    a, b, c, d = [tmp_path / f"{name}.svs" for name in "abcd"]
    for f in (a, b, c, d):
        f.write_bytes(f.stem.encode() * 10)
    cache = SourceCache(slots=2, remote=lambda loc: True)
    local_a = cache.path(str(a))
    cache.fetch_ahead([str(b)], keep=[str(a)])  # returns at once: b downloads in a thread of its own
    assert started.wait(10) and cache.path(str(a)) == local_a  # a is in use meanwhile
    release.set()
    local_b = cache.path(str(b))  # waits for b's download, and downloads nothing again
    assert Path(local_b).read_bytes() == b"b" * 10 and fetched == [str(a), str(b)]
    cache.path(str(b))
    cache.fetch_ahead([str(c)], keep=[str(a)])  # a is in use: b, though used after it, makes room
    assert os.path.exists(local_a) and not os.path.exists(local_b)
    assert Path(cache.path(str(c))).read_bytes() == b"c" * 10
    cache.fetch_ahead([str(d)], keep=[str(c)])
    assert Path(cache.path(str(d))).read_bytes() == b"d" * 10  # failed in the background: downloaded again here
    assert fetched == [str(a), str(b), str(c), str(d), str(d)]
    d.unlink()
    cache.fetch_ahead([str(a)], keep=[str(c)])
    local_a = cache.path(str(a))
    cache.fetch_ahead([str(d)], keep=[str(a)])  # fails in the background, and again where it is asked for
    with pytest.raises(storage.Missing, match=r"d\.svs"):
        cache.path(str(d))
    cache.clear()
    assert not os.path.exists(local_a)
    one = SourceCache(slots=1, remote=lambda loc: True)
    one.path(str(a))
    one.fetch_ahead([str(c)], keep=[str(a)])  # one slot: the next slide would push out the one in use
    assert fetched[-2:] == [str(d), str(a)]
    one.clear()


def test_source_cache_puts_a_slides_files_side_by_side(tmp_path):
    from ingest.source_cache import SourceCache

    files = []
    for i, name in enumerate(["l0.dcm", "l1.dcm", "label.dcm"]):
        folder = tmp_path / f"part{i}"  # the same name twice would clash in one folder
        folder.mkdir()
        (folder / name).write_bytes(name.encode())
        files.append(str(folder / name))
    cache = SourceCache(slots=1, remote=lambda loc: True)
    first = cache.path(files)
    assert os.path.basename(first) == "l0.dcm" and Path(first).read_bytes() == b"l0.dcm"
    beside = sorted(p.name for p in Path(first).parent.iterdir())
    assert beside == ["0_l1.dcm", "1_label.dcm", "l0.dcm"]
    assert cache.path(files) == first
    cache.path(files[1])  # one slot: the series makes room
    assert not Path(first).parent.exists()
    cache.clear()


def test_source_cache_keeps_a_mirax_data_folder_beside_its_slide(tmp_path):
    """OpenSlide opens ``x.mrxs`` only with ``x/Slidedat.ini`` and the data files in a folder beside it."""
    from ingest.source_cache import SourceCache, local_names

    store = tmp_path / "store"
    (store / "clot" / "sub").mkdir(parents=True)
    files = [store / "clot.mrxs", store / "clot" / "Data0000.dat", store / "clot" / "Slidedat.ini"]
    files.append(store / "clot" / "sub" / "Index.dat")
    for f in files:
        f.write_bytes(f.name.encode())
    locations = [str(f) for f in files]
    assert local_names(locations) == ["clot.mrxs", "clot/Data0000.dat", "clot/Slidedat.ini", "clot/sub/Index.dat"]
    cache = SourceCache(slots=1, remote=lambda loc: True)
    first = Path(cache.path(locations))
    assert first.name == "clot.mrxs"
    for f in files:
        local = first.parent / f.relative_to(store)
        assert local.read_bytes() == f.name.encode()
    cache.clear()
    assert not first.parent.exists()


def test_local_names_never_leave_the_slide_folder():
    from ingest.source_cache import local_names

    names = local_names(["s3://b/a/x.mrxs", "s3://b/a/x/../../y.dat", "s3://b/other/x.dat", "s3://b/a/x.dat"])
    assert names == ["x.mrxs", "0_y.dat", "1_x.dat", "x.dat"]


def test_a_complete_dataset_is_made_again_only_when_asked(tmp_path):
    """Same inputs and options: nothing to do (whatever the worker count); another dataset: refused without
    --overwrite, saying what differs; an interrupted run resumes with another worker count too."""
    from ingest.config import WsiIngestConfig
    from ingest.plan import Plan
    from ingest.rerun import decide, dry_run_line
    from ingest.staging import done_records
    from ingest.units import Unit
    from shards import manifest as mf
    from shards.manifest import InputRecord

    cfg = WsiIngestConfig(sources=["x"], out=str(tmp_path), workers=2)
    units = [Unit(uid, "wsi", [uid], f"s{uid}", "p1", 0) for uid in ("a1", "b2")]
    for u in units:
        u.split = "train"
    plan = Plan(units=units, skipped=[InputRecord(id="c3", kind="wsi", status="skipped", reason="not a slide")])
    plan.classes = ["CE", "LAA"]
    assert decide("wsi", plan, cfg) is None and dry_run_line("wsi", plan, cfg) is None  # nothing there yet
    records = [InputRecord(id=u.id, kind="wsi", status="ingested", patient="p1", label=0, split="train") for u in units]
    made = mf.Manifest(dataset=str(tmp_path), kind="wsi", classes=plan.classes, config=cfg.public())
    made.inputs = [*records, *plan.skipped]
    mf.save(made, str(tmp_path))

    assert decide("wsi", plan, cfg.model_copy(update={"workers": 8, "max_attempts": 1})).created == made.created
    assert dry_run_line("wsi", plan, cfg).endswith(
        "already holds this dataset (made " + made.created + "): a run would do nothing"
    )
    units[1].label, units[1].split = 1, "val"
    plan.units.append(Unit("d4", "wsi", ["d4"], "sd4", "p2", 0))
    other = cfg.model_copy(update={"tile_size": 300})
    message = (
        r"already holds a complete dataset \(3 inputs, made .*\) that this run would replace: options tile_size "
        r"600 -> 300; 1 input\(s\) it does not hold \(--append adds them\); 1 input\(s\) with another label, "
        r"patient or split\. "
        r"--overwrite replaces it"
    )
    with pytest.raises(ValueError, match=message):
        decide("wsi", plan, other)
    assert dry_run_line("wsi", plan, other).startswith("a run would be refused: ")
    assert decide("wsi", plan, other.model_copy(update={"overwrite": True})) is None
    plan.units = plan.units[:1]
    with pytest.raises(ValueError, match=r"replace: 1 of its inputs not among the sources\."):
        decide("wsi", plan, cfg)

    # staged work of an interrupted run: resumed with other workers, refused with other options
    done_records(cfg)
    assert done_records(cfg.model_copy(update={"workers": 1})) == {}
    with pytest.raises(ValueError, match="staged work of an interrupted run with other options"):
        done_records(other)


def _rec(uid, status, split="train", shards=(), samples=0, patient=None, label=None, fingerprint=None):
    from shards.manifest import InputRecord

    return InputRecord(
        id=uid,
        kind="wsi",
        status=status,
        split=split,
        shards=list(shards),
        samples=samples,
        patient=patient,
        label=label,
        fingerprint=fingerprint,
    )


def _shard(name, samples):
    from shards.manifest import ShardInfo

    return ShardInfo(name=name, samples=samples, size=10 * samples, sha256="0" * 64)


def test_retrying_the_failed_inputs_adds_their_shards_and_keeps_the_rest():
    """--retry-failed: only the failed inputs are ingested again; their shards are numbered after the dataset's,
    whose records and shards stay as they were; planning may settle a failed input (now skipped) without a
    worker."""
    from ingest.config import WsiIngestConfig
    from ingest.plan import Plan
    from ingest.rerun import amended, to_ingest
    from ingest.units import Unit
    from shards import manifest as mf

    units = [Unit(uid, "wsi", [uid], f"s{uid}", "p1", 0) for uid in ("a1", "b2", "c3")]
    plan = Plan(units=units, skipped=[_rec("d4", "skipped"), _rec("e5", "skipped")])
    previous = mf.Manifest(dataset="x", kind="wsi", created="2026-01-01T00:00:00+00:00")
    previous.splits = {"train": mf.SplitInfo(num_samples=5, shards=[_shard("shard-000000.tar", 5)])}
    previous.inputs = [
        _rec("a1", "ingested", shards=["train/shard-000000.tar"], samples=5),
        _rec("b2", "failed", split="val"),
        _rec("c3", "skipped"),
        _rec("d4", "failed"),
        _rec("e5", "skipped"),
    ]
    cfg = WsiIngestConfig(sources=["x"], out="y", retry_failed=True)
    assert not to_ingest(previous, plan, cfg.model_copy(update={"retry_failed": False}))  # nothing asked for
    adds = to_ingest(previous, plan, cfg)
    assert [u.id for u in adds.units] == ["b2"] and [r.id for r in adds.settled] == ["d4"]  # d4: planning settled it

    retried = [_rec("b2", "ingested", split="val", shards=["val/shard-000000.tar"], samples=3)]
    val = {"val": mf.SplitInfo(num_samples=3, shards=[_shard("shard-000000.tar", 3)])}
    rendered = {"tessera": "wsi rendering 1", "numpy": "2.4.6"}  # what its workers rendered with
    again = amended(previous, adds, plan, retried, val, "ab" * 32, rendered_with=rendered)
    assert again.created == previous.created
    assert again.amended[0].model_dump(exclude={"time"}) == {
        "added": 0,
        "retried": 2,
        "replaced": 0,
        "merged": 0,
        "merged_into": 0,
        "previous_sha256": "ab" * 32,
        "made_by": provenance.made_by(),  # the code that retried them
        "rendered_with": rendered,
    }
    statuses = {r.id: r.status for r in again.inputs}
    assert statuses == {"a1": "ingested", "b2": "ingested", "c3": "skipped", "d4": "skipped", "e5": "skipped"}
    assert again.inputs[0] == previous.inputs[0] and again.splits["train"] == previous.splits["train"]
    assert again.splits["val"].num_samples == 3
    train = {"train": mf.SplitInfo(num_samples=2, shards=[_shard("shard-000001.tar", 2)])}
    twice = amended(again, to_ingest(again, plan, cfg), plan, [], train)
    assert [s.name for s in twice.splits["train"].shards] == ["shard-000000.tar", "shard-000001.tar"]
    assert twice.splits["train"].num_samples == 7 and len(twice.amended) == 2

    with pytest.raises(ValueError, match="overwrite ingests every input again into a new dataset"):
        WsiIngestConfig(sources=["x"], out="y", overwrite=True, retry_failed=True)
    with pytest.raises(ValueError, match="give it without retry_failed, append or replace_changed"):
        WsiIngestConfig(sources=["x"], out="y", overwrite=True, append=True)


def test_appending_adds_new_inputs_and_keeps_the_datasets_own(tmp_path):
    """--append: inputs the dataset does not hold (or held as not in the label table) are added; those it holds
    keep their split even where the plan's own assignment, over more patients, would move them; a new slide of a
    patient it holds joins that patient's split; a relabelled input or a new class is still refused."""
    from ingest.config import WsiIngestConfig
    from ingest.plan import Plan
    from ingest.rerun import decide, dry_run_line, to_ingest
    from ingest.units import Unit
    from shards import manifest as mf

    cfg = WsiIngestConfig(sources=["x"], out=str(tmp_path), append=True, split="train=0.5,val=0.5")
    made = mf.Manifest(dataset=str(tmp_path), kind="wsi", classes=["CE", "LAA"], config=cfg.public())
    made.inputs = [
        _rec("a1", "ingested", split="train", patient="p1", label=0),
        _rec("b2", "ingested", split="val", patient="p2", label=0),
        _rec("c3", "skipped"),  # not in the label table then
        _rec("z9", "skipped"),  # not a slide file, still among the sources
    ]
    mf.save(made, str(tmp_path))

    def plan_of(*specs):
        units = []
        for uid, patient, label in specs:
            unit = Unit(uid, "wsi", [uid], f"s{uid}", patient, label)
            unit.split = "val" if uid == "a1" else "train"  # the plan's own split moves a1
            units.append(unit)
        plan = Plan(units=units, skipped=[_rec("z9", "skipped"), _rec("y8", "skipped")])
        plan.classes = ["CE", "LAA"]
        return plan

    plan = plan_of(("a1", "p1", 0), ("b2", "p2", 0), ("c3", "p3", 1), ("d4", "p1", 0), ("e5", "p4", 1))
    hint = r"3 input\(s\) it does not hold \(--append adds them\).*--append adds the new inputs to it"
    with pytest.raises(ValueError, match=hint):
        decide("wsi", plan, cfg.model_copy(update={"append": False}))
    assert decide("wsi", plan, cfg).created == made.created
    splits = {u.id: u.split for u in plan.units}
    assert (splits["a1"], splits["b2"], splits["d4"]) == ("train", "val", "train")  # held; p1's new slide joins p1
    assert {splits["c3"], splits["e5"]} == {"train", "val"}  # new patients of class 1: one each way
    adds = to_ingest(made, plan, cfg)
    assert [u.id for u in adds.added] == ["c3", "d4", "e5"] and [r.id for r in adds.settled] == ["y8"]
    fewer = plan_of(("a1", "p1", 0), ("b2", "p2", 0), ("c3", "p3", 1), ("e5", "p4", 1))
    assert dry_run_line("wsi", fewer, cfg).endswith("a run would add 3 input(s), adding their shards to it")  # y8 too
    # made with other libraries than this run's: the dry run says which first, as the run would
    from ingest.rendering import rendered_with

    made.rendered_with = rendered_with(cfg) | {"numpy": "1.26.4"}
    mf.save(made, str(tmp_path))
    note, line = dry_run_line("wsi", fewer, cfg).split("\n")
    assert "its samples were rendered otherwise than this run renders (numpy 1.26.4 -> " in note
    assert line.endswith("a run would add 3 input(s), adding their shards to it")

    relabelled = plan_of(("a1", "p1", 1), ("b2", "p2", 0))
    relabelled.skipped = [_rec("z9", "skipped"), _rec("c3", "skipped")]  # as the dataset has them
    hint = r"1 input\(s\) with another label, patient or split\. --replace-changed ingests the changed inputs again"
    with pytest.raises(ValueError, match=hint):
        decide("wsi", relabelled, cfg)
    replacing = cfg.model_copy(update={"replace_changed": True})  # a corrected diagnosis: a1 ingested again
    assert [u.id for u in to_ingest(decide("wsi", relabelled, replacing), relabelled, replacing).replaced] == ["a1"]
    moved = plan_of(("a1", "p2", 0), ("b2", "p2", 0))  # another patient is not a relabel
    moved.skipped = relabelled.skipped
    with pytest.raises(ValueError, match=r"1 input\(s\) with another label, patient or split\. --overwrite"):
        decide("wsi", moved, replacing)
    grown = plan_of(("a1", "p1", 0), ("b2", "p2", 0))
    grown.classes = ["CE", "LAA", "Other"]
    with pytest.raises(ValueError, match=r"classes \['CE', 'LAA'\] -> \['CE', 'LAA', 'Other'\]"):
        decide("wsi", grown, cfg)
    gone = plan_of(("a1", "p1", 0))
    with pytest.raises(ValueError, match="2 of its inputs not among the sources"):  # b2 and c3
        decide("wsi", gone, cfg)
    same = plan_of(("a1", "p1", 0), ("b2", "p2", 0))
    same.skipped = [_rec("z9", "skipped"), _rec("c3", "skipped")]  # c3 still not in the label table
    assert not to_ingest(decide("wsi", same, cfg), same, cfg)  # nothing new: nothing to do


def test_a_dataset_recorded_before_an_option_existed_takes_its_default(tmp_path):
    """A dataset made by a version without ``--segment``, ``--median`` (...) recorded no such options: appending
    to it compares them at their defaults, which do what that version did; another value is still refused."""
    from ingest.config import ImagesIngestConfig
    from ingest.plan import Plan
    from ingest.rerun import decide
    from ingest.units import Unit
    from shards import manifest as mf

    cfg = ImagesIngestConfig(sources=["x"], out=str(tmp_path), append=True, split="train=1.0")
    added_since = ("segment", "sam_model", "grayscale", "median")
    earlier = {k: v for k, v in cfg.public().items() if k not in added_since}
    made = mf.Manifest(dataset=str(tmp_path), kind="images", classes=["a"], config=earlier)
    made.inputs = [_rec("a1", "ingested", patient="p1", label=0)]
    mf.save(made, str(tmp_path))
    units = [Unit(uid, "image", [uid], f"s{uid}", f"p{uid[1]}", 0) for uid in ("a1", "b2")]
    for unit in units:
        unit.split = "train"
    plan = Plan(units=units, classes=["a"])
    assert decide("images", plan, cfg).created == made.created
    with pytest.raises(ValueError, match=r"options median 0 -> 3"):
        decide("images", plan, cfg.model_copy(update={"median": 3}))

    # the same for the staged work of a run that version left interrupted
    from ingest.config import dataset_options
    from ingest.staging import STAGING, done_records

    marker = tmp_path / "more" / STAGING / "config.json"
    marker.parent.mkdir(parents=True)
    more = cfg.model_copy(update={"out": str(tmp_path / "more")})
    marker.write_text(json.dumps(dataset_options({k: v for k, v in more.public().items() if k not in added_since})))
    assert done_records(more) == {}
    with pytest.raises(ValueError, match=r"other options \(median 0 -> 5\)"):
        done_records(more.model_copy(update={"median": 5}))


def test_the_dry_run_says_which_failed_inputs_a_retry_would_ingest(tmp_path):
    from ingest.config import WsiIngestConfig
    from ingest.plan import Plan
    from ingest.rerun import dry_run_line
    from ingest.units import Unit
    from shards import manifest as mf

    cfg = WsiIngestConfig(sources=["x"], out=str(tmp_path))
    unit = Unit("a1", "wsi", ["a1"], "sa1", "p1", 0)
    unit.split = "train"
    made = mf.Manifest(dataset=str(tmp_path), kind="wsi", config=cfg.public())
    made.inputs = [_rec("a1", "failed", patient="p1", label=0)]
    mf.save(made, str(tmp_path))
    plan = Plan(units=[unit], skipped=[])
    assert dry_run_line("wsi", plan, cfg).endswith(": a run would do nothing")
    retry = cfg.model_copy(update={"retry_failed": True})
    assert dry_run_line("wsi", plan, retry).endswith(
        ": a run would try its 1 failed input(s) again, adding their shards to it"
    )


def test_an_input_whose_files_changed_is_a_difference_unless_it_failed(tmp_path):
    """An input the dataset holds whose fingerprint changed (a slide rescanned in place) is a difference, also to
    --append; a failed input's file mended since is not (--retry-failed takes it); a record made before inputs had
    fingerprints has none to compare."""
    from ingest.config import WsiIngestConfig
    from ingest.plan import Plan
    from ingest.rerun import decide, dry_run_line, to_ingest
    from ingest.units import Unit
    from shards import manifest as mf

    cfg = WsiIngestConfig(sources=["x"], out=str(tmp_path), split="train=1.0")
    made = mf.Manifest(dataset=str(tmp_path), kind="wsi", config=cfg.public())
    made.inputs = [
        _rec("a1", "ingested", patient="p1", fingerprint="f-a1"),
        _rec("b2", "skipped", patient="p2", fingerprint="f-b2"),  # no tissue: its rescan may have some
        _rec("c3", "failed", patient="p3", fingerprint="f-c3"),
        _rec("d4", "ingested", patient="p4"),  # recorded before inputs had fingerprints
    ]
    mf.save(made, str(tmp_path))

    def plan_of(**changed):
        units = []
        for uid in ("a1", "b2", "c3", "d4"):
            units.append(Unit(uid, "wsi", [uid], f"s{uid}", f"p{uid[1]}", fingerprint=changed.get(uid, f"f-{uid}")))
            units[-1].split = "train"
        return Plan(units=units)

    assert not to_ingest(decide("wsi", plan_of(), cfg), plan_of(), cfg)  # the same files: nothing to do
    rescanned = plan_of(a1="f-a1-rescan", b2="f-b2-rescan")
    for how in (cfg, cfg.model_copy(update={"append": True})):
        with pytest.raises(
            ValueError,
            match=r"2 input\(s\) whose files changed since it was made: a1, b2\. --replace-changed ingests the",
        ):
            decide("wsi", rescanned, how)
    assert "a run would be refused" in dry_run_line("wsi", rescanned, cfg)
    mended = plan_of(c3="f-c3-copied-again", d4="f-d4")
    assert decide("wsi", mended, cfg) is not None
    retry = cfg.model_copy(update={"retry_failed": True})
    assert [u.id for u in to_ingest(decide("wsi", mended, retry), mended, retry).retried] == ["c3"]


def test_replacing_changed_inputs_rewrites_the_shards_that_held_them(tmp_path):
    """--replace-changed: a changed input is ingested again; each shard that held its old samples is written anew
    (next numbers) with the other inputs' samples, byte for byte and in order, or dropped when none is left; the
    manifest swaps them and renames them in the other inputs' records; prune then deletes the old ones."""
    from ingest.config import WsiIngestConfig
    from ingest.packing import prune, rewrite_shard
    from ingest.plan import Plan
    from ingest.rerun import amended, decide, dry_run_line, to_ingest
    from ingest.units import Unit
    from shards import manifest as mf
    from shards.verify import verify_dataset
    from shards.writer import ShardWriter, read_tar_samples

    out = str(tmp_path / "ds")

    def shard(index, keys):
        with ShardWriter(f"{out}/train", target_bytes=1 << 40, start_index=index) as writer:
            for key in keys:
                writer.write({"__key__": key, "jpg": key.encode() * 50, "cls": "0"})
        return writer.shards[0]

    old = [shard(0, ["A_1", "B_1", "A_2", "B_2"]), shard(1, ["C_1"]), shard(2, ["A_3"])]
    cfg = WsiIngestConfig(sources=["x"], out=out, split="train=1.0")
    previous = mf.Manifest(dataset=out, kind="wsi", classes=["x"], config=cfg.public())
    previous.splits = {"train": mf.SplitInfo(num_samples=7, shards=old)}
    shards_of = {"a": [0, 2], "b": [0], "c": [1]}
    previous.inputs = [
        replace(
            _rec(r, "ingested", patient=f"p{r}", label=0, fingerprint=f"f{r}", samples=1),
            item=r.upper(),
            shards=[f"train/shard-00000{i}.tar" for i in shards_of[r]],
        )
        for r in "abc"
    ]
    mf.save(previous, out)
    units = [Unit(r, "wsi", [r], r.upper(), f"p{r}", 0, split="train", fingerprint=f"f{r}") for r in "abc"]
    units[0].fingerprint = "fa-rescanned"
    plan = Plan(units=units, classes=["x"])
    with pytest.raises(ValueError, match=r"--replace-changed ingests the changed inputs again \(the rest as they"):
        decide("wsi", plan, cfg)
    replacing = cfg.model_copy(update={"replace_changed": True})
    adds = to_ingest(decide("wsi", plan, replacing), plan, replacing)
    assert [u.id for u in adds.replaced] == ["a"] and not adds.added and not adds.retried
    assert dry_run_line("wsi", plan, replacing).endswith(
        "ingest its 1 changed input(s) again, rewriting the 2 shard(s) that held them, adding their shards to it"
    )

    new_a = shard(3, ["A_1", "A_2"])  # the rescan's samples, as the workers pack them
    kept = rewrite_shard(out, "train", "shard-000000.tar", 4, ["A"])
    assert [x["__key__"] for x in read_tar_samples(tmp_path / "ds/train/shard-000004.tar")] == ["B_1", "B_2"]
    assert (kept.name, kept.samples) == ("shard-000004.tar", 2)
    assert rewrite_shard(out, "train", "shard-000002.tar", 5, ["A"]) is None  # only A's: gone
    assert not (tmp_path / "ds/train/shard-000005.tar").exists()

    record = _rec("a", "ingested", patient="pa", label=0, fingerprint="fa-rescanned", samples=2)
    record = replace(record, item="A", shards=["train/shard-000003.tar"])
    added = {"train": mf.SplitInfo(num_samples=2, shards=[new_a])}
    rewritten = {"train": {"shard-000000.tar": kept, "shard-000002.tar": None}}
    made = amended(previous, adds, plan, [record], added, "cd" * 32, rewritten)
    assert [x.name for x in made.splits["train"].shards] == ["shard-000001.tar", "shard-000003.tar", "shard-000004.tar"]
    assert made.splits["train"].next_index == 5  # the next run's shards: after the highest, not shard-000003 again
    assert made.splits["train"].num_samples == 5
    records = {r.id: r for r in made.inputs}
    assert records["b"].shards == ["train/shard-000004.tar"] and records["c"] == previous.inputs[2]
    assert records["a"] == record and (made.amended[0].replaced, made.amended[0].added) == (1, 0)
    mf.save(made, out)
    prune(out, made)
    assert sorted(p.name for p in (tmp_path / "ds/train").glob("*.tar")) == [
        x.name for x in made.splits["train"].shards
    ]
    assert verify_dataset(out) == []


def test_an_interrupted_runs_staged_records_are_read_many_at_a_time(tmp_path, monkeypatch):
    """A long run that stopped leaves a record per piece of work (tens of thousands): a GET each on an object
    store, read concurrently rather than one by one; every one is read, and nothing else in the staging."""
    import threading
    import time

    from ingest.config import WsiIngestConfig
    from ingest.staging import STAGING, WorkRecord, done_records
    from shards import storage

    cfg = WsiIngestConfig(sources=["x"], out=str(tmp_path), workers=2)
    done_records(cfg)  # the run's options, recorded
    for i in range(100):
        rec = WorkRecord(id=f"w{i}", unit=f"u{i}", index=0, status="ingested", samples=i)
        (tmp_path / STAGING / f"w{i}.json").write_text(rec.model_dump_json())
    (tmp_path / STAGING / "model").mkdir()
    (tmp_path / STAGING / "model" / "x.json").write_text("{}")  # not a record
    get, at_once, most = storage.get_bytes, [0], [0]
    lock = threading.Lock()

    def slow_get(url, *args, **kwargs):
        with lock:
            at_once[0] += 1
            most[0] = max(most[0], at_once[0])
        time.sleep(0.01)  # a request's latency
        with lock:
            at_once[0] -= 1
        return get(url, *args, **kwargs)

    monkeypatch.setattr(storage, "get_bytes", slow_get)
    done = done_records(cfg)
    assert sorted(done) == sorted(f"w{i}" for i in range(100)) and done["w7"].samples == 7
    assert most[0] > 1
