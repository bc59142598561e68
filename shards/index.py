"""DALI's WebDataset index (``.idx``): the byte offset and size of every component, grouped per sample.

Format v1.2, as written by DALI's ``wds2idx``: a header ``v1.2 <num_samples>`` then one line per sample,
``<ext> <data_offset> <size> <member_name>`` repeated for each of its components.
"""

from __future__ import annotations

from dataclasses import dataclass

INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class Member:
    """One tar member: ``name`` is ``<key>.<ext>``; ``offset`` is where its data starts (bytes)."""

    name: str
    offset: int
    size: int

    @property
    def key(self) -> str:
        return self.name[: self.name.index(".")]

    @property
    def ext(self) -> str:
        return self.name[self.name.index(".") + 1 :]


def find_member(sample: list[Member], *exts: str) -> Member | None:
    """The first of a sample's members whose extension is one of ``exts`` (None if none is)."""
    return next((m for m in sample if m.ext in exts), None)


def index_text(members: list[Member]) -> str:
    """The ``.idx`` text for ``members`` in tar order; consecutive members with one key form a sample."""
    samples: list[list[Member]] = []
    for m in members:
        if samples and samples[-1][0].key == m.key:
            samples[-1].append(m)
        else:
            samples.append([m])
    if not samples:
        raise ValueError("a WebDataset index needs at least one sample")
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in sample) for sample in samples]
    return "\n".join(lines) + "\n"


def parse_index(text: str) -> list[list[Member]]:
    """Parse ``.idx`` text back into samples of members (inverse of :func:`index_text`)."""
    head, *rows = text.strip("\n").split("\n")
    version, count = head.split()
    if version != INDEX_VERSION:
        raise ValueError(f"unsupported index version {version!r}")
    samples = []
    for row in rows:
        f = row.split()
        samples.append([Member(f[i + 3], int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)])
    if len(samples) != int(count):
        raise ValueError(f"index header says {count} samples, found {len(samples)}")
    return samples
