"""Which slices make a sample, and the RSNA label table."""

import pytest

from ingest.labels import RSNA_SUBTYPES, is_rsna_csv, read_rsna_csv
from ingest.sequences import center_indices, even_indices, neighbour_indices


def test_neighbours_clamp_at_the_ends():
    assert neighbour_indices(0, 5, 1) == [0, 0, 1]
    assert neighbour_indices(2, 5, 2) == [0, 1, 2, 3, 4]
    assert neighbour_indices(4, 5, 1) == [3, 4, 4]
    with pytest.raises(ValueError):
        neighbour_indices(5, 5, 1)


def test_center_block_is_the_middle_and_k_each_side():
    assert center_indices(30, 5) == list(range(9, 20))
    assert center_indices(3, 5) == [0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 2]


def test_even_indices_span_first_to_last():
    assert even_indices(100, 5) == [0, 25, 50, 74, 99]
    assert even_indices(3, 5) == [0, 0, 1, 2, 2]
    assert even_indices(1, 2) == [0, 0]


def test_rsna_csv_becomes_six_way_vectors():
    text = "ID,Label\nID_abc_epidural,0\nID_abc_any,1\nID_abc_subdural,1\nID_def_any,0\n"
    assert is_rsna_csv(text) and not is_rsna_csv("series,label\n")
    labels = read_rsna_csv(text)
    assert labels["ID_abc"] == [1, 0, 0, 0, 0, 1] and labels["ID_def"] == [0] * len(RSNA_SUBTYPES)
    with pytest.raises(ValueError, match="line 2"):
        read_rsna_csv("ID,Label\nID_abc_elbow,1\n", source="x.csv")
    repeated = text + "ID_abc_any,1\n"  # the competition's file repeats some rows, alike
    assert read_rsna_csv(repeated) == labels
    with pytest.raises(ValueError, match=r"x\.csv: line 7 gives ID_abc_subdural 0, which an earlier line gave 1"):
        read_rsna_csv(repeated + "ID_abc_subdural,0\n", source="x.csv")


def test_slices_the_rsna_table_has_no_row_for_are_not_taken_for_negatives(tmp_path):
    """A series of which the table labels some slices (paper 003 found 78,546 files without a row): in slice mode
    the others make no sample (they were labelled 0 in every subtype before), in centre mode they add pixels, not
    labels; the series says so."""
    import json

    import pydicom

    from ingest.config import DicomIngestConfig
    from ingest.plan import plan_dicom
    from ingest.synthetic import make_ct_series
    from ingest.units import Work, work_samples

    make_ct_series(tmp_path / "ct", n=1, slices=5, size=16, seed=1)
    files = sorted((tmp_path / "ct").rglob("*.dcm"))
    uids = {pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber - 1: f for f in files}
    rows = ["ID,Label"]
    for k, positive in ((0, 0), (1, 1), (3, 0)):  # slices 2 and 4 have no row
        sop = pydicom.dcmread(uids[k], stop_before_pixels=True).SOPInstanceUID
        rows += [f"{sop}_any,{positive}", f"{sop}_subdural,{positive}"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    seen = {}
    for mode in ("slice", "center"):
        cfg = DicomIngestConfig(
            sources=[str(tmp_path / "ct")], out=str(tmp_path / "o"), labels=str(tmp_path / "labels.csv"), mode=mode,
            neighbours=1,
        )  # fmt: skip
        (unit,) = plan_dicom(cfg, b"k").units
        metas = [json.loads(s["json"]) for s in work_samples(Work(unit), cfg)]
        seen[mode] = unit.meta["warnings"], [(m["slices"], m["labels"]) for m in metas]
    positive = [1, 0, 0, 0, 0, 1]  # any and subdural, the last of RSNA_SUBTYPES
    assert RSNA_SUBTYPES[-1] == "subdural"
    assert seen["slice"] == (
        ["2 of 5 slice(s) not in the label table: no sample of their own"],
        [([0, 0, 1], [0] * 6), ([0, 1, 2], positive), ([2, 3, 4], [0] * 6)],
    )
    assert seen["center"] == (
        ["2 of 5 slice(s) not in the label table: the series' labels are its other slices'"],
        [([1, 2, 3], positive)],
    )
