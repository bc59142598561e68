"""What renders an ingest's samples (ingest.rendering): Tessera's rendering version of each kind, kept honest by a
fingerprint of fixed synthetic inputs' samples, and what a run amending a dataset says when its rendering differs."""

import hashlib
import json
from pathlib import Path

from ingest import rendering, synthetic
from ingest.config import DicomIngestConfig, ImagesIngestConfig, WsiIngestConfig
from ingest.plan import make_plan
from ingest.units import Work, plan_unit, work_samples
from shards import manifest as mf
from shards import provenance
from shards.schema import to_bytes

# Each kind's rendering version and the fingerprint of its samples of the inputs below, with its default options
# and with options that take other paths (a resize to a level between the slide's, a stored size, PNG, a stride;
# neighbouring slices, a series as a sequence of frames; boxes cropped, GrabCut, grey, a median filter). A change
# that fails here makes other samples of the same inputs and options: add 1 to that kind's
# ``ingest.rendering.RENDERING`` and put the version and the fingerprints the failure prints here (a run amending a
# dataset made before then says its samples differ). A library upgrade that fails here changes samples too: its
# version is recorded beside Tessera's, so only the fingerprints need changing.
EXPECTED = {
    "wsi": (3, "c17ef6f5e803ee27"),
    "wsi options": (3, "c5321e0bb1710af6"),
    "dicom": (4, "c3e92ed9e01632dd"),
    "dicom options": (4, "7cf4cd250c7fee3f"),
    "dicom sequences": (4, "170cc699c0b43afe"),
    "images": (3, "88ab04718a4e68fb"),
    "images options": (3, "a8711bb52396d9c7"),
}
PSEUDONYMS = {"slide", "patient", "image", "series", "study"}  # keyed, and of the inputs' places: not rendering


def _configs(root: Path) -> dict:
    synthetic.make_slides(root / "wsi", n=1, size=1024)
    synthetic.make_ct_series(root / "ct", n=1, slices=3, size=64)
    boxes = synthetic.make_mri_folders(root / "mri", per_class=1, size=64)
    split = {"split": "train=1.0"}
    wsi = WsiIngestConfig(sources=[str(root / "wsi")], out=str(root / "o1"), tile_size=128, **split)
    dicom = DicomIngestConfig(sources=[str(root / "ct")], out=str(root / "o2"), **split)
    images = ImagesIngestConfig(sources=[str(root / "mri" / "images")], out=str(root / "o3"), **split)
    return {
        "wsi": wsi,
        "wsi options": wsi.model_copy(update={"mpp": 0.75, "store_size": 64, "format": "png", "stride": 96}),
        "dicom": dicom,
        "dicom options": dicom.model_copy(update={"neighbours": 1, "store_size": 32, "format": "jpg"}),
        "dicom sequences": dicom.model_copy(update={"mode": "series", "frames": 4}),
        "images": images,
        "images options": images.model_copy(
            update={"boxes": str(boxes), "crop": True, "segment": "grabcut", "grayscale": True, "median": 3}
        ),
    }


def _fingerprint(kind: str, cfg) -> tuple[int, str]:
    """How many samples ``cfg``'s inputs make and a digest of them, in any order, without their pseudonyms."""
    digests = []
    for unit in make_plan(kind, cfg, b"rendering").units:
        for work in plan_unit(unit, cfg)[0] if kind == "wsi" else [Work(unit)]:
            for sample in work_samples(work, cfg):
                meta = {k: v for k, v in json.loads(sample["json"]).items() if k not in PSEUDONYMS}
                parts = [f"json {json.dumps(meta, sort_keys=True)}".encode()]
                parts += [
                    k.encode() + b" " + to_bytes(v) for k, v in sorted(sample.items()) if k not in ("__key__", "json")
                ]
                digests.append(hashlib.sha256(b"\n".join(parts)).hexdigest())
    return len(digests), hashlib.sha256(" ".join(sorted(digests)).encode()).hexdigest()[:16]


def test_each_kinds_rendering_version_goes_with_the_samples_it_makes(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_PSEUDONYM_KEY", "rendering")
    found = {}
    for case, cfg in _configs(tmp_path).items():
        kind = case.split()[0]
        found[case] = (kind, rendering.RENDERING[kind], _fingerprint(kind, cfg))
    assert all(samples for _, _, (samples, _) in found.values()), found
    changed = [
        f"{case}: its samples of the fixed inputs changed ({samples} samples, fingerprint {digest}): where Tessera's "
        f"change made them, add 1 to ingest.rendering.RENDERING[{kind!r}]; then set EXPECTED[{case!r}] to its "
        f"version and {digest!r}"
        for case, (kind, version, (samples, digest)) in found.items()
        if (version, digest) != EXPECTED[case]
    ]
    assert not changed, "\n".join(changed)


def test_a_run_renders_with_tesseras_rendering_of_its_kind_and_its_libraries_a_models_where_one_decides():
    from importlib import metadata

    cfg = WsiIngestConfig(sources=["x"], out="y")
    found = rendering.rendered_with(cfg)
    assert found["tessera"] == f"wsi rendering {rendering.RENDERING['wsi']}"
    assert found["numpy"] == metadata.version("numpy") and found["openslide-python"] and found["libopenslide"]
    assert "torch" not in found and "scipy" not in found  # no model here; scipy renders no slide
    with_model = rendering.rendered_with(cfg.model_copy(update={"background_model": "/m.pt"}))
    assert with_model["torch"] == metadata.version("torch")
    dicom = rendering.rendered_with(DicomIngestConfig(sources=["x"], out="y"))
    assert dicom["tessera"].startswith("dicom rendering ") and "pydicom" in dicom and "openslide-python" not in dicom
    images = ImagesIngestConfig(sources=["x"], out="y").model_copy(update={"segment": "sam"})
    assert {"torch", "transformers", "scipy"} <= set(rendering.rendered_with(images))


def test_renderings_are_combined_compared_and_said_in_a_line():
    a = {"tessera": "wsi rendering 1", "numpy": "2.4.6", "opencv-python-headless": "5.0.0.93"}
    b = a | {"numpy": "2.5.0", "libopenslide": "4.0.1"}
    assert provenance.combined([]) is None and provenance.combined([a, a]) == a
    assert provenance.combined([b, a]) == a | {"numpy": "2.4.6 | 2.5.0", "libopenslide": "4.0.1 | none"}
    assert provenance.differences(a, b) == ["numpy 2.4.6 -> 2.5.0", "libopenslide none -> 4.0.1"]
    assert provenance.differences(a, dict(reversed(a.items()))) == []
    assert provenance.mixed([a, b, a]) == ["numpy 2.4.6 | 2.5.0", "libopenslide 4.0.1 | none"] and not provenance.mixed(
        [a]
    )
    assert provenance.describe_rendering(a) == "tessera wsi rendering 1, numpy 2.4.6, opencv-python-headless 5.0.0.93"
    assert provenance.describe_rendering(None).startswith("not recorded")


def test_a_run_amending_a_dataset_says_what_it_renders_otherwise_and_nothing_where_it_renders_alike(monkeypatch):
    cfg = WsiIngestConfig(sources=["x"], out="s3://b/ds", append=True)
    mine = rendering.rendered_with(cfg)
    same = mf.ManifestHead(dataset="s3://b/ds", kind="wsi", made_by="tessera 0.1.0 (old)", rendered_with=mine)
    assert rendering.amend_note(same, cfg) is None  # another commit, the same rendering: nothing to say
    older = mine | {"tessera": "wsi rendering 0", "numpy": "1.26.4"}
    other = same.model_copy(update={"rendered_with": older})
    note = rendering.amend_note(other, cfg)
    assert note.startswith("s3://b/ds: its samples were rendered otherwise than this run renders (tessera wsi ")
    assert f"tessera wsi rendering 0 -> wsi rendering {rendering.RENDERING['wsi']}; numpy 1.26.4 -> " in note
    # amended since by this rendering: the dataset holds both, and the note says so
    both = other.model_copy(update={"amended": [mf.Amendment(time="t", added=1, rendered_with=mine)]})
    assert "numpy 1.26.4 | " in rendering.amend_note(both, cfg)
    # a dataset made before renderings were recorded: only the code that made it is compared
    monkeypatch.setattr(provenance, "made_by", lambda: "tessera 0.1.0 (new)")
    unrecorded = same.model_copy(update={"rendered_with": None})
    assert "made by tessera 0.1.0 (old), amended now by tessera 0.1.0 (new)" in rendering.amend_note(unrecorded, cfg)
    assert rendering.amend_note(unrecorded.model_copy(update={"made_by": "tessera 0.1.0 (new)"}), cfg) is None


def test_a_run_whose_workers_rendered_otherwise_than_its_driver_says_so_after_the_work():
    """Nodes on another image than the driver's: the driver renders as the dataset did and says nothing before the
    work; what its workers rendered with is compared after it."""
    cfg = WsiIngestConfig(sources=["x"], out="s3://b/ds", append=True)
    mine = rendering.rendered_with(cfg)
    same = mf.ManifestHead(dataset="s3://b/ds", kind="wsi", rendered_with=mine)
    assert rendering.amend_note(same, cfg, workers=mine) is None
    note = rendering.amend_note(same, cfg, workers=mine | {"numpy": "1.26.4"})
    assert note.startswith("s3://b/ds: its samples were rendered otherwise than this run's workers rendered on nodes ")
    assert f"(numpy {mine['numpy']} -> 1.26.4)" in note
    # the driver renders otherwise too: said before the work, not again
    other = same.model_copy(update={"rendered_with": mine | {"numpy": "1.26.4"}})
    assert rendering.amend_note(other, cfg) is not None
    assert rendering.amend_note(other, cfg, workers=mine) is None
    # a dataset made before renderings were recorded: the code was compared before the work; nothing after
    assert rendering.amend_note(same.model_copy(update={"rendered_with": None}), cfg, workers=mine) is None


def test_a_run_whose_workers_rendered_otherwise_says_so():
    a = {"tessera": "dicom rendering 1", "pydicom": "3.0.2"}
    assert rendering.mixed_note("ds", [a, a]) is None and rendering.mixed_note("ds", []) is None
    note = rendering.mixed_note("ds", [a, a | {"pydicom": "3.0.1"}])
    assert note.startswith("ds: this run's workers rendered samples otherwise than one another (pydicom 3.0.1 | 3.0.2)")
