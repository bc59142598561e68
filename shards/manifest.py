"""The dataset manifest: every input with its status, every shard with size, sample count and sha256.

Written as ``<dataset>/manifest.json`` after all shards are published. Per-split sample counts and shard
lengths let a trainer know its epoch length without scanning tars.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field, TypeAdapter, field_validator
from pydantic.dataclasses import dataclass

from shards import manifest_json, storage

Status = Literal["ingested", "skipped", "failed"]
MANIFEST_NAME = "manifest.json"
PREVIEWS = "previews"  # a slide's preview: <dataset>/previews/<slide pseudonym>.png
_QUOTED_PATH = re.compile(r"""(['"])(?:~?/|[a-z][a-z0-9+.-]*://)[^'"]*\1""")
_PATH_CHAR = r"(?:[^\s'\"()<>\[\],;:]|:(?!\s|$))"  # a colon ends a path only where a message goes on after it
_URL_PATH = re.compile(rf"\b([a-z][a-z0-9+.-]*://[^/\s'\"]*)/{_PATH_CHAR}*")  # keeps scheme://host
_LOCAL_PATH = re.compile(rf"(?<![\w.:/])~?/{_PATH_CHAR}+")
_RELATIVE_FILE = re.compile(r"(?<![\w.:/])[\w.-]+(?:/[\w .-]+)+\.[A-Za-z0-9]{1,5}\b")


def preview_url(dataset: str, item: str) -> str:
    """Where the preview of slide ``item`` (its pseudonym) lies in ``dataset``."""
    return storage.join(dataset, PREVIEWS, f"{item}.png")


def without_paths(text: str) -> str:
    """``text`` with each file path and URL path cut to ``…`` (a URL keeps its scheme and host): an error's
    message often names the file it failed on (``No such file or directory: '/data/DOE_JOHN/12.dcm'``), whose
    folders may name the patient. The input it is recorded for says which file it was, as a pseudonym."""
    text = _QUOTED_PATH.sub(lambda m: f"{m[1]}{_cut(m[0][1:-1])}{m[1]}", text)
    return _RELATIVE_FILE.sub("…", _LOCAL_PATH.sub("…", _URL_PATH.sub(r"\1/…", text)))


def _cut(path: str) -> str:
    url = re.match(r"[a-z][a-z0-9+.-]*://[^/]*", path)
    return f"{url[0]}/…" if url else "…"


class ShardInfo(BaseModel):
    """One published shard: file name relative to its split prefix, bytes, sample count, sha256.

    ``classes``: each sample's ``.cls`` label in tar order (``-1`` for none) as runs, see :func:`encode_runs`, so
    class counts and the balanced sampler need no read per sample; absent in manifests from before it existed.
    """

    name: str
    size: int
    sha256: str
    samples: int
    classes: str | None = None


def encode_runs(labels: list[int]) -> str:
    """``[0, 0, 0, 1, -1]`` -> ``"0x3 1x1 -1x1"``: a slide's tiles share a label, so runs stay short."""
    runs: list[list[int]] = []
    for label in labels:
        if runs and runs[-1][0] == label:
            runs[-1][1] += 1
        else:
            runs.append([label, 1])
    return " ".join(f"{label}x{count}" for label, count in runs)


def decode_runs(text: str) -> list[int]:
    """The inverse of :func:`encode_runs`."""
    out: list[int] = []
    for run in text.split():
        label, count = run.split("x")
        out += [int(label)] * int(count)
    return out


def join_runs(runs: list[str | None]) -> str | None:
    """The class runs of shards or parts joined in order: those of their samples one after another; None when one
    is unknown (a part staged, or a shard written, before class runs were recorded)."""
    known = [r for r in runs if r]
    return " ".join(known) if len(known) == len(runs) else None


def split_names(split: str) -> list[str]:
    """``"f0+f1+f2"`` -> ``["f0", "f1", "f2"]``: several ingest splits used as one (re-split replicates)."""
    return [name.strip() for name in split.split("+") if name.strip()]


# Input records are slotted pydantic dataclasses, not models: a dataset holds one per input (a million for a
# million images), and a model instance keeps a dict and a set of the fields given beside the values (a million
# read whole: 8.7 s and 2.58 GB as models, 4.4 s and 1.47 GB so; ``benchmarks/manifest_scale.py``). Copy one with
# ``dataclasses.replace``.
@dataclass(slots=True, kw_only=True)
class InputRecord:
    """One input (slide, series, image): its pseudonymous id, status and what it produced.

    ``id`` is a keyed pseudonym of the source location so that no file name reaches the manifest.
    """

    id: str
    kind: str
    status: Status
    item: str | None = None  # the pseudonym its samples carry (slide, series, image); a slide's preview's name
    reason: str | None = None
    patient: str | None = None
    label: int | None = None
    split: str | None = None
    site: str | None = None  # its centre, as the label table named it (``--hold-out-sites``); None: not named
    samples: int = 0
    shards: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    background_dropped: int | None = None  # tiles with tissue that ``--background-model`` dropped (None: no model)
    preview_scale: float | None = None  # a slide's preview px per level-0 px (None: not a slide, or made before)
    # a keyed digest of its files' sizes and modification times (ETags) and of what planning read about them: a
    # run again over the same location tells a replaced file from the one the dataset was made of
    fingerprint: str | None = None
    left_out: int = 0  # a series' slices, or a slide's tiles, that could not be read and were left out (see warnings)

    @field_validator("reason")
    @classmethod
    def _no_path_in_reason(cls, v: str | None) -> str | None:
        return without_paths(v) if v else v

    @field_validator("warnings")
    @classmethod
    def _no_path_in_warnings(cls, v: list[str]) -> list[str]:
        return [without_paths(w) for w in v]


RECORD = TypeAdapter(InputRecord)  # a record to and from JSON (``RECORD.dump_json(rec)``, ``validate_json``)


class SplitInfo(BaseModel):
    """A split's shards (in order) and sample count."""

    num_samples: int = 0
    shards: list[ShardInfo] = Field(default_factory=list)

    @property
    def next_index(self) -> int:
        """The number a shard added to this split takes: after the highest listed, not after how many are listed
        (a rewrite takes new numbers and leaves gaps below them; counting would write over a listed shard)."""
        numbers = [int(m.group(1)) for s in self.shards if (m := re.fullmatch(r"shard-(\d+)\.tar", s.name))]
        return max(numbers, default=-1) + 1


class Amendment(BaseModel):
    """A run that amended a complete dataset: when, how many inputs it added, how many failed ones it tried
    again and how many changed ones it replaced (their records and shards are in the manifest like any others),
    or how many small shards it merged."""

    time: str
    added: int = 0
    retried: int = 0
    replaced: int = 0  # inputs whose files changed, ingested again: the shards that held them written anew
    merged: int = 0  # shards joined into ``merged_into`` larger ones (``tessera dataset --compact``): same samples
    merged_into: int = 0
    # the manifest it amended: a run that recorded that version finds it among the dataset's ancestors (not replaced)
    previous_sha256: str | None = None
    made_by: str | None = None  # the code that ran it (:func:`shards.provenance.made_by`); None before recorded
    rendered_with: dict[str, str] | None = None  # what rendered its samples, as the dataset's (None: not recorded)

    def describe(self) -> str:
        """What the run did, for the terminal."""
        if self.merged:
            return f"{self.merged} small shard(s) merged into {self.merged_into}"
        return f"{self.added} added, {self.retried} retried, {self.replaced} replaced"


class ManifestHead(BaseModel):
    """The dataset less its input records: what training workers read (classes, splits, shards and their
    classes, the options it was made with, its history), in time and memory independent of how many inputs it
    has. :func:`load_head` reads it."""

    version: int = 1
    dataset: str
    kind: str
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    # the code that made it (Tessera's version and commit); None before recorded
    made_by: str | None = None
    # what rendered its samples: Tessera's rendering of the kind, the libraries' versions (``ingest.rendering``)
    rendered_with: dict[str, str] | None = None
    classes: list[str] = Field(default_factory=list)
    # Names of the per-sample multi-label vector (``labels`` in each sample's JSON), e.g. RSNA's six.
    multilabel: list[str] | None = None
    config: dict = Field(default_factory=dict)
    splits: dict[str, SplitInfo] = Field(default_factory=dict)
    # Pseudonyms of the label table's rows that named no input found (the private map has the names).
    unmatched_labels: list[str] = Field(default_factory=list)
    # Runs that added to this dataset (``--append``, ``--retry-failed``, ``--replace-changed``), oldest first.
    amended: list[Amendment] = Field(default_factory=list)

    def shard_urls(self, prefix: str, split: str) -> list[str]:
        """Full URLs of a split's shards under the dataset ``prefix``; ``a+b`` joins splits (in that order)."""
        return [storage.join(prefix, name, s.name) for name in split_names(split) for s in self.splits[name].shards]

    def sample_classes(self, split: str) -> list[int] | None:
        """Every sample's class in shard and tar order (as :meth:`shard_urls`), or None when a shard of an older
        manifest does not record them."""
        shards = [s for name in split_names(split) for s in self.splits[name].shards]
        if any(s.classes is None for s in shards):
            return None
        return [label for s in shards for label in decode_runs(s.classes or "")]

    def num_samples(self, split: str) -> int:
        """Samples in ``split`` (``a+b`` adds them up)."""
        return sum(self.splits[name].num_samples for name in split_names(split))

    def renderings(self) -> list[dict[str, str]]:
        """What rendered its samples, where recorded: the run that made it and each run that amended it."""
        return [r for r in [self.rendered_with, *(a.rendered_with for a in self.amended)] if r]

    def missing_splits(self, split: str) -> list[str]:
        """The names in ``split`` (``a+b``) that the manifest lacks."""
        return [name for name in split_names(split) if name not in self.splits]


class Manifest(ManifestHead):
    """The whole dataset: what went in (``inputs``: every input, stored last, one line each), what came out,
    and how it was split."""

    inputs: list[InputRecord] = Field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of inputs per status."""
        out = {"ingested": 0, "skipped": 0, "failed": 0}
        for rec in self.inputs:
            out[rec.status] += 1
        return out

    def reasons(self, status: str, most: int = 5) -> list[str]:
        """``"N: reason"`` for the ``most`` commonest reasons inputs have ``status`` (skipped, failed), commonest
        first, then how many inputs have other reasons: a count alone sends the user to the manifest's JSON."""
        found = Counter(rec.reason or "no reason recorded" for rec in self.inputs if rec.status == status)
        return _commonest(found, most, "reason")

    def warned(self, most: int = 5) -> list[str]:
        """``"N: warning"`` for the ``most`` commonest warnings recorded for inputs (a slide read without MPP, a
        series with gaps, a box with no lesion found), as :meth:`reasons`; N counts inputs."""
        return _commonest(Counter(w for rec in self.inputs for w in dict.fromkeys(rec.warnings)), most, "warning")

    def not_called(self, split: str) -> str | None:
        """What of ``split``'s inputs no sample stands for, in a few words (None: nothing): those that failed or
        made none, and the slices left out of the others. A competition refuses a submission that lacks one."""
        missing = sum(1 for r in self.inputs if r.split == split and r.status != "ingested")
        # A slide's left-out tiles leave it called (by its others); a series' left-out slice is called by no sample.
        left = sum(r.left_out for r in self.inputs if r.split == split and r.status == "ingested" and r.kind != "wsi")
        said = [f"{missing} input(s) that failed or made no sample"] if missing else []
        said += [f"{left} slice(s) that could not be read, left out of their series"] if left else []
        return " and ".join(said) or None

    def shards_holding(self, ids: set[str]) -> list[str]:
        """The shards (``split/shard-N.tar``) that hold samples of the inputs ``ids``, sorted."""
        return sorted({s for r in self.inputs if r.id in ids for s in r.shards})


@dataclass(slots=True, kw_only=True)
class InputBrief:
    """Of an input record, what a training driver checks: its status, split, patient, label and site."""

    status: Status
    split: str | None = None
    patient: str | None = None
    label: int | None = None
    site: str | None = None


class ManifestBrief(ManifestHead):
    """The dataset with a :class:`InputBrief` of each input (:func:`load_brief`): what a training, evaluation
    or sweep driver checks (patients split apart, one label per patient) at a third of the time and half the
    memory of the whole records (a million inputs: seconds and GBs, at every run's start)."""

    inputs: list[InputBrief] = Field(default_factory=list)


def patients_by_split(inputs: list[InputRecord] | list[InputBrief]) -> dict[str, set[str]]:
    """The set of patient pseudonyms in each split of ``inputs`` (whole records or briefs), for leak checks."""
    out: dict[str, set[str]] = {}
    for rec in inputs:
        if rec.split and rec.patient:
            out.setdefault(rec.split, set()).add(rec.patient)
    return out


def check_patient_disjoint(manifest: Manifest | ManifestBrief) -> None:
    """Raise if any patient appears in more than one split."""
    seen: dict[str, str] = {}
    for split, patients in patients_by_split(manifest.inputs).items():
        for p in patients:
            if p in seen and seen[p] != split:
                raise ValueError(f"patient {p} is in both {seen[p]!r} and {split!r} splits")
            seen[p] = split


def dumps(manifest: Manifest) -> bytes:
    """``manifest`` as stored: indented JSON with its inputs last, each on one line without the fields at their
    defaults. A dataset of a million images has a million records: one line each reads and greps as a table, and
    the file is about half the size of indenting them."""
    head = manifest.model_dump_json(indent=2, exclude={"inputs"}).removesuffix("\n}")
    lines = ",\n    ".join(RECORD.dump_json(rec, exclude_defaults=True).decode() for rec in manifest.inputs)
    inputs = f"[\n    {lines}\n  ]" if lines else "[]"
    return f'{head},\n  "inputs": {inputs}\n}}\n'.encode()


def save(manifest: Manifest, prefix: str) -> str:
    """Write ``manifest.json`` under ``prefix`` (:func:`dumps`); returns its URL."""
    url = storage.join(prefix, MANIFEST_NAME)
    storage.put_bytes(url, dumps(manifest))
    return url


def load(prefix: str) -> Manifest:
    """Read the manifest of the dataset at ``prefix``."""
    return load_with_bytes(prefix)[0]


def _manifest_bytes(prefix: str) -> bytes:
    try:
        return storage.get_bytes(storage.join(prefix, MANIFEST_NAME))
    except storage.Missing as exc:
        raise storage.Missing(no_dataset(prefix, exc.bucket), exc.bucket) from exc


def load_with_bytes(prefix: str) -> tuple[Manifest, bytes]:
    """The manifest of the dataset at ``prefix`` and its bytes as stored (:func:`sha256_of` them: its version)."""
    data = _manifest_bytes(prefix)
    return manifest_json.parse(data, Manifest, InputRecord), data


def load_brief(prefix: str) -> tuple[ManifestBrief, bytes]:
    """As :func:`load_with_bytes`, with only a brief of each input record (:class:`ManifestBrief`)."""
    data = _manifest_bytes(prefix)
    return manifest_json.parse(data, ManifestBrief, InputBrief), data


def load_head(prefix: str) -> tuple[ManifestHead, bytes]:
    """As :func:`load_with_bytes`, but without its input records: a training worker needs the splits and shards,
    and a record per input (a million for a million images) would cost each worker seconds and a GB or more."""
    data = _manifest_bytes(prefix)
    return ManifestHead.model_validate_json(manifest_json.head_bytes(data)), data


def no_dataset(prefix: str, bucket: str | None = None) -> str:
    """Why ``prefix`` holds no dataset, when its manifest is not there: an ingest writes it last, once complete."""
    if bucket:
        return f"{prefix}: no dataset there: the store has no bucket {bucket!r}"
    staging = storage.join(prefix, "_staging") + "/"  # ingest.staging.STAGING: a run's work in progress
    unfinished = next(storage.list_urls(staging), None) is not None
    if unfinished:
        why = "an ingest into it is running, or stopped before it completed: the same command run again completes it"
    else:
        why = "no ingest has completed there"
    return f"{prefix}: no dataset there: no {MANIFEST_NAME}, which an ingest writes last ({why})"


def sha256_of(data: bytes) -> str:
    """A manifest's version: the sha256 of its bytes as stored (training runs record it)."""
    return hashlib.sha256(data).hexdigest()


def change_since(recorded: str | None, manifest: Manifest, data: bytes) -> Literal["grown", "replaced"] | None:
    """How the dataset whose current manifest is ``manifest`` (``data``, its bytes) changed since a run recorded
    version ``recorded``: None (the same, or nothing recorded), ``grown`` (only runs that amended it since, adding,
    retrying or replacing inputs: every input and patient it had is in the same split) or ``replaced`` (made
    again: splits may differ)."""
    if recorded is None or recorded == sha256_of(data):
        return None
    return "grown" if recorded in {a.previous_sha256 for a in manifest.amended} else "replaced"


def check_same_data(
    recorded: str | None, dataset: str, manifest: Manifest, data: bytes, who: str, before: str = "its first epochs"
) -> None:
    """Refuse to train ``who`` (a run or sweep that recorded dataset version ``recorded``) on another version of
    its dataset (``manifest``, ``data``: the one there now): what it trained ``before`` read the recorded one."""
    if change := change_since(recorded, manifest, data):
        how = "was amended (ingest --append, --retry-failed, --replace-changed or dataset --compact)"
        how = how if change == "grown" else "was made again"
        raise ValueError(
            f"{dataset} {how} since {who} started ({versions(recorded, data)}): it would train on other data than "
            f"{before} did; start a new one"
        )


def versions(recorded: str | None, data: bytes) -> str:
    """A recorded version and the one of the manifest ``data`` now, short, for a message."""
    return f"manifest sha256 {str(recorded)[:12]} -> {sha256_of(data)[:12]}"


def _commonest(found: Counter, most: int, noun: str) -> list[str]:
    """``"N: what"`` for the ``most`` commonest of ``found``, commonest first, then ``"N: K other <noun>(s)"`` for
    the rest."""
    lines = [f"{n}: {what}" for what, n in found.most_common(most)]
    rest = sum(found.values()) - sum(n for _, n in found.most_common(most))
    return lines + ([f"{rest}: {len(found) - most} other {noun}(s)"] if rest else [])
