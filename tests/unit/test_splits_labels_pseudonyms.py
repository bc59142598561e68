import pytest

from ingest.labels import class_names, read_label_csv
from ingest.pseudonym import pseudonym
from ingest.splits import assign_splits, linked_patients, parse_fractions


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


def test_patients_left_over_from_rounding_go_to_the_splits_furthest_below_their_fraction_overall():
    """Each class's patients left over from its whole quotas: by the class's own remainders (``per_class``, as
    before), eight patients of two classes at 0.7/0.15/0.15 gave test none and twelve of three gave test none too;
    ``overall`` sends each to the split furthest below its fraction of all patients, each class still within one
    patient of its own fractions."""
    from collections import Counter

    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}

    def sizes(patients: dict, fr: dict, balance: str) -> dict:
        return dict(Counter(assign_splits(patients, fr, seed=0, balance=balance).values()))

    eight = {f"p{i}": i % 2 for i in range(8)}
    assert sizes(eight, fractions, "per_class") == {"train": 6, "val": 2}
    assert sizes(eight, fractions, "overall") == {"train": 6, "val": 1, "test": 1}
    twelve = {f"p{i}": i % 3 for i in range(12)}
    assert sizes(twelve, fractions, "per_class") == {"train": 9, "val": 3}
    assert sizes(twelve, fractions, "overall") == {"train": 8, "val": 2, "test": 2}
    twenty = {f"p{i}": i % 4 for i in range(20)}
    assert sizes(twenty, fractions, "per_class") == {"train": 12, "val": 4, "test": 4}  # 60 % train
    assert sizes(twenty, fractions, "overall") == {"train": 14, "val": 3, "test": 3}
    for patients in (eight, twelve, twenty):
        splits = assign_splits(patients, fractions, seed=0)
        for label in set(patients.values()):
            n = sum(1 for lab in patients.values() if lab == label)
            got = Counter(s for p, s in splits.items() if patients[p] == label)
            assert all(int(f * n) <= got[name] <= int(f * n) + 1 for name, f in fractions.items()), (label, got)
    # paper 002's ten folds of CT-ICH's 82 patients (36 with a bleed): folds of 8 or 9, where 7 to 9 before
    ct_ich = {f"p{i}": int(i < 36) for i in range(82)}
    folds = {f"f{i}": 0.1 for i in range(10)}
    assert sorted(sizes(ct_ich, folds, "per_class").values()) == [7] * 4 + [9] * 6
    assert sorted(sizes(ct_ich, folds, "overall").values()) == [8] * 8 + [9] * 2
    # one group (no labels, or one class): the same patients in the same splits as before
    unlabelled = {f"p{i}": None for i in range(13)}
    assert assign_splits(unlabelled, fractions, 3) == assign_splits(unlabelled, fractions, 3, "per_class")


def test_a_placeholder_patient_id_that_holds_most_inputs_is_warned_of():
    """A de-identification that wrote one id (``ANONYMOUS``) for every patient puts every input in one split."""
    from ingest.splits import split_notes

    spec = "train=0.5,val=0.5"
    crowded = [("anon", "train")] * 8 + [("p1", "val"), ("p2", "val")]
    assert split_notes(spec, crowded) == [
        "warning: one patient (anon) holds 8 of the 10 inputs, all in one split: a placeholder patient id a "
        "de-identification wrote for all? Give each its own (a table's patient column)"
    ]
    assert split_notes(spec, crowded[3:]) == []  # fewer than ten inputs: a small cohort may be so
    assert split_notes(spec, [("anon", "train")] * 5 + [(f"p{i}", "val") for i in range(5)]) == []  # half: not more
    assert split_notes(spec, [("anon", "train")] * 12) == [
        "warning: split val holds no patient: 1 patient(s) are too few for --split train=0.5,val=0.5",
        "warning: one patient (anon) holds 12 of the 12 inputs, all in one split: a placeholder patient id a "
        "de-identification wrote for all? Give each its own (a table's patient column)",
    ]


def test_a_dataset_split_per_class_before_keeps_its_splits_when_its_command_is_run_again(tmp_path, capsys):
    """A dataset made before ``overall`` records no ``split_balance``: a run on it takes ``per_class``, so the
    same command finds it made, where the new default would move its patients and have the run refused."""
    from cluster.cli_dataset import dataset_lines
    from ingest.config import WsiIngestConfig
    from ingest.plan import make_plan
    from ingest.rerun import decide, recorded_balance
    from shards import manifest as mf
    from tests.datasets import held_manifest

    slides = tmp_path / "slides"
    slides.mkdir()
    rows = ["slide,label,patient"]
    for i in range(8):
        (slides / f"s{i}.svs").touch()
        rows.append(f"s{i},{'CE' if i % 2 else 'LAA'},p{i}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "ds")
    cfg = WsiIngestConfig(sources=[str(slides)], out=out, labels=str(tmp_path / "labels.csv"))
    before = cfg.model_copy(update={"split_balance": "per_class"})
    plan = make_plan("wsi", before, b"k")
    assert {u.split for u in plan.units} == {"train", "val"}
    assert plan.notes == ["warning: split test holds no patient: 8 patient(s) are too few for --split " + cfg.split]
    made = held_manifest(plan, before, "wsi")
    del made.config["split_balance"]  # as versions before recorded it
    mf.save(made, out)
    none = f"  test: none (--split {cfg.split} names it, but no patient's samples went there)"
    assert none in dataset_lines(made, b"")

    with pytest.raises(ValueError, match=r"1 input\(s\) with another label, patient or split"):
        decide("wsi", make_plan("wsi", cfg, b"k"), cfg)  # the new default would move a patient (val to test)
    again = recorded_balance(cfg)
    assert again.split_balance == "per_class"
    assert decide("wsi", make_plan("wsi", again, b"k"), again).created == made.created  # nothing to do
    asked = cfg.model_copy(update={"split_balance": "overall"})  # given on the command line: not overridden
    assert recorded_balance(asked).split_balance == "overall"
    with pytest.raises(ValueError, match="options split_balance 'per_class' -> 'overall'"):
        decide("wsi", make_plan("wsi", asked, b"k"), asked)
    fresh = cfg.model_copy(update={"out": str(tmp_path / "new")})
    assert recorded_balance(fresh).split_balance == "overall"  # nothing there: the default
    assert {u.split for u in make_plan("wsi", fresh, b"k").units} == {"train", "val", "test"}


def test_a_class_spelt_two_ways_is_refused_naming_where_each_is(tmp_path):
    """``CE`` on one line and ``ce`` on another (or class folders ``Glioma`` and ``glioma``) would train as two
    classes, each holding part of the other's samples."""
    from ingest.config import ImagesIngestConfig
    from ingest.plan import make_plan

    table = "image_id,center_id,patient_id,image_num,label\na_0,11,a,0,CE \nb_0,11,b,0,LAA\nc_0,11,c,0,ce\n"
    with pytest.raises(ValueError, match=r"^t.csv: line 4 names class 'ce' and line 2 'CE': one class spelt two"):
        read_label_csv(table, source="t.csv")
    assert class_names(read_label_csv(table.replace(",ce", ",CE"))) == ["CE", "LAA"]  # 'CE ' stripped
    for folder in ("Training/Glioma", "Testing/glioma", "Testing/meningioma"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "1.jpg").write_bytes(b"")
    cfg = ImagesIngestConfig(sources=[str(tmp_path / "Training"), str(tmp_path / "Testing")], out=str(tmp_path / "o"))
    with pytest.raises(
        ValueError, match=r"folder .*/(Testing/glioma|Training/Glioma) names class '(glioma|Glioma)' and"
    ):
        make_plan("images", cfg, b"k")
    (tmp_path / "Testing/glioma").rename(tmp_path / "Testing/Glioma")
    assert make_plan("images", cfg, b"k").classes == ["Glioma", "meningioma"]


def test_two_files_of_one_name_are_one_input_of_a_label_table_and_two_slides_without_one(tmp_path):
    """A label table names a slide by its file's stem: of two files of that name in two folders, which it means is
    not told, so the first (by path) is taken and the other skipped, saying so. Without a table they were one slide
    and one patient, merged in every table of calls, the private map naming one file: each is its own now."""
    from ingest.config import ImagesIngestConfig, WsiIngestConfig
    from ingest.plan import make_plan

    for folder, name in (("a", "s1"), ("b", "s1"), ("a", "s2")):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / f"{name}.svs").touch()
    (tmp_path / "labels.csv").write_text("slide,label,patient\ns1,CE,p1\ns2,LAA,p2\n")
    sources = [str(tmp_path / "a"), str(tmp_path / "b")]
    labelled = WsiIngestConfig(sources=sources, out=str(tmp_path / "o"), labels=str(tmp_path / "labels.csv"))
    plan = make_plan("wsi", labelled, b"k")
    taken = {plan.private[u.id]: u for u in plan.units}
    assert sorted(taken) == [str(tmp_path / "a/s1.svs"), str(tmp_path / "a/s2.svs")]
    (skipped,) = plan.skipped
    assert plan.private[skipped.id] == str(tmp_path / "b/s1.svs")
    first = taken[str(tmp_path / "a/s1.svs")].id
    assert skipped.reason == f"its name is that of input {first}, taken first (by path): a label table names one"
    plain = make_plan("wsi", labelled.model_copy(update={"labels": None}), b"k")
    assert len(plain.units) == 3 and not plain.skipped
    assert len({u.item for u in plain.units}) == 3 and len({u.patient for u in plain.units}) == 3
    assert sorted(plain.private[u.item] for u in plain.units) == sorted(plain.private[u.id] for u in plain.units)

    for folder in ("a", "b"):
        (tmp_path / folder / "x.png").touch()
    (tmp_path / "images.csv").write_text("image,label\nx,glioma\n")
    images = ImagesIngestConfig(sources=sources, out=str(tmp_path / "i"), labels=str(tmp_path / "images.csv"))
    plan = make_plan("images", images, b"k")
    assert [plan.private[u.id] for u in plan.units] == [str(tmp_path / "a/x.png")]
    assert [r.reason.split(",")[0] for r in plan.skipped if "its name" in (r.reason or "")] == [
        f"its name is that of input {plan.units[0].id}"
    ]


def test_a_label_tables_row_may_name_the_slides_file_or_its_path(tmp_path):
    """``001000_0.tif`` or ``train/001000_0.tif`` in the table names the slide whose file it is, where every slide
    was skipped as not in the table (and every row listed as naming no input). Two rows naming one file with other
    labels are refused, naming both; a series' or patient's id is kept as it is, dots and all."""
    from ingest.config import WsiIngestConfig
    from ingest.labels import label_table
    from ingest.plan import make_plan
    from ingest.sources import SLIDE_EXTS

    (tmp_path / "train").mkdir()
    for name in ("a_0", "b_0"):
        (tmp_path / "train" / f"{name}.tif").touch()
    (tmp_path / "labels.csv").write_text("slide,label\na_0.tif,CE\ntrain/b_0.tif,LAA\n")
    labels = str(tmp_path / "labels.csv")
    cfg = WsiIngestConfig(sources=[str(tmp_path / "train")], out=str(tmp_path / "o"), labels=labels)
    plan = make_plan("wsi", cfg, b"k")
    assert sorted(u.label for u in plan.units) == [0, 1] and not plan.skipped and not plan.unmatched
    with pytest.raises(ValueError, match=r"^t\.csv: rows a_0\.tif and x/a_0\.svs name one file, a_0, with other"):
        label_table("slide,label\na_0.tif,CE\nx/a_0.svs,LAA\n", "t.csv", SLIDE_EXTS)
    table, _ = label_table("series,label\n1.2.840.1,CE\n", "t.csv")
    assert list(table) == ["1.2.840.1"]


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


def test_a_label_table_as_spreadsheets_write_them_and_its_repeated_rows():
    """Column names in another case or padded (``Slide, Label``) read as the table's; a row repeated alike is read
    once; one that gives an item another label or patient names both lines, where the last row won unsaid (and
    its class counted though no input bore it)."""
    rows = read_label_csv("Slide, Label ,Patient\na,CE,p1\na,CE,p1\nb,LAA,p2\n")
    assert [(r.item, r.label, r.patient) for r in rows] == [("a", "CE", "p1"), ("b", "LAA", "p2")]
    with pytest.raises(ValueError, match=r"t\.csv: line 3 gives a label 'LAA', patient None and site None, where"):
        read_label_csv("slide,label\na,CE\na,LAA\n", source="t.csv")
    strip = "image_id,center_id,patient_id,image_num,label\nx_0,1,x,0,CE\nx_0,1,y,0,CE\n"
    with pytest.raises(ValueError, match="line 3 gives x_0 label 'CE', patient 'y' and site '1', where line 2 gave"):
        read_label_csv(strip)
    with pytest.raises(ValueError, match=r"^t\.csv: line 3 lacks 'slide' or 'label'$"):  # a blank cell: class ''
        read_label_csv("slide,label\na,CE\nb, \n", source="t.csv")


def test_a_label_table_saved_by_a_spreadsheet_of_another_locale_or_encoding():
    """Semicolons or tabs where the header has no comma (Excel in locales whose decimal mark is a comma); UTF-16 with
    its mark (Excel's "Unicode Text") and UTF-8 with or without it; other bytes refused naming the file, where
    Python's error named neither it nor the remedy."""
    from ingest.labels import table_text

    want = [("a_0", "CE", "a", "11"), ("b_0", "LAA", "b", "11")]
    for sep in (";", "\t"):
        text = sep.join(["image_id", "center_id", "patient_id", "image_num", "label"]) + "\r\n"
        text += "".join(sep.join([f"{p}_0", "11", p, "0", label]) + "\r\n" for p, label in (("a", "CE"), ("b", "LAA")))
        assert [(r.item, r.label, r.patient, r.site) for r in read_label_csv(text)] == want
    assert read_label_csv("slide,label\na;1,CE\n")[0].item == "a;1"  # a comma header: semicolons are data
    table = "slide,label\ns1,Hémorragie\n"
    for data in (table.encode("utf-16"), table.encode("utf-8-sig"), table.encode()):
        assert table_text(data, "t.csv") == table
    with pytest.raises(ValueError, match=r"^t\.csv: not UTF-8 text \(byte 0xe9 at offset 16\): save it as UTF-8"):
        table_text(table.encode("cp1252"), "t.csv")


def test_pseudonyms_are_keyed_and_stable():
    assert pseudonym(b"k1", "patient", "MRN1") == pseudonym(b"k1", "patient", "MRN1")
    assert pseudonym(b"k1", "patient", "MRN1") != pseudonym(b"k2", "patient", "MRN1")
    assert pseudonym(b"k1", "patient", "MRN1") != pseudonym(b"k1", "series", "MRN1")
    assert "MRN1" not in pseudonym(b"k1", "patient", "MRN1")
    with pytest.raises(ValueError, match="pseudonym key"):
        pseudonym(b"", "patient", "x")


def test_a_table_of_patients_without_labels_names_the_inputs_and_their_patients(tmp_path):
    """STRIP AI's test.csv has no label column: its slides are to be called, grouped by patient (a patient's
    slides on one row of a prediction), and only the slides it names are taken."""
    from ingest.config import WsiIngestConfig
    from ingest.plan import make_plan

    test_csv = (
        "image_id,center_id,patient_id,image_num\n006388_0,11,006388,0\n006388_1,11,006388,1\n008e5c_0,4,008e5c,0\n"
    )
    rows = read_label_csv(test_csv)
    assert [(r.item, r.label, r.patient) for r in rows] == [
        ("006388_0", None, "006388"),
        ("006388_1", None, "006388"),
        ("008e5c_0", None, "008e5c"),
    ]
    assert class_names(rows) == []
    assert [(r.item, r.patient) for r in read_label_csv("slide,patient\na,p1\n")] == [("a", "p1")]
    assert read_label_csv("patient,label\np1,x\n")[0].item == "p1"  # patient-level labels, as before
    with pytest.raises(ValueError, match="without a label column, a table of patients"):
        read_label_csv("slide,center\na,1\n")  # neither labels nor patients: nothing to take from it
    with pytest.raises(ValueError, match=r"line 3 lacks 'image_id'$"):
        read_label_csv("image_id,patient_id\na,p\n,q\n")

    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("006388_0", "006388_1", "008e5c_0", "0ff1ce_0"):
        (slides / f"{name}.svs").touch()
    (tmp_path / "test.csv").write_text(test_csv)
    cfg = WsiIngestConfig(sources=[str(slides)], out=str(tmp_path / "out"), labels=str(tmp_path / "test.csv"))
    plan = make_plan("wsi", cfg, b"k")
    assert plan.classes == [] and [u.label for u in plan.units] == [None, None, None]
    assert len({u.patient for u in plan.units}) == 2  # 006388's two slides: one patient, so one split
    assert len({u.split for u in plan.units if u.patient == plan.units[0].patient}) == 1
    assert [r.reason for r in plan.skipped] == ["not in the label table"]  # 0ff1ce_0
    assert sorted(v for v in plan.private.values() if v.startswith("patient ")) == ["patient 006388", "patient 008e5c"]


def test_a_dataset_without_labels_is_refused_for_training_with_the_way_to_call_it(tmp_path):
    from tests.datasets import make_dataset
    from training.config import RecipeError, load_recipe
    from training.preflight import check_against

    manifest = make_dataset(str(tmp_path / "u"), {"train": 4, "val": 4}, labelled=False)
    recipe = load_recipe("demo_tiles", [f"data.dataset={tmp_path / 'u'}"])
    with pytest.raises(RecipeError, match=r"has no labels .*: a model is neither trained nor evaluated on it; "):
        check_against(recipe, manifest)


def test_linked_patients_stand_for_each_other_by_the_first_of_them():
    """Pairs that must share a split (an image held under both patients): chains and stars join into one group,
    named by its first patient, whatever the order the pairs come in."""
    links = [("p3", "p1"), ("p5", "p4"), ("p1", "p2"), ("p4", "p6")]
    assert linked_patients(links) == {"p1": "p1", "p2": "p1", "p3": "p1", "p4": "p4", "p5": "p4", "p6": "p4"}
    assert linked_patients(reversed(links)) == linked_patients(links)
    assert linked_patients([]) == {}
