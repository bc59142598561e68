"""Which queued call an idle ingest actor takes next: a slide's regions stay with the actor that holds the slide.

An actor reads a slide on the object store from a local copy in its source cache (:mod:`ingest.source_cache`),
downloaded when it first plans or cuts the slide and kept for its other regions. Taken strictly in queue order,
each slide's regions went to whichever actor was free, and every actor that took one downloaded the whole slide,
again where its cache of two slides had dropped it meanwhile (simulated, 16 actors on 64 slides of 11 regions:
about 10 downloads a slide). So an idle actor takes, in turn: a region of a slide it holds; else the next call
in order (a slide to plan, a series, a batch, a shard to pack); else, at the run's end with nothing else left, a
region of another actor's slide, the newest slide's first, so the run still ends evenly.
"""

from __future__ import annotations

from collections import OrderedDict, deque
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
    keeps, ``slots``)."""

    def __init__(self, actors: int, slots: int = SLIDES.slots) -> None:
        self.slots = slots
        self.held: list[list[str]] = [[] for _ in range(actors)]
        self.regions: OrderedDict[str, deque[Call]] = OrderedDict()  # per slide, the newest slide's first
        self.rest: deque[Call] = deque()  # every other call, in order (a slide's plan too)

    def __len__(self) -> int:  # about one slide an actor has regions queued: its planner takes them before another plan
        return len(self.rest) + sum(map(len, self.regions.values()))

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

    def take(self, actor: int) -> Call:
        """The call ``actor`` runs next (the queue must not be empty); it then holds that call's slide."""
        key = next((k for k in reversed(self.held[actor]) if self.regions.get(k)), None)
        if key is not None or not self.rest:
            key = key or next(iter(self.regions))
            call = self.regions[key].popleft()
            if not self.regions[key]:
                del self.regions[key]
        else:
            call = self.rest.popleft()
        if (slide := slide_of(call)) is not None:
            held = self.held[actor]
            if slide in held:
                held.remove(slide)
            held.append(slide)
            del held[: -self.slots]
        return call
