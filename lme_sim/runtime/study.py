"""A study: the runs of one scenario (a list of editors, seeds), as many at once as the cluster holds.

What one run holds of a cluster is its placement group's bundles (:func:`run_demand`); how many runs
run at once is a pure function of that and what the cluster has free (:func:`concurrent_runs`). Every
run of a study shares one random part of its id, so a study has an id of its own (``<name>-<hex>``,
:func:`study_id`) and a killed study can be resumed as a whole (:func:`resume_plan`). The coordinator
runs a study (:func:`lme_sim.runtime.coordinator.run_study`): each run in a thread of the driver, all
logging through one logger actor.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from ..scenario import EvaluatorSpec, RuntimeSpec, Scenario
from .ray_utils import editor_options, evaluator_options, run_bundles, shard_bundle


@dataclass
class StudyRun:
    """One run of a study: its scenario (one editor, one seed), its id, and whether it is resumed."""

    scn: Scenario
    run_id: str
    resume: bool = False


def new_study_hex() -> str:
    """The random part every run id of a new study ends with."""
    return uuid.uuid4().hex[:8]


def run_id(name: str, tag: str | None, study_hex: str) -> str:
    """``<name>[-<tag>]-<hex>``: the tag names the editor and seed of a run of a list or of seeds."""
    return "-".join([name] + ([tag] if tag else []) + [study_hex])


def study_id(run: str, name: str) -> str:
    """The study a run id belongs to: its scenario's name and its random part, ``<name>-<hex>``."""
    return f"{name}-{run.rsplit('-', 1)[-1]}"


def run_demand(rt: RuntimeSpec, ev: EvaluatorSpec) -> dict[str, float]:
    """What one run holds of a cluster: the bundles of its placement group (its shards', and its
    evaluators' and editor's where they reserve resources), and at least one CPU: the editor and its
    shards work in turn, so a run on CPUs keeps about one core busy."""
    actors = [evaluator_options(ev.backend, ev.tensor_parallel_size, rt.gpus)] * rt.evaluators
    more, _ = run_bundles(rt.shards, actors + [editor_options(rt.editor.cpus, rt.editor.gpus)])
    total: dict[str, float] = {}
    for bundle in [shard_bundle(rt.gpus)] * rt.shards + more:
        for r, v in bundle.items():
            total[r] = total.get(r, 0.0) + v
    total["CPU"] = max(1.0, total.get("CPU", 0.0))
    return total


def runs_that_fit(available: dict[str, float], demand: dict[str, float]) -> int:
    """How many runs of ``demand`` the resources ``available`` hold at once (at least one: a run that
    does not fit waits for its placement group, then fails naming the fields)."""
    fits = [int(available.get(r, 0.0) / need + 1e-9) for r, need in demand.items() if need > 0]
    return max(1, min(fits, default=1))


def concurrent_runs(setting: str | int, available: dict[str, float], demand: dict[str, float], n: int) -> int:
    """``runtime.concurrent_runs`` for a study of ``n`` runs: a number as it is, ``auto`` what fits."""
    k = setting if isinstance(setting, int) else runs_that_fit(available, demand)
    return max(1, min(k, n))


@dataclass
class RunRow:
    """A run of the scenario already in the database: its id, editor name, seed and status."""

    run_id: str
    label: str
    seed: int
    status: str


def resume_plan(
    rows: list[RunRow], wanted: list[tuple[str, int]], study: str, name: str
) -> tuple[list[RunRow], list[tuple[str, int]]]:
    """What resuming study ``study`` (``<name>-<hex>``) of ``wanted`` runs (editor name, seed) does with
    the runs of its scenario in the database (``rows``, oldest first): every unfinished run of a wanted
    editor and seed is resumed (of this study or, where ``study`` is the latest, of an earlier one), and
    a wanted run the study has not started yet is started. Finished runs are left as they are.
    Returns (the runs to resume, the (editor name, seed) to start)."""
    wanted_set = set(wanted)
    mine = [r for r in rows if study_id(r.run_id, name) == study]
    latest = bool(rows) and study_id(rows[-1].run_id, name) == study
    pool = rows if latest else mine
    resume = [r for r in pool if (r.label, r.seed) in wanted_set and r.status != "finished"]
    started = {(r.label, r.seed) for r in mine}
    return resume, [w for w in wanted if w not in started]
