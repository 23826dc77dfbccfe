"""Scenario files: what to edit, with which method, how to stream it and how to evaluate.

This module is the schema and the YAML parsing: :func:`load_scenario` checks a file on its own, with
pydantic; any error is a :class:`ScenarioError` naming the file and the field. Checks against the
world outside the file (models, data files, editors' hyperparameters and checkpoints) are in
:mod:`lme_sim.preflight`.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from .config import Strict, field_path, merged
from .stream import Duration, Timeline

# ||delta||_F / ||W||_F above this rejects a batch (runtime/delta_guard.py). Measured (max over a matrix, per
# batch): on the tiny world models a first batch reaches 23 (MEMIT, 10 edits) and 65 (MEMIT, 50 edits), later
# ones ~1; a diverging solve or optimizer gives orders of magnitude more. Real models edit with far smaller
# ratios: set a tighter limit in the scenario (editor.max_delta_norm) to catch milder blow-ups.
DEFAULT_MAX_DELTA_NORM = 1000.0
# an editor's name, a part of run ids (a grid's override sets too)
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"


class DataSpec(Strict):
    kind: Literal["world", "counterfact", "zsre"] = "world"
    path: str | None = None  # counterfact / zsre: a local JSON file or a datasets hub id
    # or a named public dataset (lme_sim.catalog; `lme-sim data get NAME` downloads it), e.g. counterfact
    source: str | None = None
    n_edits: int = Field(100, gt=0)
    seed: int = 0
    zsre_target: Literal["answers", "alt"] = "answers"


class EditorSpec(Strict):
    method: str = "alphaedit"  # a registered editor (lme_sim.editors.registry; checked by preflight)
    hparams: dict[str, Any] = {}
    # a batch whose delta of some matrix has ||delta|| > max_delta_norm * ||W|| (or NaN/Inf) is rejected
    max_delta_norm: float = Field(DEFAULT_MAX_DELTA_NORM, gt=0)
    # edits per batch for this editor: its protocol (e.g. MOSE's paper edits one request at a time);
    # None: stream.batch_size. The stream's events and evaluation points stay the scenario's, so every
    # editor of a list sees the same edits and is evaluated at the same edit counts.
    batch_size: int | None = Field(None, gt=0)
    # this editor's name in a list (run ids, --methods, resume); default: the method, and -b<batch_size>
    # where it sets one. Two editors of one method and batch size (e.g. with and without an hparam) need it.
    name: str | None = Field(None, pattern=NAME)

    def label(self) -> str:
        """The run id's tag in a list of editors: ``name``, else the method and its batch size."""
        if self.name is not None:
            return self.name
        return self.method if self.batch_size is None else f"{self.method}-b{self.batch_size}"


class GridAxes(Strict):
    """The axes of a grid of editors (:class:`GridSpec`): every method at every batch size with every
    named set of hparam overrides."""

    method: list[str] = Field(min_length=1)
    # protocols: edits per batch (each its own run, evaluated at the same edit counts); omitted: the
    # stream's batch size
    batch_size: list[Annotated[int, Field(gt=0)]] | None = Field(None, min_length=1)
    # named sets of hparam overrides, each merged over the grid's common ``hparams``; omitted: none
    overrides: dict[Annotated[str, Field(pattern=NAME)], dict[str, Any]] | None = Field(None, min_length=1)


class GridSpec(Strict):
    """``editor: {grid: {method: [...], batch_size: [...], overrides: {name: {...}}}, hparams: {...}}``:
    one editor per point of the grid (methods x batch sizes x override sets), named
    ``<method>[-b<batch_size>][-<override set>]`` (the parts whose axis is given), so that ``--methods``,
    run ids and ``--resume`` name each. ``hparams``: every point's (the sets are merged over them)."""

    grid: GridAxes
    hparams: dict[str, Any] = {}
    max_delta_norm: float = Field(DEFAULT_MAX_DELTA_NORM, gt=0)

    def points(self) -> list[tuple[str | None, EditorSpec]]:
        """Each point's editor, with the name of its override set (None: the grid has none)."""
        g = self.grid
        sizes: list[int | None] = list(g.batch_size) if g.batch_size else [None]
        sets: dict[str | None, dict] = dict(g.overrides) if g.overrides else {None: {}}
        return [
            (
                key,
                EditorSpec(
                    method=method,
                    hparams=merged(self.hparams, over),
                    max_delta_norm=self.max_delta_norm,
                    batch_size=bs,
                    name="-".join([method] + ([f"b{bs}"] if bs else []) + ([key] if key else [])),
                ),
            )
            for method in g.method
            for bs in sizes
            for key, over in sets.items()
        ]


class StreamSpec(Strict):
    batch_size: int = Field(10, gt=0)  # edits per editor batch
    # batching by time: a batch holds the edits that arrived within this simulated span of its first one,
    # or batch_size edits, whichever comes first (None: by count only)
    window: Duration | None = None
    # arrival pattern; default: fixed batches covering data.n_edits, evaluated every eval.every batches
    timeline: Timeline | None = None
    speedup: float | None = Field(None, gt=0)  # simulated seconds per wall second; None: as fast as possible
    start: str = "2024-01-01"  # simulated date (and time) of the first event, ISO 8601

    @field_validator("start", mode="before")
    @classmethod
    def _iso_start(cls, v):
        if isinstance(v, dt.date):  # YAML reads an unquoted 2024-01-01 as a date
            return v.isoformat()
        if isinstance(v, str):
            try:
                dt.datetime.fromisoformat(v)
            except ValueError:
                raise ValueError(
                    f"{v!r} is not an ISO date or time, e.g. 2024-01-01 or 2024-01-01T09:00"
                ) from None
        return v


class EditorResources(Strict):
    """What the editor actor reserves: its solves (AlphaEdit's projected systems, UltraEdit's ridge fits)
    run on a GPU where ``gpus`` > 0; ``cpus`` cores set its torch threads (0: one thread, none reserved)."""

    cpus: float = Field(0, ge=0)
    gpus: float = Field(0, ge=0, le=1)


class RuntimeSpec(Strict):
    shards: int = Field(1, gt=0)  # contiguous layer ranges, one Ray actor each
    # where the shards' ranges begin (shards - 1 blocks: [21] on 30 blocks is 0-20 | 21-29), to even out
    # work that runs mostly in later blocks (docs/performance.md, "Pipelined shards"); None: near-equal
    cuts: list[Annotated[int, Field(gt=0)]] | None = None
    evaluators: int = Field(1, gt=0)
    # GPUs per shard and per evaluator: true (one each), a share such as 0.3 (several on one GPU), or
    # false (CPU; shards ask for an emulated resource instead)
    gpus: float = Field(0, ge=0, le=1)
    # how the shards' placement group spreads over nodes (STRICT_SPREAD: one shard per node)
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # shards load their layers in it
    # chunks of independent requests go through the shards at once (shard 1 on chunk k+1 while shard 2
    # is on chunk k: lme_sim.runtime.shards); false: one chunk after the other (the reference path)
    pipeline: bool = True
    editor: EditorResources = EditorResources()
    # a checkpoint (accumulated deltas, editor state, stream position) after every N batches; None: every
    # batch on world:* models, every 10 on others. --resume replays the batches after the last one.
    checkpoint_every: int | None = Field(None, gt=0)
    # runs of a study (a list of editors, seeds) at once: "auto" (as many as the cluster's free CPUs and
    # GPUs hold, lme_sim.runtime.study.runs_that_fit) or a number (1: one after the other)
    concurrent_runs: Literal["auto"] | Annotated[int, Field(gt=0)] = "auto"


class EvaluatorSpec(Strict):
    """Which engine scores the probes: Hugging Face (any machine) or vLLM (GPU; a CPU build exists)."""

    backend: Literal["hf", "vllm"] = "hf"
    tensor_parallel_size: int = Field(1, gt=0)  # vllm: GPUs per evaluator
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)  # vllm
    dtype: str = "auto"  # vllm: auto | float32 | bfloat16 | float16
    max_model_len: int | None = Field(None, gt=0)  # vllm: longest prompt + generation


class GeneralAbilitySpec(Strict):
    """Multiple-choice probes of what the model knows beyond the edits (:mod:`lme_sim.general_ability`)."""

    n: int = Field(64, ge=0)  # items scored per evaluation (0: off)
    # JSON(L) of {question, choices, answer}; default: unedited world facts (world:*) or the built-in set
    path: str | None = None


class EvalSpec(Strict):
    every: int = Field(1, gt=0)  # evaluate after every N batches (and after the last)
    # an evaluation probes a uniform sample of at most this many of the edits so far (the last one: all)
    retention_sample: int = Field(500, gt=0)
    fluency_prompts: int = Field(16, ge=0)  # recent prompts whose greedy generations measure fluency
    # generative metrics (gen_efficacy, gen_generalization, gen_specificity) on the same sample
    generative: bool = True
    rows_per_pass: int = Field(64, gt=0)  # probes per forward pass
    max_pending: int = Field(4, gt=0)  # evaluations in flight at most; the editor waits for room
    general_ability: GeneralAbilitySpec = GeneralAbilitySpec()


class Scenario(Strict):
    name: str
    model: str = "world:default"
    data: DataSpec = DataSpec()
    # one editing method, or a list of them: each runs the same stream as its own run; a grid (or a list
    # with grids in it) stands for its points (GridSpec)
    editor: EditorSpec | GridSpec | list[EditorSpec | GridSpec] = EditorSpec()
    stream: StreamSpec = StreamSpec()
    eval: EvalSpec = EvalSpec()
    evaluator: EvaluatorSpec = EvaluatorSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    output_dir: str = "runs"
    db: str = "runs/lme.duckdb"
    # one run per seed (per method), each with data.seed set to it: the seed draws the stream's edits
    # and their order (world data: which facts; counterfact/zsre: n_edits cases of the whole file);
    # None: one run at data.seed (counterfact/zsre: the file's first n_edits, in order)
    seeds: list[int] | None = Field(None, min_length=1)

    @property
    def editors(self) -> list[EditorSpec]:
        """Every editor of the scenario, a grid's points in its place."""
        return [spec for _, spec in self.editor_fields()]

    def editor_fields(self) -> list[tuple[str, EditorSpec]]:
        """Each editor with the field it comes from (``editor``, ``editor.2``; a grid's points:
        ``editor.grid.overrides.<set>``, or ``editor.grid`` where it has no sets): how errors about
        one name it."""
        listed = isinstance(self.editor, list)
        out = []
        for i, entry in enumerate(self.editor if listed else [self.editor]):
            field = f"editor.{i}" if listed else "editor"
            if isinstance(entry, EditorSpec):
                out.append((field, entry))
                continue
            out += [
                (f"{field}.grid" + (f".overrides.{key}" if key else ""), spec) for key, spec in entry.points()
            ]
        return out

    def with_editor(self, spec: EditorSpec) -> Scenario:
        """This scenario with one editing method (how a list of methods is run, one run each). An editor
        with its own ``batch_size`` takes the scenario's events as they are (the fixed timeline is fixed
        here, from the scenario's batch size) in batches of its own size, and checkpoints at the same
        edit counts as the scenario's batch size would."""
        bs = spec.batch_size
        if bs is None or bs == self.stream.batch_size:
            return self.model_copy(update={"editor": spec})
        every = max(1, self.checkpoint_every() * self.stream.batch_size // bs)
        runtime = self.runtime.model_copy(update={"checkpoint_every": every})
        stream = self.stream.model_copy(update={"timeline": self.timeline(), "batch_size": bs})
        return self.model_copy(update={"editor": spec, "stream": stream, "runtime": runtime})

    def with_seed(self, seed: int) -> Scenario:
        """This scenario's run for one of its ``seeds`` (the seed goes to ``data.seed``)."""
        return self.model_copy(update={"data": self.data.model_copy(update={"seed": seed})})

    def checkpoint_every(self) -> int:
        every = self.runtime.checkpoint_every
        from .models import model_kind

        return every if every is not None else model_kind(self.model).checkpoint_every

    def timeline(self) -> Timeline:
        if self.stream.timeline is not None:
            return self.stream.timeline
        bs = self.stream.batch_size
        return Timeline(
            pattern="fixed",
            n_batches=-(-self.data.n_edits // bs),
            batch_size=bs,
            n_edits=self.data.n_edits,
            eval_every=self.eval.every * bs,
        )  # the last batch may be smaller


class ScenarioError(ValueError):
    """One line: the file, the field and what is wrong with it."""


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"{path}: scenario file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ScenarioError(f"{path}: not a text file (byte {e.start} is not UTF-8)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ScenarioError(f"{path}: not valid YAML: {where}{what}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: a scenario is a mapping of fields, got {type(raw).__name__}")
    try:
        scn = Scenario.model_validate(raw)
    except ValidationError as e:
        err = max(e.errors(), key=lambda x: len(x["loc"]))  # the most specific (a union tries each branch)
        field = field_path(p for p in err["loc"] if not _is_type_tag(p))
        raise ScenarioError(f"{path}: field '{field}': {err['msg']}") from None
    _check_data(path, scn.data)
    from .models import WorldKind, model_kind

    if scn.data.kind == "world" and not model_kind(scn.model).has_world:
        raise ScenarioError(
            f"{path}: field 'data.kind': 'world' data needs a {WorldKind.syntax} model, not {scn.model!r}"
        )
    if not scn.editors:
        raise ScenarioError(f"{path}: field 'editor': an empty list; name at least one method")
    labels = [e.label() for e in scn.editors]
    if twice := next((x for x in labels if labels.count(x) > 1), None):
        raise ScenarioError(
            f"{path}: field 'editor': two editors are named {twice!r}; give one a `name` of its own"
        )
    if scn.seeds is not None and len(set(scn.seeds)) < len(scn.seeds):
        raise ScenarioError(f"{path}: field 'seeds': {scn.seeds} repeats a seed (one run per seed)")
    return scn


def _check_data(path: Path, data: DataSpec) -> None:
    """Real data names a local path or a catalog dataset of its kind (one of the two)."""
    from .catalog import DATASETS

    if data.kind == "world":
        if data.source is not None:
            raise ScenarioError(f"{path}: field 'data.source': world data comes from the model's world")
        return
    if (data.path is None) == (data.source is None):
        raise ScenarioError(
            f"{path}: field 'data.path': data.kind {data.kind!r} needs a local path or hub id (data.path) "
            f"or a named dataset (data.source: {', '.join(DATASETS)}), one of the two"
        )
    if data.source is not None:
        ds = DATASETS.get(data.source)
        if ds is None or ds.kind != data.kind:
            mine = [d.name for d in DATASETS.values() if d.kind == data.kind]
            raise ScenarioError(
                f"{path}: field 'data.source': {data.source!r} is not a {data.kind} dataset "
                f"(known: {', '.join(mine)})"
            )


def _is_type_tag(part) -> bool:
    """pydantic names the branch of a union in an error's location ('EditorSpec', 'GridSpec', 'list[...]')."""
    return isinstance(part, str) and (
        part in {"EditorSpec", "GridSpec", "Timeline"} or part.startswith("list[")
    )
