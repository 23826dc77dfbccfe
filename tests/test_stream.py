import datetime as dt
from collections import defaultdict
from itertools import accumulate

import pytest
from pydantic import ValidationError

from lme_sim.cases import EditCase
from lme_sim.stream import (
    EditStream,
    Event,
    SimClock,
    Timeline,
    batch_events,
    build_events,
    fact_key,
    format_duration,
    latest_values,
    parse_duration,
)
from lme_sim.world import World, get_world_config

START = dt.datetime(2024, 1, 1)


@pytest.fixture(scope="module")
def world():
    return World(get_world_config("small"))


def dataset_cases(n):
    return [
        EditCase(
            case_id=str(i),
            subject=f"Subj{i}",
            prompt=f"Subj{i} lives in",
            target_new=f"new{i}",
            target_true=f"old{i}",
            relation="P1",
        )
        for i in range(n)
    ]


def edits(events):
    return [e for e in events if e.is_edit]


def replay(events):
    """Reference value per fact, replayed with explicit update / revert semantics."""
    values, by_id = {}, {}
    for e in edits(events):
        if e.kind == "revert":
            prev = by_id[e.supersedes]
            assert e.value == prev.case.target_true  # back to the value before the superseded edit
        values[e.fact_key] = e.value
        by_id[e.edit_id] = e
    return values


# --- durations and timeline validation --------------------------------------------------------
def test_parse_duration():
    assert parse_duration("30s") == dt.timedelta(seconds=30)
    assert parse_duration("15m") == dt.timedelta(minutes=15)
    assert parse_duration("6h") == dt.timedelta(hours=6)
    assert parse_duration("1d") == parse_duration(1) == dt.timedelta(days=1)
    assert parse_duration("2w") == dt.timedelta(days=14)
    assert parse_duration("1.5h") == dt.timedelta(minutes=90)
    assert (
        format_duration(dt.timedelta(minutes=90)) == "90m" and format_duration(dt.timedelta(days=14)) == "2w"
    )
    for bad in ("1y", "abc", "-1d", "", "d"):
        with pytest.raises(ValueError, match="bad duration"):
            parse_duration(bad)


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"pattern": "fixed", "n_batchez": 3}, "n_batchez"),
        ({"pattern": "poisson", "rate": -1.0}, "rate"),
        ({"pattern": "fixed", "interval": "1y"}, "interval"),
        ({"pattern": "bursts", "within": "-5m"}, "within"),
        ({"pattern": "poisson", "duration": "0d"}, "duration"),
        ({"pattern": "fixed", "rate": 5.0}, "rate"),  # belongs to another pattern
        ({"pattern": "history", "update_fraction": 0.1}, "update_fraction"),
        ({"pattern": "fixed", "update_fraction": 0.6, "revert_fraction": 0.5}, "revert_fraction"),
        ({"pattern": "fixed", "eval_every": 0}, "eval_every"),
        ({"pattern": "weekly"}, "pattern"),
    ],
)
def test_bad_timeline_fields_name_the_field(fields, name):
    with pytest.raises(ValidationError, match=name):
        Timeline(**fields)


def test_timeline_round_trips_through_a_dump():
    t = Timeline(pattern="bursts", n_bursts=3, burst_size=4, interval="6h", within="90s", eval_every=5)
    dumped = t.model_dump()
    assert dumped["interval"] == "6h" and dumped["within"] == "90s"
    assert Timeline(**dumped) == t


# --- patterns ---------------------------------------------------------------------------------
def test_fixed_batches(world):
    t = Timeline(pattern="fixed", n_batches=3, batch_size=4, interval="1d")
    ev = build_events(t, world.edit_cases(12), start=START)
    assert [e.kind for e in ev] == ["edit"] * 12
    assert [e.edit_id for e in ev] == list(range(12))
    assert [e.time for e in ev] == [START + dt.timedelta(days=b) for b in range(3) for _ in range(4)]
    assert all(e.supersedes is None for e in ev)
    assert [e.case for e in ev] == world.edit_cases(12)  # consumed in order
    assert [len(g) for g in batch_events(ev, 4)] == [4, 4, 4]


def test_eval_every_inserts_checkpoints_and_one_at_the_end(world):
    cases = world.edit_cases(12)
    ev = build_events(Timeline(n_batches=3, batch_size=4, eval_every=4), cases)
    assert [i for i, e in enumerate(ev) if e.kind == "eval"] == [4, 9, 14]  # no duplicate at the end
    ev = build_events(Timeline(n_batches=3, batch_size=4, eval_every=5), cases)
    assert [i for i, e in enumerate(ev) if e.kind == "eval"] == [5, 11, 14]
    assert all(e.edit_id is None and e.case is None for e in ev if e.kind == "eval")
    assert ev[-1].time == ev[-2].time


def test_bursts(world):
    t = Timeline(pattern="bursts", n_bursts=3, burst_size=4, interval="1d", within="10m")
    ev = build_events(t, world.edit_cases(12), start=START)
    expected = [START + dt.timedelta(days=b, minutes=10 * i) for b in range(3) for i in range(4)]
    assert [e.time for e in ev] == expected and len(edits(ev)) == 12


def test_poisson_rate_and_seeding():
    t = Timeline(pattern="poisson", rate=50.0, duration="200d")
    cases = dataset_cases(12_000)
    ev = build_events(t, cases, seed=3)
    times = [e.time for e in ev]
    assert times == sorted(times) and times[0] >= START and times[-1] <= START + dt.timedelta(days=200)
    assert abs(len(ev) - 10_000) < 400  # ~4 standard deviations
    gaps = [(b - a) / dt.timedelta(days=1) for a, b in zip(times, times[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50, rel=0.05)
    assert [e.time for e in build_events(t, cases, seed=3)] == times
    assert [e.time for e in build_events(t, cases, seed=4)] != times


def test_not_enough_cases_names_the_field(world):
    with pytest.raises(ValueError, match="n_batches"):
        build_events(Timeline(n_batches=3, batch_size=4), world.edit_cases(11))
    with pytest.raises(ValueError, match="rate"):
        build_events(Timeline(pattern="poisson", rate=10.0, duration="10d"), dataset_cases(5))


def test_history_replay(world):
    ev = build_events(Timeline(pattern="history"), world=world)
    assert len(ev) == len(world.changes)
    assert [e.edit_id for e in ev] == list(range(len(ev)))
    assert [e.time for e in ev] == sorted(e.time for e in ev)
    changed = defaultdict(list)
    for ch in world.changes:
        changed[f"{ch.fact.subject}|{ch.fact.relation}"].append(ch)
    assert sum(e.kind == "edit" for e in ev) == len(changed)  # one edit per fact with a history
    per_fact = defaultdict(list)
    for e in ev:
        per_fact[e.fact_key].append(e)
    for key, chain in per_fact.items():
        assert [e.kind for e in chain] == ["edit"] + ["update"] * (len(chain) - 1)
        assert chain[0].supersedes is None
        assert [e.supersedes for e in chain[1:]] == [e.edit_id for e in chain[:-1]]
        assert [(e.case.target_true, e.value) for e in chain] == [(c.old, c.new) for c in changed[key]]
        assert [e.time.date() for e in chain] == [c.date for c in changed[key]]
        assert fact_key(chain[0].case) == key
    assert latest_values(ev) == {k: chs[-1].new for k, chs in changed.items()}


def test_updates_and_reverts_in_any_pattern(world):
    t = Timeline(pattern="fixed", n_batches=10, batch_size=20, update_fraction=0.3, revert_fraction=0.2)
    ev = build_events(t, world.edit_cases(200), world=world, seed=1)
    kinds = [e.kind for e in ev]
    assert len(ev) == 200 and kinds.count("update") > 20 and kinds.count("revert") > 10
    by_id = {e.edit_id: e for e in ev}
    last = {}
    for e in ev:
        if e.kind == "edit":
            assert e.fact_key not in last and e.supersedes is None
        else:
            prev = by_id[e.supersedes]
            assert last[e.fact_key] is prev  # supersedes the fact's latest event
            assert e.case.target_true == prev.value
            if e.kind == "update":
                assert e.value in world.objects[e.case.relation] and e.value != prev.value
            else:
                assert e.value == prev.case.target_true  # back to the value before the superseded edit
        last[e.fact_key] = e
    assert latest_values(ev) == replay(ev) == {k: e.value for k, e in last.items()}
    assert build_events(t, world.edit_cases(200), world=world, seed=1) == ev


def test_revert_restores_previous_value():
    cases = dataset_cases(1)
    ev = build_events(Timeline(n_batches=1, batch_size=4, revert_fraction=0.99), cases, seed=0)
    # one edit then reverts: each undoes the latest event
    assert [e.kind for e in ev] == ["edit", "revert", "revert", "revert"]
    assert [e.value for e in ev] == ["new0", "old0", "new0", "old0"]
    assert [e.supersedes for e in ev] == [None, 0, 1, 2]
    assert latest_values(ev[:2]) == {fact_key(cases[0]): "old0"}


def test_dataset_updates_flip_between_targets():
    ev = build_events(Timeline(n_batches=1, batch_size=6, update_fraction=0.99), dataset_cases(1))
    assert [e.kind for e in ev] == ["edit"] + ["update"] * 5
    assert [e.value for e in ev] == ["new0", "old0"] * 3
    assert all(e.case.target_true == p.value for p, e in zip(ev, ev[1:]))


def test_repeated_case_of_a_fact_becomes_an_update():
    c = dataset_cases(1)[0]
    ev = build_events(Timeline(n_batches=2, batch_size=1), [c, c.with_target("newer", None)])
    assert [(e.kind, e.supersedes, e.case.target_true, e.value) for e in ev] == [
        ("edit", None, "old0", "new0"),
        ("update", 0, "new0", "newer"),
    ]


# --- batching -----------------------------------------------------------------------------------
def test_batching_respects_evals_and_facts(world):
    t = Timeline(pattern="fixed", n_batches=6, batch_size=20, update_fraction=0.4, eval_every=15)
    ev = build_events(t, world.edit_cases(120), world=world, seed=2)
    for size in (1, 7, 20, 1000):
        groups = batch_events(ev, size)
        assert [e for g in groups for e in g] == ev
        for g in groups:
            if g[0].kind == "eval":
                assert len(g) == 1
            else:
                assert len(g) <= size and all(e.is_edit for e in g)
                assert len({e.fact_key for e in g}) == len(g)
    # an eval closes a batch; a second event of a fact opens a new one
    a, b, c = (Event("edit", START, i, None, k) for i, k in enumerate("xyz"))
    x2 = Event("update", START, 3, None, "x", 0)
    e = Event("eval", START)
    assert batch_events([a, b, e, c], 10) == [[a, b], [e], [c]]
    assert batch_events([a, b, x2, c], 10) == [[a, b], [x2, c]]
    with pytest.raises(ValueError, match="batch_size"):
        batch_events(ev, 0)


# --- clock --------------------------------------------------------------------------------------
class FakeTime:
    def __init__(self):
        self.now, self.slept = 100.0, []

    def sleep(self, s):
        self.slept.append(s)
        self.now += s

    def monotonic(self):
        return self.now


def test_sim_clock_sleeps_scaled_delta():
    ft = FakeTime()
    clock = SimClock(3600.0, sleep=ft.sleep, monotonic=ft.monotonic)  # one simulated hour per second
    assert clock.wait_until(START) == 0.0  # starts the clock
    assert clock.wait_until(START + dt.timedelta(hours=2)) == pytest.approx(2.0)
    ft.now += 0.5  # work took half a second
    assert clock.wait_until(START + dt.timedelta(hours=3)) == pytest.approx(0.5)
    ft.now += 5.0  # running late: no sleep
    assert clock.wait_until(START + dt.timedelta(hours=4)) == 0.0
    assert ft.slept == pytest.approx([2.0, 0.5])


def test_sim_clock_default_is_as_fast_as_possible():
    ft = FakeTime()
    clock = SimClock(sleep=ft.sleep, monotonic=ft.monotonic)
    assert clock.as_fast_as_possible
    assert clock.wait_until(START) == clock.wait_until(START + dt.timedelta(days=30)) == 0.0
    assert ft.slept == []
    with pytest.raises(ValueError, match="speedup"):
        SimClock(0)


# --- stream cursor ------------------------------------------------------------------------------
def drain(stream):
    out = []
    while (item := stream.next_batch()) is not None:
        out.append(item)
    return out


def test_edit_stream_batches_and_resumes(world):
    t = Timeline(
        pattern="bursts",
        n_bursts=4,
        burst_size=9,
        interval="1d",
        within="1h",
        update_fraction=0.3,
        eval_every=10,
    )
    full = drain(EditStream.from_timeline(t, 4, world.edit_cases(36), world=world, seed=5))
    events = build_events(t, world.edit_cases(36), world=world, seed=5)
    assert [step.events for step in full] == batch_events(events, 4)  # one Step type for both kinds
    assert [step.position for step in full] == list(accumulate(len(step.events) for step in full))
    assert sum(step.is_eval for step in full) == 4 and all(len(s.events) == 1 for s in full if s.is_eval)
    assert all(s.time == s.events[-1].time for s in full)
    for k in (0, 1, 3, 7):
        s = EditStream(events, 4)
        head = [s.next_batch() for _ in range(k)]
        state = s.state_dict()
        resumed = EditStream(events, 4)
        resumed.load_state_dict(state)
        assert resumed.position == state["position"] == (head[-1].position if head else 0)
        assert head + drain(resumed) == full
        again = EditStream(events, 4)
        again.seek(s.position)
        assert drain(again) == drain(s)
    s = EditStream(events, 4)
    drain(s)
    assert s.done and s.next_batch() is None
    with pytest.raises(ValueError, match="different event stream"):
        EditStream(events[:-1], 4).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="position"):
        s.seek(len(events) + 1)


def test_a_window_cuts_batches_by_arrival_time():
    """stream.window: a batch holds what arrived within the window of its first edit, or batch_size edits,
    whichever comes first; Poisson arrivals then give batches of uneven size."""
    import datetime as dt

    t0 = dt.datetime(2024, 1, 1)
    cases = [EditCase(str(i), f"S{i}", f"S{i} is in", "x", "y") for i in range(8)]
    times = [0, 1, 2, 10, 11, 30, 31, 32]  # hours
    events = [
        Event("edit", t0 + dt.timedelta(hours=h), i, c, fact_key(c))
        for i, (h, c) in enumerate(zip(times, cases))
    ]
    sizes = [len(g) for g in batch_events(events, 10, window=dt.timedelta(hours=6))]
    assert sizes == [3, 2, 3]
    assert [len(g) for g in batch_events(events, 2, window=dt.timedelta(hours=6))] == [2, 1, 2, 2, 1]
    stream = EditStream(events, 10, window=dt.timedelta(hours=6))
    assert [len(stream.next_batch().events) for _ in range(3)] == [3, 2, 3] and stream.next_batch() is None
    poisson = build_events(Timeline(pattern="poisson", rate=24, duration="2d"), cases * 20, seed=1)
    assert len({len(g) for g in batch_events(poisson, 100, window=dt.timedelta(hours=3))}) > 1


def test_n_edits_need_not_fill_the_last_batch():
    """15 edits in batches of 10: two batches, the last one smaller (it used to crash after Ray started)."""
    from lme_sim.scenario import Scenario

    scn = Scenario.model_validate(
        {"name": "x", "model": "world:small", "data": {"n_edits": 15}, "stream": {"batch_size": 10}}
    )
    cases = [EditCase(str(i), f"S{i}", f"S{i} is in", "x", "y") for i in range(15)]
    events = build_events(scn.timeline(), cases)
    assert [len(g) for g in batch_events(events, 10) if g[0].is_edit] == [10, 5]
