"""``--hold-out-sites``: the test split made of the patients of centres the model never trains or selects on (the
label table's ``center_id`` or site column), the other patients split by the other fractions; kept on ``--append``
and shown by ``--dry-run`` and ``tessera dataset``."""

from collections import Counter

import pytest

from cluster.cli import main
from ingest.config import WsiIngestConfig
from ingest.labels import read_label_csv
from ingest.plan import Plan, make_plan
from ingest.units import Unit

# Three centres, four patients each (two of each class); p00 (centre 1) has a second slide scanned at centre 3.
ROWS = [(f"s{i:02d}_0", (i // 4) + 1, f"p{i:02d}", ("CE", "LAA")[i % 2]) for i in range(12)] + [
    ("s00_1", 3, "p00", "CE")
]


def _strip_ai(tmp_path, rows=ROWS):
    """Empty slide files (planning opens none) and their STRIP AI label table."""
    slides = tmp_path / "slides"
    slides.mkdir(exist_ok=True)
    lines = ["image_id,center_id,patient_id,image_num,label"]
    for image, centre, patient, label in rows:
        (slides / f"{image}.svs").touch()
        lines.append(f"{image},{centre},{patient},{image[-1]},{label}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    return slides, tmp_path / "train.csv"


def test_a_label_tables_site_column_is_read_whichever_its_name():
    strip = read_label_csv("image_id,center_id,patient_id,image_num,label\na_0,11,a,0,CE\n")
    assert strip[0].site == "11"
    assert read_label_csv("slide,label,Centre\na,CE, 4 \n")[0].site == "4"
    assert read_label_csv("slide,label,site\na,CE,Mayo\nb,CE,\n")[1].site is None  # a row that names none
    assert read_label_csv("slide,label\na,CE\n")[0].site is None
    with pytest.raises(ValueError, match=r"line 3 gives a label 'CE', patient None and site '2', where line 2 gave"):
        read_label_csv("slide,label,site\na,CE,1\na,CE,2\n")


def test_the_held_out_sites_patients_make_up_the_test_split_alone(tmp_path):
    slides, labels = _strip_ai(tmp_path)
    cfg = WsiIngestConfig(sources=[str(slides)], out=str(tmp_path / "out"), labels=str(labels), hold_out_sites=["3"])
    plan = make_plan("wsi", cfg, b"k")
    assert len(plan.units) == 13 and Counter(u.site for u in plan.units) == {"1": 4, "2": 4, "3": 5}
    test = {u.patient for u in plan.units if u.split == "test"}
    at_3 = {u.patient for u in plan.units if u.site == "3"}
    assert test == at_3  # centre 3's four patients, and p00, who has a slide of it, with both of p00's slides
    assert all(u.split == "test" for u in plan.units if u.patient in at_3)
    # The other 7 patients by train 0.7 and val 0.15, scaled to sum 1 (5.76 and 1.24 patients), per class: 3 of
    # CE (2 + 1: val's 0.53 the larger remainder) and 4 of LAA (3 + 1 to train, by then the split further below
    # its fraction of the 7).
    rest = Counter(u.split for u in plan.units if u.patient not in at_3)
    assert rest == {"train": 6, "val": 1}
    # Without it, test holds patients of every centre (the seeded patient split, as before).
    plain = make_plan("wsi", cfg.model_copy(update={"hold_out_sites": []}), b"k")
    assert len({u.site for u in plain.units if u.split == "test"}) > 1


def test_a_held_out_site_no_input_is_of_is_refused_with_the_sites_there(tmp_path):
    slides, labels = _strip_ai(tmp_path)
    cfg = WsiIngestConfig(sources=[str(slides)], out=str(tmp_path / "out"), labels=str(labels), hold_out_sites=["9"])
    with pytest.raises(ValueError, match=rf"no input {labels} labels is of site 9; its sites: 1, 2, 3$"):
        make_plan("wsi", cfg, b"k")
    (tmp_path / "generic.csv").write_text("slide,label\ns01_0,CE\n")
    generic = cfg.model_copy(update={"labels": str(tmp_path / "generic.csv")})
    with pytest.raises(ValueError, match=r"its sites: none \(it has no center_id or site column\)"):
        make_plan("wsi", generic, b"k")
    with pytest.raises(ValueError, match="hold_out_sites names sites of a label table's center_id or site column"):
        WsiIngestConfig(sources=["x"], out="y", hold_out_sites=["3"])
    with pytest.raises(ValueError, match="the other splits must have patients"):
        WsiIngestConfig(sources=["x"], out="y", labels="l.csv", hold_out_sites=["3"], split="train=0,test=1")


def test_the_dry_run_shows_each_splits_sites_and_the_flag_takes_a_list(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TESSERA_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("TESSERA_PSEUDONYM_KEY", "k")
    slides, labels = _strip_ai(tmp_path)
    argv = ["ingest", "wsi", str(slides), "--out", str(tmp_path / "out"), "--labels", str(labels), "--dry-run"]
    assert main([*argv, "--hold-out-sites", "2,3", "--split", "train=0.5,val=0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:5] == [
        "  train: 2 (CE 1, LAA 1) from 2 patient(s), sites 1",
        "  val: 1 (LAA 1) from 1 patient(s), sites 1",
        "  test: 10 (CE 6, LAA 4) from 9 patient(s), sites 1, 2, 3",  # p00's two slides: centres 1 and 3
    ]
    assert lines[lines.index("sites:") + 1 :][:3] == [
        "  1: 4 (CE 2, LAA 2) from 4 patient(s)",
        "  2: 4 (CE 2, LAA 2) from 4 patient(s)",
        "  3: 5 (CE 3, LAA 2) from 5 patient(s)",  # p00's second slide was scanned there
    ]


def test_an_appended_patient_of_a_held_out_site_joins_the_test_split(tmp_path):
    """Patients the dataset holds keep their split; a new one of a held-out site goes to test, the others to the
    other splits (never test, which the held-out sites alone make up)."""
    from ingest.rerun import decide
    from shards import manifest as mf
    from shards.manifest import InputRecord

    cfg = WsiIngestConfig(sources=["x"], out=str(tmp_path), labels="l.csv", append=True, hold_out_sites=["3"])
    made = mf.Manifest(dataset=str(tmp_path), kind="wsi", classes=["CE", "LAA"], config=cfg.public())
    held = [("a", "p1", "train", "1"), ("b", "p2", "val", "1"), ("c", "p3", "test", "3")]
    for uid, patient, split, site in held:
        made.inputs.append(InputRecord(id=uid, kind="wsi", status="ingested", patient=patient, label=0, split=split))
        made.inputs[-1].site = site
    mf.save(made, str(tmp_path))
    new = [("d", "p4", "3"), ("e", "p5", "1"), ("f", "p6", "2"), ("g", "p3", "3"), ("h", "p1", "3")]
    units = [Unit(uid, "wsi", [uid], f"s{uid}", patient, 0, site=site) for uid, patient, *_, site in held + new]
    plan = Plan(units=units, classes=["CE", "LAA"])
    assert decide("wsi", plan, cfg).created == made.created
    splits = {u.id: u.split for u in plan.units}
    assert [splits[uid] for uid in "abc"] == ["train", "val", "test"]  # held
    assert splits["d"] == "test" and splits["g"] == "test"  # a new patient of centre 3; p3's new slide
    assert splits["h"] == "train"  # p1's slide of centre 3: p1 is in train already, and a patient stays whole
    assert {splits["e"], splits["f"]} <= {"train", "val"}


def test_the_record_and_the_dataset_account_carry_the_site(tmp_path):
    from cluster.cli_dataset import dataset_lines
    from ingest.runner import _merge
    from ingest.staging import WorkRecord
    from shards import manifest as mf

    unit = Unit("a", "wsi", ["a.svs"], "sa", "p1", 0, split="test", site="11")
    rec = _merge(unit, ([], [], None, None), [WorkRecord(id="a-0", unit="a", index=0, status="ingested", samples=2)])
    assert rec.site == "11" and rec.split == "test"
    manifest = mf.Manifest(dataset=str(tmp_path), kind="wsi", classes=["CE"], inputs=[rec])
    manifest.splits = {"test": mf.SplitInfo(num_samples=2)}
    lines = dataset_lines(manifest, b"{}")
    (line,) = [x for x in lines if x.startswith("  test:")]
    assert line == "  test: 2 samples in 0 shard(s), 1 input(s) of 1 patient(s) (CE 1), sites 11"
    assert lines[lines.index("sites:") + 1] == "  11: 1 (CE 1) from 1 patient(s)"  # its ingested inputs by site


def test_a_run_on_held_out_centres_is_tagged_with_them(tmp_path):
    """Its ``test_*`` metrics are of those centres alone: said beside them in MLflow, for runs compared there."""
    from tests.datasets import make_dataset
    from training.config import load_recipe
    from training.launch import origin_tags

    manifest = make_dataset(str(tmp_path / "ds"), {"train": 2, "val": 2, "test": 2})
    recipe = load_recipe("demo_tiles", [f"data.dataset={tmp_path / 'ds'}"])
    assert "dataset_held_out_sites" not in origin_tags(recipe, manifest, b"{}")
    manifest.config["hold_out_sites"] = ["2", "7"]
    assert origin_tags(recipe, manifest, b"{}")["dataset_held_out_sites"] == "2,7"
