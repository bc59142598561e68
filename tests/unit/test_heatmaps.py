"""Slide heatmaps from hand-made tiles and probabilities."""

import cv2
import numpy as np

from training.heatmaps import BAR, HEADER, heatmap, heatmap_png, mean_cover, panels_of, preview_boxes, tiles_by_slide


def test_overlapping_tiles_average_and_uncovered_pixels_stay_out():
    boxes = np.array([[0, 0, 4, 4], [2, 0, 6, 4]])
    mean, covered = mean_cover((4, 8), boxes, np.array([0.2, 0.6]))
    assert np.allclose(mean[:, :2], 0.2) and np.allclose(mean[:, 2:4], 0.4) and np.allclose(mean[:, 4:6], 0.6)
    assert covered[:, :6].all() and not covered[:, 6:].any()


def test_tiles_land_where_the_preview_outlines_them_at_least_a_pixel_each():
    tiles = np.array([[600, 1200, 600], [0, 0, 10], [9000, 0, 600]])  # the last reaches past the preview's edge
    boxes = preview_boxes(tiles, 0.01, (50, 95))
    assert boxes.tolist() == [[6, 12, 12, 18], [0, 0, 1, 1], [90, 0, 95, 6]]


def test_two_exclusive_classes_draw_one_panel_other_tasks_one_per_class():
    assert panels_of(["CE", "LAA"]) == [1]
    assert panels_of(["CE", "LAA"], exclusive=False) == [0, 1]
    assert panels_of(["a", "b", "c"]) == [0, 1, 2]


def test_each_panel_colours_only_its_tiles_by_their_probability():
    preview = np.full((20, 30, 3), 240, np.uint8)
    tiles = np.array([[0, 0, 100], [200, 100, 100]])  # level 0; the preview is 1/10 of it
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    out = heatmap(preview, tiles, probs, ["CE", "LAA"], 0.1, "slide s")
    assert out.shape[1] == 2 * 30 + 4  # the preview, then the LAA panel
    panel = out[HEADER : HEADER + 20, 34:]
    assert np.array_equal(out[HEADER : HEADER + 20, :30], preview)
    low, high = (cv2.applyColorMap(np.array([[v]], np.uint8), cv2.COLORMAP_VIRIDIS)[0, 0] for v in (26, 204))
    assert np.abs(panel[5, 5].astype(int) - np.round(0.65 * low + 0.35 * 240)).max() <= 1  # p(LAA) 0.1
    assert np.abs(panel[15, 25].astype(int) - np.round(0.65 * high + 0.35 * 240)).max() <= 1  # p(LAA) 0.8
    assert (panel[15, 5] == 240).all()  # no tile there


def test_a_prediction_table_gives_each_slides_tiles_and_probabilities():
    table = (
        "patient,slide,x,y,size0,predicted,p_CE,p_LAA\n"
        "p1,s1,0,600,600,CE,0.7,0.3\np1,s2,600,0,600,LAA,0.45,0.55\np1,s1,600,600,600,CE,0.9,0.1\n"
    )
    tiles, classes, exclusive = tiles_by_slide(table)
    assert classes == ["CE", "LAA"] and exclusive and sorted(tiles) == ["s1", "s2"]
    assert tiles["s1"][0].tolist() == [[0, 600, 600], [600, 600, 600]]
    assert tiles["s1"][1].tolist() == [[0.7, 0.3], [0.9, 0.1]]
    assert tiles_by_slide("series,predicted_any,p_any\na,1,0.9\n") == ({}, [], False)  # not tiles of slides
    multi = "slide,x,y,size0,predicted_a,predicted_b,p_a,p_b\ns,0,0,10,1,0,0.9,0.2\n"
    assert tiles_by_slide(multi)[1:] == (["a", "b"], False)


def test_the_png_decodes_to_the_drawing():
    preview = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    _, png = cv2.imencode(".png", preview)
    tiles, probs = np.array([[0, 0, 8]]), np.array([[0.5, 0.5]])
    out = cv2.imdecode(np.frombuffer(heatmap_png(png.tobytes(), tiles, probs, ["a", "b"], 1.0, "t"), np.uint8), 1)
    assert np.array_equal(out, heatmap(preview, tiles, probs, ["a", "b"], 1.0, "t"))


def test_a_labelled_table_gives_each_slides_label_for_the_title():
    from training.heatmaps import labels_by_slide

    table = "patient,slide,x,y,size0,label,predicted,p_CE,p_LAA\np,s1,0,0,8,LAA,CE,0.6,0.4\np,s2,0,0,8,CE,CE,0.9,0.1\n"
    assert labels_by_slide(table) == {"s1": "LAA", "s2": "CE"}
    assert labels_by_slide("slide,x,y,size0,predicted,p_a\ns,0,0,8,a,1\n") == {}


def test_a_dataset_gives_each_slide_a_heatmap_or_says_why_not(tmp_path, monkeypatch):
    """A slide drawn on its preview, under as many titles as the caller asks, its preview read once; one whose
    preview is gone, and one from a manifest written before previews' scales were recorded, named in the note
    instead of failing the call."""
    from pathlib import Path

    from shards import manifest as mf
    from shards import storage
    from training.inference import draw_heatmaps

    ds = str(tmp_path / "ds")
    inputs = [
        mf.InputRecord(id=f"i{k}", kind="wsi", status="ingested", item=item, preview_scale=scale)
        for k, (item, scale) in enumerate([("aa", 0.1), ("bb", 0.1), ("cc", None)])
    ]
    mf.save(mf.Manifest(dataset=ds, kind="wsi", classes=["CE", "LAA"], inputs=inputs), ds)
    _, png = cv2.imencode(".png", np.full((10, 10, 3), 200, np.uint8))
    Path(mf.preview_url(ds, "aa")).parent.mkdir(parents=True)
    Path(mf.preview_url(ds, "aa")).write_bytes(png.tobytes())
    reads: list[str] = []
    get_bytes = storage.get_bytes
    monkeypatch.setattr(storage, "get_bytes", lambda url: reads.append(url) or get_bytes(url))
    rows = "".join(f"p,{s},0,0,50,LAA,CE,0.8,0.2\n" for s in ("aa", "bb", "cc"))
    table = "patient,slide,x,y,size0,label,predicted,p_CE,p_LAA\n" + rows
    got = {}

    def write(slide, draw):
        got[slide] = draw(slide), draw(f"file-{slide}")  # the run's copy and the caller's, as predict --reveal

    drawn, note = draw_heatmaps(table, ds, write)
    assert drawn == 1 and list(got) == ["aa"]
    assert note and "1 slide(s) have no preview" in note and "where 1 slide(s)' tiles lie" in note
    previews = [url for url in reads if not url.endswith(mf.MANIFEST_NAME)]
    assert previews == [mf.preview_url(ds, "aa"), mf.preview_url(ds, "bb")]  # once each; cc: no scale to draw by
    for title, drawing in zip(["slide aa, label LAA", "slide file-aa, label LAA"], got["aa"], strict=True):
        expected = heatmap_png(png.tobytes(), np.array([[0, 0, 50]]), np.array([[0.8, 0.2]]), ["CE", "LAA"], 0.1, title)
        assert drawing == expected
    drawn_png = cv2.imdecode(np.frombuffer(got["aa"][0], np.uint8), cv2.IMREAD_COLOR)
    assert drawn_png.shape == (HEADER + 10 + BAR, 2 * 10 + 4, 3)
    assert draw_heatmaps("series,predicted,p_a\ns,a,1\n", ds, write)[0] == 0


def test_training_draws_the_validation_and_held_out_slides_heatmaps_and_says_what_failed(mlflow_uri, tmp_path):
    """``eval.heatmaps``: after training, each evaluated split's slides drawn from its table in the run, into
    ``heatmaps/`` (validation) and ``<prefix>heatmaps/`` (held out); a split whose table is missing is a line
    naming the command that draws it, not a failed training."""
    from pathlib import Path
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from shards import manifest as mf
    from training.config import load_recipe
    from training.inference import training_heatmaps

    ds = str(tmp_path / "ds")
    inputs = [mf.InputRecord(id=f"i{s}", kind="wsi", status="ingested", item=s, preview_scale=0.1) for s in "vt"]
    mf.save(mf.Manifest(dataset=ds, kind="wsi", classes=["CE", "LAA"], inputs=inputs), ds)
    _, png = cv2.imencode(".png", np.full((10, 10, 3), 200, np.uint8))
    for slide in "vt":
        Path(mf.preview_url(ds, slide)).parent.mkdir(parents=True, exist_ok=True)
        Path(mf.preview_url(ds, slide)).write_bytes(png.tobytes())
    uri = mlflow_uri
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x", str(tmp_path / "artifacts"))).info.run_id
    head = "patient,slide,x,y,size0,label,predicted,p_CE,p_LAA\n"
    for name, slide in [("predictions_sample.csv", "v"), ("test_predictions_sample.csv", "t")]:
        (tmp_path / name).write_text(head + f"p,{slide},0,0,50,LAA,CE,0.8,0.2\n")
        client.log_artifact(run_id, str(tmp_path / name))
    recipe = load_recipe("demo_tiles", [f"data.dataset={ds}", "eval.heatmaps=true"])
    held_out = SimpleNamespace(prefix="test_", split="test")
    lines = training_heatmaps(uri, run_id, recipe, held_out)
    assert lines == [
        "validation slides' heatmaps: 1 in the run's heatmaps/",
        "held-out slides' heatmaps: 1 in the run's test_heatmaps/",
    ]
    assert [a.path for a in client.list_artifacts(run_id, "heatmaps")] == ["heatmaps/v.png"]
    assert [a.path for a in client.list_artifacts(run_id, "test_heatmaps")] == ["test_heatmaps/t.png"]
    # no held-out step: the validation slides only; a table that is not there: said, with the command to draw it
    assert training_heatmaps(uri, run_id, recipe, None) == lines[:1]
    other = SimpleNamespace(prefix="external_test_", split="test")
    failed = training_heatmaps(uri, run_id, recipe, other)[1]
    assert failed.startswith(f"held-out heatmaps failed (`tessera evaluate {run_id} --split test --heatmaps` draws")


def test_heatmaps_are_asked_of_slides_only():
    """A recipe asking for heatmaps on a dataset of other inputs fails before any work, naming the field."""
    import pytest

    from shards import manifest as mf
    from training.config import RecipeError, load_recipe
    from training.preflight import check_against

    inputs = [mf.InputRecord(id="s", kind="dicom", status="ingested", item="s", label=0, split="val")]
    manifest = mf.Manifest(dataset="ds", kind="dicom", classes=["no", "yes"], inputs=inputs)
    recipe = load_recipe("demo_tiles", ["data.dataset=ds", "eval.heatmaps=true"])
    with pytest.raises(RecipeError, match=r"eval\.heatmaps: heatmaps are drawn over slides, and \S+ holds dicom"):
        check_against(recipe, manifest)


def test_a_long_title_shrinks_and_stops_at_its_panels_edge():
    """A slide's file name over a preview a few dozen pixels wide: smaller type, cut at the panel's edge; the
    gap and the next panel's caption untouched."""
    from training.heatmaps import caption

    preview = np.full((30, 40, 3), 200, np.uint8)
    title = "slide /data/strip/a-long-folder-name/006388_0.tif, label LAA"
    out = heatmap(preview, np.array([[0, 0, 10]]), np.array([[0.3, 0.7]]), ["a", "b"], 1.0, title)
    assert out.shape[1] == 2 * 40 + 4
    assert np.array_equal(out[:HEADER, :40], caption(title, 40)) and (caption(title, 40) < 128).any()
    assert (out[:HEADER, 40:44] == 255).all()  # the gap
    assert np.array_equal(out[:HEADER, 44:], caption("p(b)", 40))
    short = caption("p(b)", 400)  # room enough: the usual size, as before
    ref = np.full((HEADER, 400, 3), 255, np.uint8)
    cv2.putText(ref, "p(b)", (2, HEADER - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    assert np.array_equal(short, ref)


def test_slide_names_stay_text_whatever_they_look_like():
    """Pseudonyms of digits (or a file called NA) are names, not numbers or missing values; slides in the order
    they first appear, each tile's probabilities as written."""
    from training.heatmaps import labels_by_slide, slides_of

    table = (
        "slide,x,y,size0,label,predicted,p_a,p_b\n"
        "0123,0,0,8,b,a,0.6,0.4\nNA,8,0,8,a,a,0.9,0.1\n1e5,0,8,8,,b,0.25,0.75\n0123,8,8,8,b,b,0.3,0.7\n"
    )
    tiles, classes, exclusive = tiles_by_slide(table)
    assert list(tiles) == ["0123", "NA", "1e5"] == slides_of(table) and classes == ["a", "b"] and exclusive
    assert tiles["0123"][0].tolist() == [[0, 0, 8], [8, 8, 8]] and tiles["0123"][1].tolist() == [[0.6, 0.4], [0.3, 0.7]]
    assert labels_by_slide(table) == {"0123": "b", "NA": "a"}  # 1e5's tile has no label
    assert slides_of("series,predicted,p_a\ns,a,1\n") == []
