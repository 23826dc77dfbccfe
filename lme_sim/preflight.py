"""A scenario checked against the world outside its file, before any work starts: the model, the
world and its facts, data files and hub ids, the probe set, the editors (registered methods, their
hyperparameters, layers and checkpoints) and the vLLM install.

:func:`load_checked` is what the CLI's ``validate`` and ``run`` read a scenario file with; every
problem is one :class:`~lme_sim.scenario.ScenarioError` naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path

from .scenario import Scenario, ScenarioError, load_scenario
from .sizing import split_layers


def load_checked(path: str | Path, methods: list[str] | None = None) -> Scenario:
    """:func:`~lme_sim.scenario.load_scenario` plus :func:`check`."""
    scn = load_scenario(path)
    check(scn, path, methods)
    return scn


def check(scn: Scenario, path: str | Path, methods: list[str] | None = None) -> None:
    """Everything outside the file; of the editors, only those of ``methods`` (default: all)."""
    path = Path(path)
    from .models import model_kind

    kind = model_kind(scn.model)
    if (problem := kind.problem(scn.model)) is not None:
        raise ScenarioError(f"{path}: field 'model': {problem}")
    if kind.has_world:
        _check_world_facts(path, scn, kind.world(scn.model))
    n_layers = kind.n_layers(scn.model)
    if scn.runtime.shards > n_layers:
        raise ScenarioError(
            f"{path}: field 'runtime.shards': {scn.runtime.shards} shards for a model with "
            f"{n_layers} layers (at most one shard per layer)"
        )
    if scn.runtime.cuts is not None:
        try:  # the shards' ranges are cut in one place: the rule and its message are split_layers'
            split_layers(n_layers, scn.runtime.shards, scn.runtime.cuts)
        except ValueError as e:
            raise ScenarioError(f"{path}: field 'runtime.cuts': {e}") from None
    if scn.data.path is not None and scn.data.kind != "world":
        _check_data_path(path, scn.data.path)
    if scn.eval.general_ability.path:
        from .general_ability import ProbeSetError, load_items

        try:
            load_items(scn.eval.general_ability.path)
        except ProbeSetError as e:
            raise ScenarioError(f"{path}: field 'eval.general_ability.path': {e}") from None
    if scn.evaluator.backend == "vllm":
        from .vllm_scorer import vllm_available

        if not vllm_available():
            raise ScenarioError(
                f"{path}: field 'evaluator.backend': vllm is not installed here; install it on "
                "the GPU machines (docs/evaluators.md), or set backend: hf"
            )
    for i, spec in enumerate(scn.editors):
        if methods is None or spec.method in methods:
            _check_editor(path, scn, i, n_layers)


def _check_world_facts(path: Path, scn: Scenario, world) -> None:
    """World data: no more edits than the world has facts (a history timeline replays its changes)."""
    if scn.data.kind != "world" or (
        scn.stream.timeline is not None and scn.stream.timeline.pattern == "history"
    ):
        return
    n_facts = len(world.facts)
    if scn.data.n_edits > n_facts:
        raise ScenarioError(
            f"{path}: field 'data.n_edits': {scn.data.n_edits} edits, but {scn.model!r} has "
            f"{n_facts} facts (one edit per fact)"
        )


def _check_data_path(path: Path, data_path: str) -> None:
    """A local file or folder, or else a ``datasets`` hub id (``name`` or ``owner/name``); a path that
    can only be meant as a local file must exist."""
    from .data import looks_local

    if not Path(data_path).expanduser().exists() and looks_local(data_path):
        raise ScenarioError(f"{path}: field 'data.path': file {data_path!r} not found")


def _check_editor(path: Path, scn: Scenario, i: int, n_layers: int) -> None:
    from .editors.hparams import HParamsError, load_hparams
    from .editors.registry import editor_class, known_methods, unknown_method

    field, spec = scn.editor_fields()[i]
    entry, grid, over = field.partition(".grid")  # a grid's point: its method and hparams are the grid's
    if spec.method not in known_methods():
        where = f"{entry}.grid.method" if grid else f"{field}.method"
        raise ScenarioError(f"{path}: field '{where}': unknown method {unknown_method(spec.method)}")
    where = f"{entry}.grid{over}" if over else f"{entry}.hparams"
    try:
        hp = load_hparams(spec.method, scn.model, spec.hparams, where=where)
        editor_class(spec.method).check_hparams(scn.model, hp, where)
    except HParamsError as e:  # "<field>: <what is wrong>"
        field, _, what = str(e).partition(": ")
        raise ScenarioError(f"{path}: field '{field}': {what}") from None
    if missing := [l for l in hp.layers if not 0 <= l < n_layers]:
        raise ScenarioError(
            f"{path}: field '{where}.layers': no layer {missing[0]} in {scn.model!r} "
            f"(layers 0..{n_layers - 1})"
        )
    stats = getattr(hp, "stats", None)
    if stats is not None and stats.kind == "file" and not Path(stats.path or "").expanduser().is_file():
        raise ScenarioError(
            f"{path}: field '{where}.stats.path': file {stats.path!r} not found (make a corpus of "
            "CounterFact's true facts with: lme-sim corpus --from COUNTERFACT_JSON --out FILE, or name "
            "a dataset: stats: {kind: cases, source: counterfact-train})"
        )
    anchor = getattr(hp, "norm_anchor", None)
    if anchor is not None:
        _check_norm_anchor(path, scn, anchor, f"{where}.norm_anchor")
    if stats is not None and stats.kind == "cases":
        from .catalog import DATASETS

        if stats.source not in DATASETS or DATASETS[stats.source].kind != "counterfact":
            known = ", ".join(d.name for d in DATASETS.values() if d.kind == "counterfact")
            raise ScenarioError(
                f"{path}: field '{where}.stats.source': {stats.source!r} is not a CounterFact dataset "
                f"(known: {known})"
            )


def _check_norm_anchor(path: Path, scn: Scenario, anchor, where: str) -> None:
    """NAS's reference requests: a file that is there, a named dataset, or (world models) the world."""
    from .catalog import DATASETS

    if anchor.path is not None and anchor.source is not None:
        raise ScenarioError(f"{path}: field '{where}.source': give path or source, not both")
    if anchor.path is not None and not Path(anchor.path).expanduser().is_file():
        raise ScenarioError(f"{path}: field '{where}.path': file {anchor.path!r} not found")
    if anchor.source is not None and anchor.source not in DATASETS:
        raise ScenarioError(
            f"{path}: field '{where}.source': {anchor.source!r} is not a named dataset "
            f"(known: {', '.join(DATASETS)})"
        )
    from .models import model_kind

    if anchor.path is None and anchor.source is None and not model_kind(scn.model).has_world:
        raise ScenarioError(
            f"{path}: field '{where}.path': needed on {scn.model!r} (the requests its reference norm is "
            "taken over), e.g. norm_anchor: {source: counterfact-train}"
        )


def named_datasets(scn: Scenario, methods: list[str] | None = None) -> list[str]:
    """The catalog datasets the scenario reads (its data, its editors' key-statistics corpora, NAS
    references and learned editors' training data), in order, each once; of the editors, only those
    of ``methods`` (default: all)."""
    from .editors.hparams import load_hparams

    names = [scn.data.source] if scn.data.source else []
    for spec in scn.editors:
        if methods is None or spec.method in methods:
            hp = load_hparams(spec.method, scn.model, spec.hparams)
            stats = getattr(hp, "stats", None)
            if stats is not None and stats.kind == "cases":
                names.append(stats.source)
            anchor = getattr(hp, "norm_anchor", None)
            if anchor is not None and anchor.source is not None:
                names.append(anchor.source)
            if getattr(hp, "train_source", None) is not None and hp.checkpoint is None:  # trains on it
                names.append(hp.train_source)
    return list(dict.fromkeys(names))
