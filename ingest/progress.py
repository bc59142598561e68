"""The driver's progress bars: an ingest's inputs, and what plans a large cohort before them (listing an
object-store prefix of a million objects, the header pass over RSNA's 752k slices: minutes a run spent silent)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def bar_interval() -> float:
    """Seconds between progress-bar redraws: tqdm's 0.1 on a terminal; 30 into a file or a job's log, where each
    redraw is kept (an ingest of hours would log tens of thousands)."""
    return 0.1 if sys.stderr.isatty() else 30.0


def bar(total: int, desc: str, unit: str, least: int = 0) -> tqdm:
    """A bar of ``total`` steps on stderr, redrawn at :func:`bar_interval`; none drawn under ``least`` steps (a
    step too short to wait on)."""
    quiet = {"disable": True} if total < least else {}  # else tqdm's own default, which TQDM_DISABLE=1 overrides
    return tqdm(total=total, desc=desc, unit=unit, mininterval=bar_interval(), **quiet)


def counted(items: Iterable[T], desc: str, unit: str, least: int) -> Iterator[T]:
    """``items`` as they come, counted on a bar of unknown total that is drawn once ``least`` have come (a listing
    of a million objects takes a thousand requests; a short one draws nothing)."""
    shown = None
    try:
        for n, item in enumerate(items, 1):
            if shown is None and n >= least:
                shown = tqdm(desc=desc, unit=unit, initial=n - 1, mininterval=bar_interval())
            if shown is not None:
                shown.update(1)
            yield item
    finally:
        if shown is not None:
            shown.close()
