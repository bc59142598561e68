"""Staged parts are cut into shards by the writer's size rule, before any shard is written."""

from ingest.runner import SHARD_FILE, group_parts


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
