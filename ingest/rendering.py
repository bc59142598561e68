"""What renders an ingest's samples: Tessera's rendering of the kind of input (a version, changed with the code)
and the libraries whose output the samples hold (decoders, resampling, encoders, a model that decides).

Each piece of work records its worker's (``WorkRecord.rendered_with``), the manifest the run's
(``rendered_with``, and each amending run's), so that a run amending a dataset says which of them differ from the
dataset's, and a run whose workers differ (nodes of a cluster on other images) says so, rather than mixing samples
made two ways without a word. A Tessera commit alone says neither: most commits change no sample.
"""

from __future__ import annotations

import functools
from importlib import metadata

from ingest.config import CONFIGS, IngestConfig
from shards import manifest as mf
from shards import provenance
from shards.provenance import Rendering

# Changed with any change to Tessera that makes other samples of the same inputs and options (other pixels, other
# tiles kept, other metadata): tests/unit/test_rendering.py keeps a fingerprint of each kind's samples of fixed
# synthetic inputs, and fails until a version and its fingerprint are changed together.
# dicom 2: RSNA's wrapped 12-bit values read as signed. wsi 2, dicom 3, images 2: samples name their site.
# wsi 3: a µm/px no scanner makes (a TIFF's 72 dpi default) is not recorded. dicom 4: PALETTE COLOR in colour,
# colour of more than 8 bits its top 8. images 3: a 16-bit colour image in colour (it was made grey).
RENDERING = {"wsi": 3, "dicom": 4, "images": 3}

# Distributions whose output ends up in samples, per kind (the OpenCV wheel that is installed, either name).
_COMMON = ("numpy", "opencv-python-headless", "opencv-python", "pillow", "imagecodecs")
LIBRARIES = {
    "wsi": (*_COMMON, "simplejpeg", "openslide-python", "tifffile", "pydicom"),
    "dicom": (*_COMMON, "pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle"),
    "images": (*_COMMON, "simplejpeg", "scipy"),
}
MODELS = ("torch", "transformers")  # where a background model or SAM decides which tiles or pixels are kept
TESSERA = "tessera"  # the key of Tessera's own rendering


def kind_of(cfg: IngestConfig) -> str:
    """The kind of ingest ``cfg`` configures (``wsi``, ``dicom``, ``images``)."""
    return next(kind for kind, config in CONFIGS.items() if isinstance(cfg, config))


def rendered_with(cfg: IngestConfig) -> Rendering:
    """What renders this process's samples of a run configured by ``cfg``: ``{"tessera": "wsi rendering 1",
    "numpy": "2.4.6", ...}``."""
    return dict(_rendered_with(kind_of(cfg), cfg.uses_models(), getattr(cfg, "color_profile", None) == "apply"))


@functools.cache
def _rendered_with(kind: str, models: bool, colour: bool = False) -> tuple[tuple[str, str], ...]:
    found = [(TESSERA, f"{kind} rendering {RENDERING[kind]}")]
    if colour:  # LittleCMS converts the pixels (ingest.colour): the C library Pillow was built with
        from PIL import features

        found.append(("littlecms", str(features.version("littlecms2"))))
    for name in LIBRARIES[kind] + (MODELS if models else ()):
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    if kind == "wsi":  # the C library OpenSlide loads, which may be the system's rather than the wheel's
        try:
            import openslide

            found.append(("libopenslide", openslide.__library_version__))
        except (ImportError, OSError, AttributeError):
            pass
    return tuple(found)


def amend_note(previous: mf.ManifestHead, cfg: IngestConfig, workers: Rendering | None = None) -> str | None:
    """What a run configured by ``cfg`` that amends the dataset ``previous`` says before its work, where the samples
    it adds would be rendered otherwise than the dataset's (None where they would not): its driver's rendering
    stands for its workers' (one image). After the work, given what the ``workers`` rendered with, where they
    rendered otherwise than the dataset though the driver would not (nodes on another image)."""
    if not (recorded := previous.renderings()):  # made before they were recorded: only the code can be compared
        if workers is not None or previous.made_by == (code := provenance.made_by()):
            return None
        return (
            f"{cfg.out}: made by {previous.made_by or 'an earlier Tessera (not recorded)'}, amended now by {code}: "
            "where Tessera's rendering changed between them, this run's samples differ from the dataset's (`tessera "
            "dataset` says which code made each run)"
        )
    before = provenance.combined(recorded) or {}
    driver = provenance.differences(before, rendered_with(cfg))
    if workers is None:
        changed, who = driver, "this run renders"
    elif driver:  # said before the work
        return None
    else:
        changed, who = provenance.differences(before, workers), "this run's workers rendered on nodes unlike its driver"
    if not changed:
        return None
    return (
        f"{cfg.out}: its samples were rendered otherwise than {who} ({'; '.join(changed)}): the samples it "
        "adds may differ from the dataset's (`tessera dataset` says what rendered each run; --overwrite makes the "
        "whole dataset anew)"
    )


def mixed_note(out: str, found: list[Rendering]) -> str | None:
    """What a run whose workers rendered otherwise than one another says (other libraries or another Tessera on
    some nodes); None where they all rendered alike."""
    if not (differ := provenance.mixed(found)):
        return None
    return (
        f"{out}: this run's workers rendered samples otherwise than one another ({'; '.join(differ)}): its samples "
        "were made more than one way (the manifest records each); nodes with the same image make them alike"
    )
