"""The edit stream: a scenario's timeline turned into timed ``edit`` / ``update`` / ``revert`` / ``eval``
events.

Pure Python; the run's driver replays the stream itself (no actor: :class:`~lme_sim.runtime.coordinator.Run`).

* :class:`Timeline` (pydantic, embeddable in scenario YAML) says *when* edits arrive: ``fixed``
  batches (the papers' 20x100 setting), a ``poisson`` rate, ``bursts``, or a ``history`` replay of
  the world's dated changes. ``update_fraction`` / ``revert_fraction`` make some arrivals re-edit
  or revert an earlier edited fact; ``eval_every`` inserts evaluation checkpoints.
* :func:`build_events` turns a timeline plus edit cases (or a :class:`~lme_sim.world.World`) into
  a time-sorted list of :class:`Event`.
* :func:`batch_events` / :class:`EditStream` cut the events into edit batches; :class:`SimClock`
  maps simulated time to wall time (as fast as possible by default).

A fact is identified across events by :func:`fact_key`; :func:`latest_values` gives the value in
force after a list of events.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import re
import time as _time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, model_validator

from .cases import EditCase

if TYPE_CHECKING:
    from .world import World

EDIT_KINDS = ("edit", "update", "revert")
DEFAULT_START = dt.datetime(2024, 1, 1)

# --- durations ------------------------------------------------------------------------------
_UNITS = {
    "w": dt.timedelta(weeks=1),
    "d": dt.timedelta(days=1),
    "h": dt.timedelta(hours=1),
    "m": dt.timedelta(minutes=1),
    "s": dt.timedelta(seconds=1),
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([wdhms])\s*$")


def parse_duration(value: str | float | int | dt.timedelta) -> dt.timedelta:
    """``"30s"``, ``"15m"``, ``"6h"``, ``"1d"``, ``"2w"`` (or a bare number of days) -> timedelta.

    Negative values and unknown units are rejected (ValueError).
    """
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    m = _DURATION_RE.match(value) if isinstance(value, str) else None
    if not (isinstance(value, dt.timedelta) or number or m):
        raise ValueError(f"bad duration {value!r}: use a number and a unit s/m/h/d/w, e.g. '6h' or '1d'")
    try:
        td = (
            value
            if isinstance(value, dt.timedelta)
            else dt.timedelta(days=value)
            if number
            else float(m.group(1)) * _UNITS[m.group(2)]
        )
    except (OverflowError, ValueError):  # NaN, or beyond timedelta's range
        raise ValueError(
            f"bad duration {value!r}: not a finite time span of at most 999999999 days"
        ) from None
    if td < dt.timedelta(0):
        raise ValueError(f"bad duration {value!r}: must not be negative")
    return td


def format_duration(td: dt.timedelta) -> str:
    """The inverse of :func:`parse_duration`, in the largest unit that is exact (``"90m"``, ``"2w"``)."""
    for unit, size in _UNITS.items():
        if td % size == dt.timedelta(0):
            return f"{td // size}{unit}"
    return f"{td.total_seconds():g}s"


Duration = Annotated[
    dt.timedelta, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)
]


# --- timeline spec --------------------------------------------------------------------------
_PATTERN_FIELDS = {
    "fixed": {"n_batches", "batch_size", "interval", "n_edits"},
    "poisson": {"rate", "duration"},
    "bursts": {"n_bursts", "burst_size", "interval", "within"},
    "history": set(),
}
_COMMON_FIELDS = {"pattern", "eval_every", "update_fraction", "revert_fraction"}
_COUNT_FIELDS = {
    "fixed": "n_batches * batch_size",
    "poisson": "rate * duration",
    "bursts": "n_bursts * burst_size",
}


class Timeline(BaseModel):
    """When edits arrive. Fields that do not belong to ``pattern`` must keep their defaults."""

    model_config = ConfigDict(extra="forbid")

    pattern: Literal["fixed", "poisson", "bursts", "history"] = "fixed"
    # fixed: n_batches batches of batch_size edits, one batch per interval; n_edits caps the arrivals
    # (the last batch is then smaller)
    n_batches: int = Field(20, gt=0)
    batch_size: int = Field(100, gt=0)
    n_edits: int | None = Field(None, gt=0)
    interval: Duration = dt.timedelta(days=1)  # also: between bursts
    # poisson: exponential inter-arrival times, `rate` edits per day for `duration`
    rate: float = Field(100.0, gt=0)
    duration: Duration = dt.timedelta(days=20)
    # bursts: n_bursts bursts of burst_size edits, `within` apart inside a burst
    n_bursts: int = Field(10, gt=0)
    burst_size: int = Field(50, gt=0)
    within: Duration = dt.timedelta(minutes=1)
    # any pattern but history: share of arrivals that update / revert an earlier edited fact
    update_fraction: float = Field(0.0, ge=0, lt=1)
    revert_fraction: float = Field(0.0, ge=0, lt=1)
    eval_every: int | None = Field(None, gt=0)  # an eval after every N edit-like events (and at the end)

    @model_validator(mode="after")
    def _check(self) -> Timeline:
        if self.interval <= dt.timedelta(0):
            raise ValueError("field 'interval' must be positive")
        if self.duration <= dt.timedelta(0):
            raise ValueError("field 'duration' must be positive")
        if self.update_fraction + self.revert_fraction >= 1:
            raise ValueError("fields 'update_fraction' + 'revert_fraction' must sum to less than 1")
        allowed = _PATTERN_FIELDS[self.pattern] | _COMMON_FIELDS
        if self.pattern == "history":
            allowed = allowed - {"update_fraction", "revert_fraction"}
        stray = sorted(
            f
            for f, info in type(self).model_fields.items()
            if f not in allowed and getattr(self, f) != info.default
        )
        if stray:
            raise ValueError(
                f"field(s) {', '.join(map(repr, stray))} do not apply to pattern {self.pattern!r}"
            )
        return self


def arrival_offsets(timeline: Timeline, rng: random.Random) -> list[dt.timedelta]:
    """Sorted arrival times (offsets from the start) of a non-history timeline."""
    t = timeline
    if t.pattern == "fixed":
        return [b * t.interval for b in range(t.n_batches) for _ in range(t.batch_size)][: t.n_edits]
    if t.pattern == "bursts":
        return sorted(b * t.interval + i * t.within for b in range(t.n_bursts) for i in range(t.burst_size))
    if t.pattern == "poisson":
        out, days, end = [], 0.0, t.duration / dt.timedelta(days=1)
        while (days := days + rng.expovariate(t.rate)) <= end:
            out.append(dt.timedelta(days=days))
        return out
    raise ValueError(f"pattern {t.pattern!r} has no arrival offsets (history replays world.changes)")


# --- events ---------------------------------------------------------------------------------
def fact_key(case: EditCase) -> str:
    """Identifies a fact across updates: ``"subject|relation"`` (the prompt where a case has no relation)."""
    return f"{case.subject}|{case.relation or case.prompt}"


@dataclass(frozen=True)
class Event:
    """One stream event. ``edit_id`` numbers edit-like events from 0; ``supersedes`` is the
    edit_id of the previous edit-like event of the same fact (None for a first edit and evals)."""

    kind: Literal["edit", "update", "revert", "eval"]
    time: dt.datetime
    edit_id: int | None = None
    case: EditCase | None = None
    fact_key: str | None = None
    supersedes: int | None = None

    @property
    def is_edit(self) -> bool:
        return self.kind != "eval"

    @property
    def value(self) -> str | None:
        """The object in force for the fact after this event."""
        return self.case.target_new if self.case else None


@dataclass
class _Fact:
    base: EditCase  # the fact's first case: updates and reverts re-target it
    last: Event  # its latest edit-like event


class _Builder:
    """Accumulates edit-like events, tracking each fact's latest event."""

    def __init__(self, world: World | None):
        self.world = world
        self.events: list[Event] = []
        self.facts: dict[str, _Fact] = {}

    def _emit(self, kind: str, time: dt.datetime, key: str, case: EditCase) -> None:
        prev = self.facts.get(key)
        ev = Event(kind, time, len(self.events), case, key, prev.last.edit_id if prev else None)
        self.events.append(ev)
        self.facts[key] = _Fact(prev.base if prev else case, ev)

    def new(self, time: dt.datetime, case: EditCase) -> None:
        """A case: an edit, or an update where its fact was edited before."""
        key = fact_key(case)
        if key in self.facts:
            self._emit("update", time, key, case.with_target(case.target_new, self.facts[key].last.value))
        else:
            self._emit("edit", time, key, case)

    def update(self, time: dt.datetime, key: str, new: str) -> None:
        f = self.facts[key]
        self._emit("update", time, key, f.base.with_target(new, f.last.value))

    def revert(self, time: dt.datetime, key: str) -> None:
        """Back to the value before the fact's latest event."""
        f = self.facts[key]
        self._emit("revert", time, key, f.base.with_target(f.last.case.target_true, f.last.value))

    def update_options(self, key: str) -> list[str]:
        """Values an update may move ``key`` to: the world's objects of its relation, or else a
        flip between the first case's target_new and target_true."""
        f, cur = self.facts[key], self.facts[key].last.value
        if self.world is not None and f.base.relation in self.world.objects:
            return [o for o in self.world.objects[f.base.relation] if o != cur]
        flip = f.base.target_true if cur == f.base.target_new else f.base.target_new
        return [flip] if flip is not None and flip != cur else []

    def can_update(self, key: str) -> bool:
        """Cheap test that :meth:`update_options` is non-empty."""
        f, cur = self.facts[key], self.facts[key].last.value
        if self.world is not None and f.base.relation in self.world.objects:
            return any(o != cur for o in self.world.objects[f.base.relation])
        return f.base.target_true is not None and f.base.target_true != f.base.target_new

    def can_revert(self, key: str) -> bool:
        last = self.facts[key].last.case
        return last.target_true is not None and last.target_true != last.target_new


def _with_evals(edits: list[Event], every: int | None) -> list[Event]:
    """Insert an eval after every ``every`` edit-like events and after the last one."""
    if not every:
        return list(edits)
    out: list[Event] = []
    for i, ev in enumerate(edits, 1):
        out.append(ev)
        if i % every == 0 or i == len(edits):
            out.append(Event("eval", ev.time))
    return out


def build_events(
    timeline: Timeline,
    cases: list[EditCase] | None = None,
    world: World | None = None,
    start: dt.datetime | None = None,
    seed: int = 0,
) -> list[Event]:
    """The timeline's events, sorted by time.

    New edits consume ``cases`` in order (default: one counterfactual case per world fact, via
    ``world.edit_cases``); a case whose fact was edited before becomes an update. Update values
    come from the world's objects of the relation where the world knows it, else flip between
    the case's target_new and target_true. The ``history`` pattern replays ``world.changes`` at
    their own dates (``cases`` and ``start`` unused). ``start`` defaults to 2024-01-01.
    """
    start = start or DEFAULT_START
    b = _Builder(world)
    if timeline.pattern == "history":
        if world is None:
            raise ValueError("timeline.pattern 'history' replays world.changes: pass a world")
        for ch in world.changes:
            time = dt.datetime.combine(ch.date, dt.time(), tzinfo=start.tzinfo)
            key = f"{ch.fact.subject}|{ch.fact.relation}"
            if key in b.facts:
                b.update(time, key, ch.new)
            else:
                b.new(time, world.case(ch.fact, ch.new, ch.old, case_id=f"world-history-{ch.fact.fact_id}"))
        return _with_evals(b.events, timeline.eval_every)

    if cases is None:
        if world is None:
            raise ValueError(f"timeline.pattern {timeline.pattern!r} needs cases or a world")
        cases = world.edit_cases(len(world.facts), seed=seed)
    rng = random.Random(seed)
    offsets = arrival_offsets(timeline, rng)
    upd, rev = timeline.update_fraction, timeline.update_fraction + timeline.revert_fraction
    pending = iter(cases)
    for off in offsets:
        time, u = start + off, rng.random()
        if u < upd and (keys := [k for k in b.facts if b.can_update(k)]):
            key = rng.choice(keys)
            b.update(time, key, rng.choice(b.update_options(key)))
        elif upd <= u < rev and (keys := [k for k in b.facts if b.can_revert(k)]):
            b.revert(time, rng.choice(keys))
        elif (case := next(pending, None)) is not None:
            b.new(time, case)
        else:
            fields = _COUNT_FIELDS[timeline.pattern]
            raise ValueError(
                f"not enough cases for the timeline: {len(cases)} cases, but pattern "
                f"{timeline.pattern!r} needs more new edits (timeline.{fields} = {len(offsets)} "
                f"arrivals); lower {fields} or supply more cases"
            )
    return _with_evals(b.events, timeline.eval_every)


def latest_values(events: list[Event]) -> dict[str, str]:
    """fact_key -> value in force after all ``events`` (latest wins; a revert's value is the restored one)."""
    return {ev.fact_key: ev.value for ev in events if ev.is_edit}


# --- batching -------------------------------------------------------------------------------
def _group_end(events: list[Event], i: int, batch_size: int, window: dt.timedelta | None = None) -> int:
    """End index of the group starting at ``i``: an eval alone, or up to ``batch_size`` consecutive
    edit-like events that stops before an eval, before a second event of the same fact and, with a
    ``window``, before the first event that arrived more than ``window`` after the group's first."""
    if not events[i].is_edit:
        return i + 1
    seen: set[str | None] = set()
    j = i
    while j < len(events) and j - i < batch_size and events[j].is_edit and events[j].fact_key not in seen:
        if window is not None and events[j].time - events[i].time > window:
            break
        seen.add(events[j].fact_key)
        j += 1
    return j


def batch_events(
    events: list[Event], batch_size: int, window: dt.timedelta | None = None
) -> list[list[Event]]:
    """Consecutive edit-like events in batches of at most ``batch_size`` (and, with a ``window``, of
    events that arrived within ``window`` of the batch's first), never across an eval and never with
    two events of one fact. Each eval is its own one-element group, so the groups, concatenated, are
    ``events``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    groups, i = [], 0
    while i < len(events):
        j = _group_end(events, i, batch_size, window)
        groups.append(events[i:j])
        i = j
    return groups


# --- clock and stream -----------------------------------------------------------------------
class SimClock:
    """Maps simulated time to wall time.

    ``speedup=None`` (the default) runs as fast as possible: :meth:`wait_until` never sleeps.
    Otherwise simulated time ``t`` is due ``(t - origin) / speedup`` wall seconds after the clock
    started; the origin is the first ``wait_until`` time unless :meth:`start` set it.
    """

    def __init__(
        self,
        speedup: float | None = None,
        *,
        sleep: Callable[[float], object] = _time.sleep,
        monotonic: Callable[[], float] = _time.monotonic,
    ):
        if speedup is not None and speedup <= 0:
            raise ValueError(f"speedup must be positive (or None for as fast as possible), got {speedup}")
        self.speedup = speedup
        self._sleep, self._monotonic = sleep, monotonic
        self.origin: dt.datetime | None = None
        self._wall0 = 0.0

    @property
    def as_fast_as_possible(self) -> bool:
        return self.speedup is None

    def start(self, origin: dt.datetime) -> None:
        """Simulated time ``origin`` is now."""
        self.origin, self._wall0 = origin, self._monotonic()

    def wait_until(self, sim_time: dt.datetime) -> float:
        """Sleep until ``sim_time`` is due; returns the seconds slept."""
        if self.speedup is None:
            return 0.0
        if self.origin is None:
            self.start(sim_time)
        due = self._wall0 + (sim_time - self.origin).total_seconds() / self.speedup
        delay = due - self._monotonic()
        if delay <= 0:
            return 0.0
        self._sleep(delay)
        return delay


def _fingerprint(events: list[Event]) -> str:
    h = hashlib.sha256()
    for ev in events:
        h.update(repr((ev.kind, ev.time.isoformat(), ev.edit_id, ev.fact_key, ev.value)).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Step:
    """What a stream hands out next: edit-like events written as one batch, or one eval event (an
    evaluation is due); ``position``: the index of the event after it."""

    events: list[Event]
    position: int

    @property
    def is_eval(self) -> bool:
        return self.events[0].kind == "eval"

    @property
    def time(self) -> dt.datetime:
        """When it is due: its last event's simulated time."""
        return self.events[-1].time


class EditStream:
    """A cursor over events, handing out batches (see :func:`batch_events`) one at a time; the
    coordinator replays it in process, paced by a :class:`SimClock`.

    ``next_batch()`` returns the next :class:`Step`, or None at the end. ``state_dict()`` /
    ``load_state_dict()`` (or ``seek``) resume a stream.
    """

    def __init__(self, events: list[Event], batch_size: int, window: dt.timedelta | None = None):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.events = list(events)
        self.batch_size, self.window = batch_size, window
        self._pos = 0
        self._fp = _fingerprint(self.events)

    @classmethod
    def from_timeline(
        cls,
        timeline: Timeline,
        batch_size: int,
        cases: list[EditCase] | None = None,
        world: World | None = None,
        start: dt.datetime | None = None,
        seed: int = 0,
    ) -> EditStream:
        return cls(build_events(timeline, cases, world, start, seed), batch_size)

    def __len__(self) -> int:
        return len(self.events)

    @property
    def position(self) -> int:
        """Index of the next event."""
        return self._pos

    @property
    def done(self) -> bool:
        return self._pos >= len(self.events)

    def next_batch(self) -> Step | None:
        if self.done:
            return None
        end = _group_end(self.events, self._pos, self.batch_size, self.window)
        group, self._pos = self.events[self._pos : end], end
        return Step(group if group[0].is_edit else group[:1], end)

    def seek(self, position: int) -> None:
        if not 0 <= position <= len(self.events):
            raise ValueError(f"position {position} outside 0..{len(self.events)}")
        self._pos = position

    def state_dict(self) -> dict:
        return {"position": self._pos, "n_events": len(self.events), "fingerprint": self._fp}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self._fp or state.get("n_events") != len(self.events):
            raise ValueError("state_dict is from a different event stream (fingerprint / n_events differ)")
        self.seek(state["position"])
