import pytest

from ingest.labels import class_names, read_label_csv
from ingest.pseudonym import pseudonym
from ingest.splits import assign_splits, parse_fractions


def test_parse_fractions():
    assert parse_fractions("train=0.7,val=0.15,test=0.15") == {"train": 0.7, "val": 0.15, "test": 0.15}
    with pytest.raises(ValueError, match="sum to 1"):
        parse_fractions("train=0.7,val=0.7")
    with pytest.raises(ValueError, match="name=fraction"):
        parse_fractions("train")


def test_splits_are_by_patient_stratified_and_stable():
    patients = {f"p{i}": i % 2 for i in range(20)}
    a = assign_splits(patients, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=1)
    b = assign_splits(dict(reversed(list(patients.items()))), {"train": 0.6, "val": 0.2, "test": 0.2}, seed=1)
    assert a == b  # independent of input order
    assert set(a) == set(patients)
    for label in (0, 1):
        counts = {
            s: sum(1 for p, sp in a.items() if sp == s and patients[p] == label) for s in ("train", "val", "test")
        }
        assert counts == {"train": 6, "val": 2, "test": 2}
    c = assign_splits(patients, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=2)
    assert c != a


def test_a_grown_dataset_keeps_its_splits_and_stays_near_the_fractions():
    from collections import Counter

    from ingest.splits import extend_splits

    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    held = {f"h{i}": ("train" if i < 8 else "val", 0) for i in range(10)}  # 8 / 2 / 0: test starved so far
    new = extend_splits(held, {"n1": 0, "n2": 0}, fractions, seed=0)
    assert set(new.values()) == {"test"}  # each goes where the split is furthest below its fraction
    assert extend_splits(held, {"n1": 0, "n2": 0}, fractions, seed=0) == new  # stable
    # Grown 3 patients at a time from nothing, per label, it stays within a patient of exact fractions.
    grown: dict[str, tuple[str, int]] = {}
    for step in range(20):
        batch = {f"p{step}-{i}": i % 2 for i in range(3)}
        grown |= {p: (s, batch[p]) for p, s in extend_splits(grown, batch, fractions, seed=1).items()}
    for label in (0, 1):
        counts = Counter(s for s, lab in grown.values() if lab == label)
        total = sum(counts.values())
        assert all(abs(counts[n] - f * total) <= 1 for n, f in fractions.items()), counts
    assert extend_splits({}, {"a": None}, fractions, seed=0) == {"a": "train"}  # a first patient: the largest


def test_strip_ai_and_generic_label_tables():
    strip = "image_id,center_id,patient_id,image_num,label\n006388_0,11,006388,0,CE\n008e5c_0,11,008e5c,0,LAA\n"
    rows = read_label_csv(strip)
    assert [(r.item, r.label, r.patient) for r in rows] == [
        ("006388_0", "CE", "006388"),
        ("008e5c_0", "LAA", "008e5c"),
    ]
    assert class_names(rows) == ["CE", "LAA"]
    generic = read_label_csv("slide,label\na,x\n")
    assert generic[0].patient is None
    with pytest.raises(ValueError, match=r"labels.csv: unknown label CSV columns"):
        read_label_csv("foo,bar\n1,2\n", source="labels.csv")
    with pytest.raises(ValueError, match="line 2"):
        read_label_csv("slide,label\n,x\n")


def test_pseudonyms_are_keyed_and_stable():
    assert pseudonym(b"k1", "patient", "MRN1") == pseudonym(b"k1", "patient", "MRN1")
    assert pseudonym(b"k1", "patient", "MRN1") != pseudonym(b"k2", "patient", "MRN1")
    assert pseudonym(b"k1", "patient", "MRN1") != pseudonym(b"k1", "series", "MRN1")
    assert "MRN1" not in pseudonym(b"k1", "patient", "MRN1")
    with pytest.raises(ValueError, match="pseudonym key"):
        pseudonym(b"", "patient", "x")
