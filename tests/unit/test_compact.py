"""`tessera dataset --compact`: a split's small shards joined byte for byte into one in the place of the first,
the records renamed, the history told, the old shards pruned; a shard alone or large enough is left."""

from pathlib import Path

from ingest.compact import compact, small_groups
from ingest.config import WsiIngestConfig
from ingest.lock import holder
from shards import manifest as mf
from shards import provenance
from shards.manifest import InputRecord
from shards.verify import verify_dataset
from shards.writer import ShardWriter, read_tar_samples


def _dataset(out: str) -> mf.Manifest:
    def shard(split, index, keys, label):
        with ShardWriter(f"{out}/{split}", target_bytes=1 << 40, start_index=index) as writer:
            for key in keys:
                writer.write({"__key__": key, "jpg": key.encode() * 400, "cls": str(label)})
        return writer.shards[0]

    # train: one shard near the target, then three small ones from later runs (4: a rewrite's, after a gap)
    train = [
        shard("train", 0, [f"A_{i}" for i in range(12)], 0),
        shard("train", 1, ["B_1", "B_2"], 1),
        shard("train", 2, ["C_1"], 0),
        shard("train", 4, ["D_1", "D_2"], 1),
    ]
    val = [shard("val", 0, ["E_1"], 0)]  # small, but alone in its split
    cfg = WsiIngestConfig(sources=["x"], out=out, split="train=0.8,val=0.2", shard_size=64 * 1024)
    manifest = mf.Manifest(dataset=out, kind="wsi", classes=["CE", "LAA"], config=cfg.public())
    manifest.splits = {
        "train": mf.SplitInfo(num_samples=17, shards=train),
        "val": mf.SplitInfo(num_samples=1, shards=val),
    }
    where = {"a": "train/shard-000000.tar", "b": "train/shard-000001.tar", "c": "train/shard-000002.tar"}
    where |= {"d": "train/shard-000004.tar", "e": "val/shard-000000.tar"}
    common = {"kind": "wsi", "status": "ingested", "label": 0, "samples": 1}
    manifest.inputs = [
        InputRecord(id=i, item=i.upper(), patient=f"p{i}", split=s.split("/")[0], shards=[s], **common)
        for i, s in where.items()
    ]
    mf.save(manifest, out)
    return manifest


def test_compacting_joins_a_splits_small_shards_in_place_and_renames_them_in_the_records(tmp_path):
    out = str(tmp_path / "ds")
    before = _dataset(out)
    version = mf.sha256_of(Path(out, "manifest.json").read_bytes())
    assert small_groups(before, 64 * 1024) == {"train": [["shard-000001.tar", "shard-000002.tar", "shard-000004.tar"]]}
    dry, groups = compact(out, dry_run=True)
    assert dry == before and groups and mf.sha256_of(Path(out, "manifest.json").read_bytes()) == version

    after, groups = compact(out)
    assert [s.name for s in after.splits["train"].shards] == ["shard-000000.tar", "shard-000005.tar"]
    assert after.splits["val"] == before.splits["val"] and after.splits["train"].num_samples == 17
    merged = [s["__key__"] for s in read_tar_samples(Path(out, "train", "shard-000005.tar"))]
    assert merged == ["B_1", "B_2", "C_1", "D_1", "D_2"]  # byte for byte, in the split's order
    assert after.sample_classes("train") == before.sample_classes("train")
    shards = {r.id: r.shards for r in after.inputs}
    assert shards == {"a": ["train/shard-000000.tar"], "b": ["train/shard-000005.tar"], "c": ["train/shard-000005.tar"],
                      "d": ["train/shard-000005.tar"], "e": ["val/shard-000000.tar"]}  # fmt: skip
    change = after.amended[-1]
    assert (change.merged, change.merged_into, change.previous_sha256) == (3, 1, version)
    assert change.made_by == provenance.made_by()  # the code that merged them
    assert change.describe() == "3 small shard(s) merged into 1"
    assert mf.change_since(version, after, Path(out, "manifest.json").read_bytes()) == "grown"  # same patients
    assert verify_dataset(out) == [] and holder(out) is None
    left = sorted(p.relative_to(out).as_posix() for p in Path(out).rglob("shard-*"))
    assert left == [f"{s}/shard-{n}.{x}" for s, n in (("train", "000000"), ("train", "000005"), ("val", "000000"))
                    for x in ("idx", "tar")]  # fmt: skip

    again, groups = compact(out)
    assert not groups and again == mf.load(out)  # nothing left to merge: nothing written
