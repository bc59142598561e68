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
