"""Which queued call an idle ingest actor takes next: a slide's regions stay with the actor that holds the slide.

An actor reads a slide on the object store from a local copy in its source cache (:mod:`ingest.source_cache`),
downloaded when it first plans or cuts the slide and kept for its other regions. Taken strictly in queue order,
each slide's regions went to whichever actor was free, and every actor that took one downloaded the whole slide,
again where its cache of two slides had dropped it meanwhile (simulated, 16 actors on 64 slides of 11 regions:
about 10 downloads a slide). So an idle actor takes, in turn: a region of a slide it holds; else the next call
in order (a slide to plan, a series, a batch, a shard to pack); else, at the run's end with nothing else left, a
region of another actor's slide, the newest slide's first, so the run still ends evenly.

An actor that starts on a slide it holds is also given the next slide to plan, to download while it works
(:meth:`ingest.source_cache.SourceCache.fetch_ahead`); that plan is set aside for it, and taken by another actor
only at the run's end, by one with nothing else to do.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from ingest.source_cache import SLIDES

Call = tuple[str, Any]  # (the actor's method, its argument)


def slide_of(call: Call) -> str | None:
    """The id of the slide a call reads (a slide's plan, or one of its regions), or None."""
    kind, item = call
    unit = item if kind == "plan" else getattr(item, "unit", None) if kind == "process" else None
    return unit.id if unit is not None and unit.kind == "wsi" else None


class CallQueue:
    """Calls waiting for an actor, and the slides each of ``actors`` actors read last (as many as its source cache
    keeps, ``slots``).

    ``ahead`` (a slide to plan -> whether to fetch it ahead): an actor that starts on a slide it holds is given the
    next slide to plan, where ``ahead`` says so, to download while it works (:meth:`SourceCache.fetch_ahead`); that
    plan waits for it, as its next call after its own slides' regions.
    """

    def __init__(self, actors: int, slots: int = SLIDES.slots, ahead: Callable[[Any], bool] | None = None) -> None:
        self.slots, self.ahead = slots, ahead
        self.held: list[list[str]] = [[] for _ in range(actors)]
        self.regions: OrderedDict[str, deque[Call]] = OrderedDict()  # per slide, the newest slide's first
        self.rest: deque[Call] = deque()  # every other call, in order (a slide's plan too)
        self.fetched: list[Call | None] = [None] * actors  # the plan of the slide each actor fetches ahead

    def __len__(self) -> int:  # about one slide an actor has regions queued: its planner takes them before another plan
        reserved = sum(call is not None for call in self.fetched)
        return len(self.rest) + sum(map(len, self.regions.values())) + reserved

    def add(self, calls: list[Call], front: bool = False) -> None:
        """Queue ``calls`` in their order: at the back, or (``front``) before all queued. Regions queue per slide
        (a slide's regions added at the front make it the newest)."""
        for call in reversed(calls) if front else calls:
            key = slide_of(call) if call[0] == "process" else None
            queue = self.rest if key is None else self.regions.setdefault(key, deque())
            if front:
                queue.appendleft(call)
            else:
                queue.append(call)
            if key is not None:
                self.regions.move_to_end(key, last=not front)

    def take(self, actor: int) -> tuple[Call, Any]:
        """The call ``actor`` runs next (the queue must not be empty), and the slide (its unit) it is to fetch
        ahead, or None; it then holds both slides. In turn: a region of a slide it holds, the plan it fetched
        ahead, the next call in order, the newest slide's region, another actor's plan fetched ahead."""
        held = self.held[actor]
        key = next((k for k in reversed(held) if self.regions.get(k)), None)
        if key is None and (call := self.fetched[actor]) is not None:
            self.fetched[actor] = None
        elif key is not None or (not self.rest and self.regions):
            key = key or next(iter(self.regions))
            call = self.regions[key].popleft()
            if not self.regions[key]:
                del self.regions[key]
        elif self.rest:
            call = self.rest.popleft()
        else:  # the run's end: another actor's next slide, rather than nothing
            other = next(i for i, c in enumerate(self.fetched) if c is not None)
            call, self.fetched[other] = self.fetched[other], None
        slide = slide_of(call)
        ahead = None
        if slide in held and self._fetch_next(actor):
            ahead = self.fetched[actor][1]
            self._hold(actor, ahead.id)
        if slide is not None:
            self._hold(actor, slide)
        return call, ahead

    def _fetch_next(self, actor: int) -> bool:
        """Set the next slide to plan aside for ``actor``, to fetch ahead; whether one was."""
        if self.ahead is None or self.slots < 2 or self.fetched[actor] is not None or not self.rest:
            return False
        kind, item = self.rest[0]
        if kind != "plan" or slide_of(self.rest[0]) is None or not self.ahead(item):
            return False
        self.fetched[actor] = self.rest.popleft()
        return True

    def _hold(self, actor: int, slide: str) -> None:
        held = self.held[actor]
        if slide in held:
            held.remove(slide)
        held.append(slide)
        del held[: -self.slots]
