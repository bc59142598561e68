"""An idle ingest actor takes a region of a slide it holds, else the next call in order, else (the run's end)
another actor's region: each slide from the object store is downloaded about once, and the run ends evenly."""

import heapq
import random
from collections import OrderedDict

from ingest.dispatch import CallQueue, slide_of
from ingest.units import Unit, Work


def _slide(name: str) -> Unit:
    return Unit(name, "wsi", [f"s3://in/{name}.svs"], name, "p")


def _regions(unit: Unit, n: int) -> list[tuple[str, Work]]:
    return [("process", Work(unit, k)) for k in range(n)]


def _named(call) -> str:
    kind, item = call
    return f"plan {item.id}" if kind == "plan" else f"{item.unit.id}/{item.index}" if kind == "process" else item


def test_a_slides_regions_stay_with_the_actor_that_planned_it_while_slides_are_left_to_plan():
    a, b, c = _slide("a"), _slide("b"), _slide("c")
    q = CallQueue(actors=2)
    q.add([("plan", a), ("plan", b), ("plan", c)])
    assert _named(q.take(0)[0]) == "plan a" and _named(q.take(1)[0]) == "plan b"
    q.add(_regions(a, 3), front=True)
    assert _named(q.take(0)[0]) == "a/0"
    q.add(_regions(b, 3), front=True)  # b's regions now lie before a's in the queue
    assert _named(q.take(1)[0]) == "b/0"
    assert _named(q.take(0)[0]) == "a/1"  # not b/1: actor 0 has slide a, not b
    assert _named(q.take(0)[0]) == "a/2"
    assert _named(q.take(0)[0]) == "plan c"  # a is done: the next slide, rather than a share of b
    assert [_named(q.take(1)[0]) for _ in range(2)] == ["b/1", "b/2"]
    assert len(q) == 0


def test_at_the_runs_end_an_idle_actor_takes_the_newest_slides_regions():
    a, b = _slide("a"), _slide("b")
    q = CallQueue(actors=3)
    q.add([("plan", a), ("plan", b)])
    q.take(0), q.take(1)
    q.add(_regions(a, 4), front=True)
    q.add(_regions(b, 4), front=True)
    assert _named(q.take(2)[0]) == "b/0"  # nothing to plan, and actor 2 holds no slide
    assert _named(q.take(0)[0]) == "a/0" and _named(q.take(1)[0]) == "b/1"
    assert _named(q.take(2)[0]) == "b/2"  # it holds b now
    assert len(q) == 4


def test_other_calls_keep_their_order_and_the_front():
    q = CallQueue(actors=1)
    q.add([("pack", "s1"), ("pack", "s2")])
    q.add([("mark", "m1"), ("mark", "m2")], front=True)
    assert [_named(q.take(0)[0]) for _ in range(4)] == ["m1", "m2", "s1", "s2"]
    series = Unit("x", "dicom", ["s3://in/x/1.dcm"], "x", "p")
    assert slide_of(("process", Work(series))) is None and slide_of(("plan", _slide("a"))) == "a"
    assert slide_of(("pack", ("train", 0, ["a-0000"], None))) is None


def test_an_actor_holds_as_many_slides_as_its_cache_keeps():
    q = CallQueue(actors=1, slots=2)
    units = [_slide(n) for n in "abc"]
    q.add([("plan", u) for u in units])
    for _ in units:
        q.take(0)
    assert q.held[0] == ["b", "c"]
    q.add(_regions(units[0], 1) + _regions(units[2], 1))
    assert _named(q.take(0)[0]) == "c/0"  # the slide it read last first
    assert _named(q.take(0)[0]) == "a/0" and q.held[0] == ["c", "a"]


def _simulate(
    actors: int, slides: int, regions: int, seed: int, download_s: float = 0.0, ahead: bool = False
) -> tuple[int, float]:
    """Simulated run on :class:`CallQueue`: plans of 0.5 s, regions of 5 s +- 20 %, each actor's source cache an
    LRU of two slides, a slide's download ``download_s`` (each at its own bandwidth), fetched ahead where the queue
    says (``ahead``); returns (slides downloaded, the run's length)."""
    rnd = random.Random(seed)
    q = CallQueue(actors, ahead=(lambda unit: True) if ahead else None)
    units = [_slide(f"s{k:03d}") for k in range(slides)]
    q.add([("plan", u) for u in units])
    caches = [OrderedDict() for _ in range(actors)]  # slide -> when it is on the actor's disk
    events, downloads, idle, now = [], 0, list(range(actors)), 0.0

    def fetch(cache: OrderedDict, key: str) -> float:
        nonlocal downloads
        if key not in cache:
            downloads += 1
            cache[key] = now + download_s
            if len(cache) > 2:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return cache[key]

    def start(actor: int) -> None:
        call, next_slide = q.take(actor)
        key, cache = slide_of(call), caches[actor]
        if next_slide is not None:  # as the actor does: its current slide kept, the next one's download begun
            cache.move_to_end(key)
            fetch(cache, next_slide.id)
        begin = fetch(cache, key)
        secs = (0.5 if call[0] == "plan" else 5.0) * rnd.uniform(0.8, 1.2)
        heapq.heappush(events, (max(now, begin) + secs, actor, call))

    while idle and len(q):
        start(idle.pop())
    while events:
        now, actor, (kind, item) = heapq.heappop(events)
        if kind == "plan":
            q.add(_regions(item, regions), front=True)
        idle.append(actor)
        while idle and len(q):
            start(idle.pop())
    return downloads, now


def test_slides_are_downloaded_about_once_and_the_run_ends_evenly():
    for actors, slides, regions in [(2, 6, 11), (16, 64, 11), (16, 64, 4)]:
        downloads, length = _simulate(actors, slides, regions, seed=actors + regions)
        ideal = slides * (0.5 + regions * 5.0) / actors
        # at most one more per actor, taken at the run's end (strict queue order, as before: ~670 for 16 x 64 x 11)
        assert downloads <= slides + actors, (actors, slides, regions, downloads)
        assert length <= 1.1 * ideal, (actors, slides, regions, length, ideal)


def test_an_actor_on_a_slide_it_holds_fetches_the_next_slide_to_plan_and_plans_it_next():
    a, b, c, d = (_slide(n) for n in "abcd")
    q = CallQueue(actors=2, ahead=lambda unit: unit.id != "d")  # d: a slide on local disk, nothing to fetch
    q.add([("plan", u) for u in (a, b, c, d)])
    assert q.take(0)[1] is None  # plan a: it is downloading a now
    q.add(_regions(a, 2), front=True)
    call, ahead = q.take(0)
    assert _named(call) == "a/0" and ahead is b and q.held[0] == ["b", "a"]  # b downloads while a is cut
    assert _named(q.take(1)[0]) == "plan c" and len(q) == 3  # b is set aside for actor 0
    call, ahead = q.take(0)
    assert _named(call) == "a/1" and ahead is None  # one slide ahead at a time
    call, ahead = q.take(0)
    assert _named(call) == "plan b" and ahead is None  # d is local: nothing to fetch
    assert _named(q.take(0)[0]) == "plan d" and len(q) == 0


def test_at_the_runs_end_an_idle_actor_plans_the_slide_another_actor_fetches_ahead():
    a, b = _slide("a"), _slide("b")
    q = CallQueue(actors=2, ahead=lambda unit: True)
    q.add([("plan", a), ("plan", b)])
    q.take(0)
    q.add(_regions(a, 1), front=True)
    assert q.take(0)[1] is b
    assert _named(q.take(1)[0]) == "plan b"  # nothing else to do: rather than idle until actor 0 is done
    assert len(q) == 0


def test_fetching_ahead_hides_the_downloads_behind_the_work():
    for actors, slides, regions in [(2, 16, 1), (2, 6, 11), (16, 64, 4)]:
        work = 0.5 + regions * 5.0
        ideal, download_s = slides * work / actors, 0.6 * work  # each slide's download: 60 % of its work
        waited, plain = _simulate(actors, slides, regions, actors + regions, download_s)
        fetched, ahead = _simulate(actors, slides, regions, actors + regions, download_s, ahead=True)
        # one at a time, a worker waits for each of its slides; fetched ahead, for its first one (and the run's end)
        assert plain >= 0.95 * (ideal + slides / actors * download_s), (actors, slides, regions, plain)
        assert ahead <= 1.2 * (ideal + download_s), (actors, slides, regions, ahead, ideal)
        assert fetched <= slides + actors and waited <= slides + actors


def test_a_run_whose_workers_cannot_start_says_why():
    """The line a run prints when no worker has started after a while: what one needs, what the cluster has free,
    and whether the workers wait for room or are placed and still setting up (a background model loading)."""
    from ingest.actors import no_room_note

    cpu = {"CPU": 1.0}
    no_room = no_room_note(2, 0, cpu, {"CPU": 2.0}, {"CPU": 0.0})
    assert no_room.startswith("no ingest worker has started in 30 s: the cluster has no room for one")
    assert (
        "(each needs 1 CPU; 0 of 2 CPUs free); the run waits for room (`tessera status` shows what holds it" in no_room
    )
    assert "none is placed yet" in no_room_note(2, 0, cpu, {"CPU": 2.0}, {"CPU": 2.0})
    setting_up = no_room_note(3, 1, {"CPU": 1.0, "GPU": 0.5}, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 3.0, "GPU": 0.5})
    assert setting_up == (
        "no ingest worker has started in 30 s: 1 of 3 are placed and still setting up; the other 2 wait for room "
        "(each needs 1 CPU and 0.5 GPU; 3 of 4 CPUs free, 0.5 of 1 GPUs free)"
    )
    assert "or they are still setting up" in no_room_note(2, None, cpu, {"CPU": 2.0}, {"CPU": 0.0})
