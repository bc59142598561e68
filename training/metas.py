"""Sample metadata by column: what evaluation keeps of each sample it predicts, in a few bytes a sample.

A validation split of a cohort holds millions of tiles. As one dict per sample (about 1 KB each), gathered on
every rank, their metadata outweighed the probabilities many times over, and on a GPU cluster the gather's pickles
pass through GPU memory. Columns keep only what evaluation reads (:data:`KEPT`): names as codes into the list of
their distinct values, numbers as arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from training.predictions import IDENTITY

# What evaluation reads of a sample: its identity and place (tables, aggregation levels) and its scale.
KEPT = (*IDENTITY, "width_um", "mpp")


def _pack(values: list[Any]) -> tuple[str, Any]:
    """A column's compact form: ``("codes", (distinct, int32 codes))`` for text, ``("int", int64[N])`` or
    ``("float", float64[N])`` for numbers of one kind, else ``("list", values)`` (absent values as None)."""
    kinds = {type(v) for v in values}
    if kinds == {str}:
        distinct: dict[str, int] = {}
        codes = np.fromiter((distinct.setdefault(v, len(distinct)) for v in values), np.int32, len(values))
        return "codes", (list(distinct), codes)
    if kinds == {int}:
        return "int", np.array(values, np.int64)
    if kinds == {float}:
        return "float", np.array(values, np.float64)
    return "list", values


def _unpack(column: tuple[str, Any]) -> list[Any]:
    kind, data = column
    if kind == "codes":
        distinct, codes = data
        return [distinct[c] for c in codes.tolist()]
    return data.tolist() if kind in ("int", "float") else list(data)


class Metas(Sequence):
    """The metadata of ``n`` samples by column (:data:`KEPT`); a sample reads as the dict of its present fields."""

    def __init__(self, n: int, columns: dict[str, tuple[str, Any]]) -> None:
        self.n, self.columns = n, columns

    @classmethod
    def of(cls, dicts: Iterable[dict[str, Any]], keys: tuple[str, ...] = KEPT) -> Metas:
        """The ``keys`` of each of ``dicts`` (per-sample metadata), by column."""
        lists: dict[str, list[Any]] = {k: [] for k in keys}
        n = 0
        for d in dicts:
            n += 1
            for k, values in lists.items():
                values.append(d.get(k))
        return cls(n, {k: _pack(v) for k, v in lists.items() if any(x is not None for x in v)})

    @classmethod
    def concat(cls, parts: Iterable[Metas]) -> Metas:
        """The samples of ``parts``, one after the other."""
        parts = list(parts)
        keys = list(dict.fromkeys(k for p in parts for k in p.columns))
        n = sum(len(p) for p in parts)
        return cls(n, {k: _pack([v for p in parts for v in p.column(k)]) for k in keys})

    def take(self, indices: np.ndarray) -> Metas:
        """The samples at ``indices`` (int array), in that order."""
        columns = {}
        for k, (kind, data) in self.columns.items():
            if kind == "codes":
                columns[k] = _pack([data[0][c] for c in data[1][indices].tolist()])  # only the values they use
            else:
                columns[k] = (kind, data[indices] if kind != "list" else [data[i] for i in indices.tolist()])
        return Metas(len(indices), columns)

    def column(self, key: str) -> list[Any]:
        """Every sample's ``key``, None where a sample has none."""
        return _unpack(self.columns[key]) if key in self.columns else [None] * self.n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        i = range(self.n)[i]  # negative indices, and IndexError past the end
        row = {}
        for k, (kind, data) in self.columns.items():
            v = data[0][int(data[1][i])] if kind == "codes" else data[i].item() if kind != "list" else data[i]
            if v is not None:
                row[k] = v
        return row

    def __iter__(self) -> Iterator[dict[str, Any]]:
        columns = {k: self.column(k) for k in self.columns}
        for i in range(self.n):
            yield {k: values[i] for k, values in columns.items() if values[i] is not None}


def values(metas: Sequence[dict[str, Any]], key: str) -> list[Any]:
    """Every sample's ``key`` (None where absent), by column where ``metas`` is :class:`Metas`."""
    return metas.column(key) if isinstance(metas, Metas) else [m.get(key) for m in metas]
