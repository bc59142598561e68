"""Reading a manifest as :func:`shards.manifest.dumps` lays it out: its head apart from its input records, and the
records a few MB at a time.

pydantic parses a JSON document into an intermediate tree before it builds the objects, so a million records read
at once peaked at about twice what they then held; read in pieces, the peak is what they hold and one piece more.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, TypeAdapter

M = TypeVar("M", bound=BaseModel)

INPUTS_KEY = b'\n  "inputs": '  # a top-level key of indented JSON (a JSON string cannot hold a raw newline)
PIECE = 4 << 20  # bytes of records parsed at a time


def _inputs_at(data: bytes) -> int | None:
    """Where the ``inputs`` key of a manifest laid out as ``dumps`` lays it out starts (its last key); None for
    another layout (one written before, with keys after its inputs)."""
    at = data.rfind(INPUTS_KEY)
    if at < 0 or data.find(b'\n  "', at + len(INPUTS_KEY)) >= 0:
        return None
    return at


def head_bytes(data: bytes) -> bytes:
    """The JSON of a manifest less its ``inputs``, unparsed; another layout whole."""
    at = _inputs_at(data)
    return data if at is None else data[:at].removesuffix(b",") + b"\n}"


def parse(data: bytes, model: type[M], record: type) -> M:
    """``model`` (a manifest type whose ``inputs`` are ``record``s) from ``data``: the head at once, the records
    (one a line) :data:`PIECE` bytes at a time, each piece ending at a line's end; another layout (records
    indented over several lines, or keys after them) at once."""
    at = _inputs_at(data)
    if at is None:
        return model.model_validate_json(data)
    end = data.rfind(b"]")  # the list's: the last line is ``}``, and no record is after it
    start = data.find(b"\n", at + len(INPUTS_KEY)) + 1  # after ``[``; past ``end`` for ``[]``
    if 0 < start < end and not data.startswith(b'    {"', start):  # records over several lines: written before
        return model.model_validate_json(data)
    out = model.model_validate_json(head_bytes(data))
    records = TypeAdapter(list[record])
    found: list = []
    while 0 < start < end:
        stop = data.find(b"\n", min(start + PIECE, end))
        stop = end if stop < 0 or stop > end else stop
        if piece := data[start:stop].strip().removesuffix(b","):
            found += records.validate_json(b"[" + piece + b"]")
        start = stop + 1
    out.inputs = found  # type: ignore[attr-defined]
    return out
