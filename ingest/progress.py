"""The driver's progress bars: an ingest's inputs, and the header pass that plans a large DICOM cohort (752k
slices for RSNA: minutes on an object store, which a run spent silent before its first bar)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def bar_interval() -> float:
    """Seconds between progress-bar redraws: tqdm's 0.1 on a terminal; 30 into a file or a job's log, where each
    redraw is kept (an ingest of hours would log tens of thousands)."""
    return 0.1 if sys.stderr.isatty() else 30.0


def bar(total: int, desc: str, unit: str, least: int = 0) -> tqdm:
    """A bar of ``total`` steps on stderr, redrawn at :func:`bar_interval`; none drawn under ``least`` steps (a
    step too short to wait on)."""
    quiet = {"disable": True} if total < least else {}  # else tqdm's own default, which TQDM_DISABLE=1 overrides
    return tqdm(total=total, desc=desc, unit=unit, mininterval=bar_interval(), **quiet)
