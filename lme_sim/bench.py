"""``lme-sim bench``: how fast lme-sim edits and evaluates, measured on the embedded world models or
on a real model (``--model smollm2-135m --data COUNTERFACT_JSON``: the :data:`SMOLLM2` preset).

Sections, each a list of result rows (written to a JSON file and to the ``bench_results`` table of a
DuckDB file, every row with the machine and the versions it ran on):

* ``edits``: edits/s per method and batch size, split into the editors' phases (keys, targets,
  solve, apply; see :data:`lme_sim.editors.base.PHASES`) plus ``sync``, the deltas applied to an
  evaluator's replica; editor set-up (learned editors: training their networks) is timed apart.
* ``probes``: probes/s per evaluator backend (HF; vLLM where it is installed) and the time an
  evaluator takes to follow one batch's deltas.
* ``history``: one long AlphaEdit stream with every batch timed: the cost per batch stays flat
  because its state is a fixed-size key covariance, not a list of earlier keys (``state_mb``).
* ``shards``: the same small scenario through the real Ray runtime (shard actors, editor,
  evaluator, logger) on 1, 2, 4 shards with ``shards_method``; those runs land in the same DuckDB file.
* ``runtime`` (not in the presets' default sections; benchmarks/scale_1b.py runs it on a 1.24B model):
  one batch per method of ``runtime_batches`` through the runtime's actors as ``lme-sim run`` starts
  them, per weight dtype of ``dtypes``: the editor's phases, the bytes of the deltas shipped to the
  driver and to the evaluator, each actor's resident high-water mark while it started and during the
  batch, and beside each the figure :func:`lme_sim.sizing.memory_plan` computes.

Edit cases and probes come from the world model's facts, or, for a real model, from a CounterFact file
(``data``; :func:`data_cases`, :func:`case_probe_set`). The history section runs on world models only.

Work in this process runs on ``threads`` torch threads (default 1, what the runtime's Ray actors
get: Ray sets OMP_NUM_THREADS=1 for them), so in-process and Ray figures compare. The world models'
matrices are small, and on a busy machine two torch threads that wait for each other were many
times slower than one (README, Performance).

Peak memory is this process's resident high-water mark during the timed work (and CUDA's max
allocated on a GPU); Ray actors of the ``shards`` section are other processes and not in it.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import gc
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cases import EditCase
from .sysinfo import Measure, machine_info, versions

SECTIONS = ("edits", "probes", "history", "shards", "runtime")
DEFAULT_SECTIONS = SECTIONS[:4]  # the presets' (runtime: benchmarks/scale_1b.py, or --sections runtime)
BACKENDS = ("hf", "vllm")
HISTORY_METHOD = "alphaedit"
SHARDS_METHOD = "alphaedit"  # the default of BenchConfig.shards_method
# --quick trains the learned editors' networks on this budget (the shipped one takes minutes): the same
# networks, so the same edit speed, but edit quality is not representative.
QUICK_TRAINING = {"rollouts": 2, "rollout_batches": 2}


class BenchError(ValueError):
    """A bad benchmark setting; the message names the option."""


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "full"
    model: str = "world:default"
    methods: tuple[str, ...] = ()  # () : every registered editor
    batch_sizes: tuple[int, ...] = (1, 10, 100)
    batches: int = 3  # timed batches per method and batch size
    warmup: int = 1  # untimed batches before them
    learned_hparams: dict = field(default_factory=dict)  # overrides for rledit / hiedit
    probes: int = 5000
    probe_batch_size: int = 64
    backends: tuple[str, ...] = BACKENDS
    history_batch_size: int = 10
    history_marks: tuple[int, ...] = (1, 20, 100)  # batches reported; the stream runs to the last one
    shard_counts: tuple[int, ...] = (1, 2, 4)
    shard_edits: int = 100
    shard_batch_size: int = 10
    # the editor of the shard runs; the probes' sync deltas cover its layers
    shards_method: str = SHARDS_METHOD
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    # runtime section: (method, edits in its one batch); hparams overrides per method; weight dtypes
    runtime_batches: tuple[tuple[str, int], ...] = (("ultraedit", 100), ("alphaedit", 10))
    runtime_hparams: dict = field(default_factory=dict)
    dtypes: tuple[str, ...] = ("float32",)
    runtime_eval_cases: int = 10  # the batch's cases the evaluator then scores (teacher-forced only)
    data: str | None = None  # a CounterFact file (real models): where the cases and probes come from
    device: str = "cpu"
    threads: int = 1  # torch threads of this process


FULL = BenchConfig()
QUICK = dataclasses.replace(
    FULL,
    preset="quick",
    model="world:small",
    batch_sizes=(1, 10),
    batches=1,
    warmup=0,
    learned_hparams=QUICK_TRAINING,
    probes=1000,
    history_batch_size=5,
    history_marks=(1, 10, 30),
    shard_edits=30,
)
# A real model (--model smollm2-135m): UltraEdit at batches of 100 on CounterFact cases (--data), probes
# from their prompts, paraphrases and neighborhood prompts, and the same editor on 2 shard actors.
SMOLLM2 = dataclasses.replace(
    FULL,
    preset="smollm2",
    model="smollm2-135m",
    methods=("ultraedit",),
    batch_sizes=(100,),
    batches=3,
    warmup=1,
    probes=2000,
    sections=("edits", "probes", "shards"),
    shard_counts=(2,),
    shard_edits=400,
    shard_batch_size=100,
    shards_method="ultraedit",
)


def bench_config(
    *,
    quick: bool = False,
    methods: str | None = None,
    batch_sizes: str | None = None,
    sections: str | None = None,
    device: str = "auto",
    threads: int = 1,
    model: str | None = None,
    data: str | None = None,
) -> BenchConfig:
    """The preset (quick or full on a world model, :data:`SMOLLM2` on a real one) with the command
    line's choices on top; a bad one is a BenchError. ``data`` (a CounterFact file) is read here, so a
    missing or unreadable one fails before any work."""
    cfg = QUICK if quick else FULL
    if model is not None:
        _check_model(model)
        if not is_world(model):
            if quick:
                raise BenchError(f"--quick: the small world preset; not with a real model ({model!r})")
            cfg = SMOLLM2
        cfg = dataclasses.replace(cfg, model=model)
    changes: dict = {"device": _device(device), "threads": threads, "data": data}
    if methods:
        from .editors.registry import known_methods

        changes["methods"] = _choices("--methods", methods, tuple(known_methods()))
    if sections:
        changes["sections"] = _choices("--sections", sections, SECTIONS)
    if batch_sizes:
        try:
            sizes = tuple(int(b) for b in batch_sizes.split(","))
        except ValueError:
            raise BenchError(
                f"--batch-sizes: comma-separated whole numbers, e.g. 1,10; got {batch_sizes!r}"
            ) from None
        changes["batch_sizes"] = sizes
    cfg = dataclasses.replace(cfg, **changes)
    check_config(cfg)
    if cfg.data is not None:  # a file that cannot be read fails here, before any work
        found = len(_read_data(cfg.data, records_needed(cfg)))
        if "shards" in cfg.sections and found < cfg.shard_edits:
            raise BenchError(
                f"--data: {found} CounterFact records in {cfg.data!r}; the shards section edits "
                f"{cfg.shard_edits} distinct ones"
            )
    return cfg


def is_world(model: str) -> bool:
    """A model with an embedded world (its own edit cases, the history section)."""
    from .models import model_kind

    return model_kind(model).has_world


def _check_model(model: str) -> None:
    from .models import model_problem

    if (problem := model_problem(model)) is not None:
        raise BenchError(f"--model: {problem}")


def check_config(cfg: BenchConfig) -> None:
    from .models import model_n_layers

    if is_world(cfg.model) and cfg.data is not None:
        raise BenchError(
            f"--data: a world model edits its own facts; CounterFact cases need a real model "
            f"(e.g. --model smollm2-135m), not {cfg.model!r}"
        )
    if not is_world(cfg.model) and cfg.data is None:
        raise BenchError(
            f"--data: {cfg.model} edits CounterFact cases: name a CounterFact JSON file or a "
            "named dataset, e.g. --data counterfact-edit"
        )
    if not is_world(cfg.model) and "history" in cfg.sections:
        raise BenchError(
            "--sections: history runs on world models only (one long AlphaEdit stream); "
            f"choose from edits,probes,shards for {cfg.model}"
        )
    if cfg.threads < 1:
        raise BenchError(f"--threads: at least 1, got {cfg.threads}")
    if any(b <= 0 for b in cfg.batch_sizes):
        raise BenchError(f"--batch-sizes: edits per batch must be positive, got {list(cfg.batch_sizes)}")
    if list(cfg.history_marks) != sorted(set(cfg.history_marks)) or cfg.history_marks[0] < 1:
        raise BenchError(f"history_marks: increasing batch numbers from 1, got {list(cfg.history_marks)}")
    if cfg.shard_edits < 2 * cfg.shard_batch_size:
        raise BenchError(
            f"shard_edits: at least two batches of {cfg.shard_batch_size} (the first one waits for the "
            f"actors to start and is not timed), got {cfg.shard_edits}"
        )
    n_layers = model_n_layers(cfg.model)
    if n_layers is None:
        raise BenchError(f"--model: cannot find the layer count of {cfg.model!r}")
    if {"shards", "runtime"} & set(cfg.sections) and max(cfg.shard_counts) > n_layers:
        raise BenchError(
            f"shard_counts: {max(cfg.shard_counts)} shards for {cfg.model} with {n_layers} layers "
            "(at most one shard per layer)"
        )

    if bad := [d for d in cfg.dtypes if d not in DTYPES]:
        raise BenchError(f"dtypes: {bad[0]!r} is not one of {', '.join(DTYPES)}")


DTYPES = ("float32", "bfloat16", "float16")  # the runtime's (runtime.dtype)


def _choices(option: str, value: str, known: tuple[str, ...]) -> tuple[str, ...]:
    picked = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in picked if v not in known]
    if bad or not picked:
        what = f"unknown {', '.join(map(repr, bad))}" if bad else "name at least one"
        raise BenchError(f"{option}: {what} (choose from {','.join(known)})")
    return picked


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError(
            "--device: cuda asked for, but torch sees no CUDA device here (torch "
            f"{torch.__version__}); use --device cpu"
        )
    if device not in ("cpu", "cuda"):
        raise BenchError(f"--device: auto, cpu or cuda, not {device!r}")
    return device


# ---- running ------------------------------------------------------------------------------------


def run_bench(cfg: BenchConfig, out: str | Path, db: str | Path, console=None) -> dict:
    """Run the configured sections; write the result as JSON to ``out`` and as rows of the
    ``bench_results`` table into ``db``; return it."""
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    check_config(cfg)
    console = console or Console()
    hf_logging.disable_progress_bar()  # a model load per measured configuration; the bench shows its own
    bench_id = f"bench-{uuid.uuid4().hex[:8]}"
    created = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    machine, vers = machine_info(), versions()
    try:
        rows, total = _run_sections(cfg, db, console)
    finally:
        torch.set_num_threads(threads_before)
    machine["load_avg_1m_end"] = machine_info()["load_avg_1m"]
    result = {
        "bench_id": bench_id,
        "preset": cfg.preset,
        "created_at": created.isoformat(),
        "wall_seconds": total.seconds,
        "cpu_seconds": total.cpu_seconds,
        "config": dataclasses.asdict(cfg),
        "machine": machine,
        "versions": vers,
        "results": rows,
    }
    write_result(result, out, db)
    return result


def _run_sections(cfg: BenchConfig, db: str | Path, console) -> tuple[list[dict], Measure]:
    from rich.progress import Progress

    from .models import load_model

    with Measure() as total:
        # the world model trains (and is cached) on first use; the runtime section loads none here
        needs_model = set(cfg.sections) - {"runtime"}
        lm = load_model(cfg.model, device=cfg.device) if needs_model else None
        from .editors.registry import known_methods

        units = {
            "edits": len(cfg.methods or known_methods()) * len(cfg.batch_sizes),
            "probes": len(cfg.backends),
            "history": cfg.history_marks[-1],
            "shards": len(cfg.shard_counts),
            "runtime": len(cfg.dtypes) * len(cfg.shard_counts) * len(cfg.runtime_batches),
        }
        rows: list[dict] = []
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("bench", total=sum(units[s] for s in cfg.sections))

            def step(what: str, done: int = 0) -> None:
                bar.update(task, description=what, advance=done)

            for section in cfg.sections:
                found = SECTION_RUNNERS[section](cfg, lm, str(db), step)
                rows += [
                    {"section": section, "model": cfg.model, "device": cfg.device, "status": "ok", **r}
                    for r in found
                ]
    return rows, total


def records_needed(cfg: BenchConfig) -> int:
    """CounterFact records the configured sections use (at most; the probes take fewer where a case
    gives several)."""
    need = {
        "edits": (cfg.warmup + cfg.batches) * max(cfg.batch_sizes),
        "probes": cfg.probes,
        "shards": cfg.shard_edits,
        "runtime": max(bs for _, bs in cfg.runtime_batches),
    }
    return max([1] + [n for s, n in need.items() if s in cfg.sections])


def data_cases(path: str, n: int) -> list[EditCase]:
    """The first ``n`` cases of the CounterFact file at ``path`` (flat EasyEdit or nested ROME format,
    :func:`lme_sim.data.load_counterfact`); a shorter file is repeated (each pass edits its cases
    again). A file that cannot be read, or holds no case, is a BenchError naming ``--data``."""
    cases = _read_data(path, n)
    return (cases * -(-n // len(cases)))[:n]


def _read_data(path: str, n: int) -> list[EditCase]:
    """At most ``n`` cases of the file, at least one; else a BenchError."""
    from .data import DataError, load_counterfact

    try:
        cases = load_counterfact(path, limit=n)
    except DataError as e:
        raise BenchError(f"--data: {e}") from None
    if not cases:
        raise BenchError(f"--data: no CounterFact records in {path!r}")
    return cases


def case_probe_set(cases: list[EditCase], n: int) -> tuple[list[str], list[str]]:
    """``n`` (prompt, target) probes of edit cases, as an evaluation scores them before the edits:
    each case's prompt and paraphrases with its true object (the new one where a case has none), then
    its neighborhood prompts with their answers; repeated as needed."""
    pairs = []
    for c in cases:
        target = c.target_true if c.target_true is not None else c.target_new
        pairs += [(p, target) for p in (c.prompt, *c.paraphrases)] + list(c.neighborhood)
    pairs = (pairs * (n // len(pairs) + 1))[:n]
    return [p for p, _ in pairs], [t for _, t in pairs]


def bench_cases(cfg: BenchConfig, lm, n: int) -> list[EditCase]:
    """``n`` edit cases: the world's facts, or the CounterFact file's cases."""
    return stream_cases(lm.world, n) if cfg.data is None else data_cases(cfg.data, n)


def bench_probe_set(cfg: BenchConfig, lm, n: int) -> tuple[list[str], list[str]]:
    """``n`` probes: the world's facts in every phrasing, or the CounterFact cases' prompts."""
    if cfg.data is None:
        return probe_set(lm.world, n)
    return case_probe_set(data_cases(cfg.data, records_needed(cfg)), n)


def stream_cases(world, n: int) -> list[EditCase]:
    """``n`` edit cases of a world; past its number of facts the facts are edited again (each pass
    toward other random objects), so a stream can be as long as a benchmark needs."""
    cases: list[EditCase] = []
    seed = 0
    while len(cases) < n:
        cases += world.edit_cases(min(n - len(cases), len(world.facts)), seed=seed)
        seed += 1
    return cases


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measured(m: Measure, n: int) -> dict:
    """A row's timing fields for ``n`` edits or probes done inside ``m``."""
    return {
        "n": n,
        "seconds": m.seconds,
        "rate": n / m.seconds,
        "cpu_seconds": m.cpu_seconds,
        "peak_rss_mb": m.peak_rss_mb,
        "cuda_peak_mb": m.cuda_peak_mb,
    }


def _state_mb(editor) -> float:
    """Size of the editor's checkpointed state (AlphaEdit: its key covariance per layer)."""

    def size(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(size(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(size(v) for v in x)
        return 0

    return size(editor.state_dict()) / 2**20


def bench_edits(cfg: BenchConfig, lm, db: str, step) -> list[dict]:
    """edits/s per method and batch size; phases summed over the timed batches."""
    from .backbone import LocalBackbone
    from .editors import make_editor
    from .editors.base import PhaseTimer
    from .editors.registry import editor_class, known_methods

    rows = []
    for method in cfg.methods or known_methods():
        learned = editor_class(method).trained
        overrides = dict(cfg.learned_hparams) if learned else {}
        for bs in cfg.batch_sizes:
            step(f"edits: {method}, batches of {bs}" + (" (training its networks)" if learned else ""))
            model = copy.deepcopy(lm.model)
            replica = LocalBackbone(copy.deepcopy(lm.model))  # an evaluator's copy, following by deltas
            cases = bench_cases(cfg, lm, (cfg.warmup + cfg.batches) * bs)
            batches = [cases[i : i + bs] for i in range(0, len(cases), bs)]
            with Measure(cfg.device) as setup:
                editor = make_editor(
                    method, dataclasses.replace(lm, model=model), overrides=overrides, progress=False
                )
            phases = PhaseTimer()
            for batch in batches[: cfg.warmup]:
                _edit_and_sync(editor, replica, batch, PhaseTimer(), cfg.device)
            with Measure(cfg.device) as m:
                for batch in batches[cfg.warmup :]:
                    _edit_and_sync(editor, replica, batch, phases, cfg.device)
            note = "set-up: editor construction"
            if learned:
                note += " and its networks (trained on first use, then cached)"
                if overrides:
                    note += f"; trained on a quick budget {overrides}: speed as shipped, quality not"
            rows.append(
                {
                    "method": method,
                    "batch_size": bs,
                    **_measured(m, cfg.batches * bs),
                    "unit": "edits/s",
                    "phases": dict(phases),
                    "setup_seconds": setup.seconds,
                    "state_mb": _state_mb(editor),
                    "note": note,
                }
            )
            del model, replica, editor
            step("", 1)
    return rows


def _edit_and_sync(editor, replica, batch: list[EditCase], phases, device: str) -> None:
    result = editor.edit(batch)
    for phase, seconds in result.timings.items():
        phases[phase] = phases.get(phase, 0.0) + seconds
    with phases("sync"):
        replica.apply_deltas(result.deltas)
        _synchronize(device)


def probe_set(world, n: int) -> tuple[list[str], list[str]]:
    """``n`` (prompt, target) probes: every fact in every phrasing, repeated as needed."""
    pairs = [(p, c.target_true) for c in world.known_cases() for p in (c.prompt, *c.paraphrases)]
    pairs = (pairs * (n // len(pairs) + 1))[:n]
    return [p for p, _ in pairs], [t for _, t in pairs]


def bench_probes(cfg: BenchConfig, lm, db: str, step) -> list[dict]:
    """probes/s of each evaluator backend, and the time it takes to follow one batch's deltas."""
    from .backbone import LocalBackbone
    from .editors.hparams import load_hparams
    from .runtime.services import Evaluator
    from .scenario import EvaluatorSpec
    from .scoring import score_targets
    from .vllm_scorer import vllm_available

    prompts, targets = bench_probe_set(cfg, lm, cfg.probes)
    local = LocalBackbone(lm.model)
    names = [local.edit_param_name(l) for l in load_hparams(cfg.shards_method, cfg.model).layers]
    params = dict(lm.model.named_parameters())
    deltas = {n: 1e-6 * torch.randn(params[n].shape) for n in names}  # a batch's deltas, on the CPU as sent
    rows = []
    for backend in cfg.backends:
        step(f"probes: {backend} backend")
        row = {"backend": backend, "n": len(prompts), "unit": "probes/s"}
        if backend == "vllm" and not vllm_available():
            rows.append(
                {
                    **row,
                    "status": "unavailable",
                    "note": "vllm is not installed here (README: vLLM evaluators)",
                }
            )
            step("", 1)
            continue
        try:
            with Measure(cfg.device) as setup:
                ev = Evaluator(
                    cfg.model,
                    EvaluatorSpec(backend=backend),
                    rows_per_pass=cfg.probe_batch_size,
                    device=cfg.device,
                )
        except Exception as e:  # vLLM installed but unable to serve this model here: report it, go on
            rows.append(
                {**row, "status": "failed", "note": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            )
            step("", 1)
            continue
        score_targets(
            ev.backbone,
            ev.tok,
            prompts[: cfg.probe_batch_size],
            targets[: cfg.probe_batch_size],
            cfg.probe_batch_size,
        )  # warm-up
        with Measure(cfg.device) as m:
            score_targets(ev.backbone, ev.tok, prompts, targets, cfg.probe_batch_size)
        with Measure(cfg.device) as sync:
            ev.follow(deltas, 1)
        passes = (
            "all probes in one generate call"
            if backend == "vllm"
            else f"{cfg.probe_batch_size} probes per pass"
        )
        rows.append(
            {
                **row,
                **_measured(m, len(prompts)),
                "batch_size": cfg.probe_batch_size,
                "phases": {"sync": sync.seconds},
                "setup_seconds": setup.seconds,
                "note": f"{passes}; sync: deltas on {len(deltas)} matrices",
            }
        )
        del ev
        gc.collect()  # a vLLM engine holds its memory (GPU: gpu_memory_utilization) until collected
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
        step("", 1)
    return rows


def bench_history(cfg: BenchConfig, lm, db: str, step) -> list[dict]:
    """One AlphaEdit stream of ``history_marks[-1]`` batches, every batch timed (one row each)."""
    from .editors import make_editor

    bs, n_batches = cfg.history_batch_size, cfg.history_marks[-1]
    editor = make_editor(
        HISTORY_METHOD, dataclasses.replace(lm, model=copy.deepcopy(lm.model)), progress=False
    )
    cases = stream_cases(lm.world, n_batches * bs)
    rows = []
    for i in range(n_batches):
        step(f"history: {HISTORY_METHOD} batch {i + 1}/{n_batches}")
        with Measure(cfg.device) as m:
            result = editor.edit(cases[i * bs : (i + 1) * bs])
        rows.append(
            {
                "method": HISTORY_METHOD,
                "batch_size": bs,
                "step": i + 1,
                **_measured(m, bs),
                "unit": "edits/s",
                "phases": result.timings,
                "state_mb": _state_mb(editor),
            }
        )
        step("", 1)
    return rows


def bench_shards(cfg: BenchConfig, lm, db: str, step) -> list[dict]:
    """The same scenario through the Ray runtime on each shard count; its runs go into ``db``."""
    import ray
    from rich.console import Console

    from .runtime.coordinator import run_distributed
    from .runtime.ray_utils import init_ray
    from .scenario import DataSpec, EditorSpec, EvalSpec, RuntimeSpec, Scenario, StreamSpec
    from .storage.logger import read_only_query

    started = not ray.is_initialized()
    step("shards: starting Ray")
    init_ray()
    rows = []
    try:
        for n in cfg.shard_counts:
            step(f"shards: {cfg.shards_method} on {n} shard actor(s)")
            gpus = (
                cfg.device == "cuda" and torch.cuda.device_count() >= n + 1
            )  # a GPU per shard and evaluator
            scn = Scenario(
                name=f"bench-shards{n}",
                model=cfg.model,
                data=(
                    DataSpec(n_edits=cfg.shard_edits)
                    if cfg.data is None
                    else DataSpec(kind="counterfact", path=cfg.data, n_edits=cfg.shard_edits)
                ),
                editor=EditorSpec(method=cfg.shards_method),
                stream=StreamSpec(batch_size=cfg.shard_batch_size),
                eval=EvalSpec(every=cfg.shard_edits, fluency_prompts=0),  # one evaluation, at the end
                runtime=RuntimeSpec(shards=n, gpus=int(gpus)),
                db=db,
            )
            with Measure() as m:
                run_id = run_distributed(scn, "lme-sim bench", db=db, console=Console(quiet=True))
            _, batches = read_only_query(
                db,
                "select n_edits, seconds, timings from batches where run_id = ? order by batch_id",
                [run_id],
            )
            timed = batches[1:]  # the first batch waits for the actors to start (models, key statistics)
            edits, editing = sum(b[0] for b in timed), sum(b[1] for b in timed)
            phases: dict[str, float] = {}
            for _, _, timings in timed:
                for k, v in _json(timings).items():
                    phases[k] = phases.get(k, 0.0) + v
            note = (
                "batches 2.. timed (the first waits for the actors to start); set-up: the rest of the "
                "run's wall time (actors, first batch, one evaluation, logging)"
            )
            if cfg.device == "cuda" and not gpus:
                note += f"; shards on the CPU ({n + 1} GPUs needed, {torch.cuda.device_count()} here)"
            rows.append(
                {
                    "method": cfg.shards_method,
                    "batch_size": cfg.shard_batch_size,
                    "shards": n,
                    "n": edits,
                    "device": "cuda" if gpus else "cpu",
                    "seconds": editing,
                    "rate": edits / editing,
                    "unit": "edits/s",
                    "phases": phases,
                    "setup_seconds": m.seconds - editing,
                    "peak_rss_mb": m.peak_rss_mb,
                    "run_id": run_id,
                    "note": note,
                }
            )
            step("", 1)
    finally:
        if started:
            ray.shutdown()
    return rows


def bench_runtime(cfg: BenchConfig, lm, db: str, step) -> list[dict]:
    """One batch per method of ``runtime_batches`` through the runtime's actors, for each weight dtype
    and shard count; what each actor held is measured in the actor (its process), beside the plan."""
    import ray

    from .runtime.ray_utils import init_ray

    started = not ray.is_initialized()
    step("runtime: starting Ray")
    init_ray()
    cases = runtime_cases(cfg)
    rows = []
    try:
        for dtype in cfg.dtypes:
            for n in cfg.shard_counts:
                for method, bs in cfg.runtime_batches:
                    step(f"runtime: {method}, a batch of {bs}, {dtype} weights on {n} shard actor(s)")
                    rows.append(runtime_batch(cfg, db, cases[:bs], method=method, dtype=dtype, shards=n))
                    step("", 1)
    finally:
        if started:
            ray.shutdown()
    return rows


def runtime_cases(cfg: BenchConfig) -> list[EditCase]:
    """The runtime section's cases: the CounterFact file's, or the world's facts (no model loaded here)."""
    if cfg.data is not None:
        return data_cases(cfg.data, records_needed(cfg))
    from .models import load_tokenizer

    return stream_cases(load_tokenizer(cfg.model)[1], max(bs for _, bs in cfg.runtime_batches))


def runtime_batch(cfg: BenchConfig, db: str, cases: list[EditCase], *, method: str, dtype: str, shards: int):
    """Start the actors of a one-method run (:class:`lme_sim.runtime.coordinator.Actors`: shards,
    editor, one evaluator, logger), wait for the editor (key statistics on first use), then do what
    ``lme-sim run`` does with a batch: the editor edits it through the shards, the evaluator follows
    the deltas and scores ``runtime_eval_cases`` of its cases. Each actor's high-water mark is read
    (and reset) before the batch and read after it."""
    import ray
    from rich.console import Console

    from .runtime.coordinator import Actors
    from .runtime.ray_utils import release, start_logger
    from .runtime.services import Edited, EvalRequest
    from .scenario import DataSpec, EditorSpec, EvalSpec, RuntimeSpec, Scenario, StreamSpec

    hparams = dict(cfg.runtime_hparams.get(method, {}))
    scn = Scenario(
        name="bench-runtime",
        model=cfg.model,
        data=DataSpec(kind="counterfact", path=cfg.data, n_edits=len(cases))
        if cfg.data is not None
        else DataSpec(n_edits=len(cases)),
        editor=EditorSpec(method=method, hparams=hparams),
        stream=StreamSpec(batch_size=len(cases)),
        eval=EvalSpec(fluency_prompts=0, generative=False),
        runtime=RuntimeSpec(shards=shards, evaluators=1, dtype=dtype),
        db=db,
    )
    actors, logger = None, start_logger(db)
    try:
        with Measure() as setup:  # every actor up: loaded, and the editor's set-up (key statistics) done
            actors = Actors.start(ray, scn, [], Console(quiet=True), logger)
            ray.get(actors.editor.weight_stats.remote())
            named = {
                **{f"shard {i}": h for i, h in enumerate(actors.shards.shards)},
                **{f"evaluator {i}": h for i, h in enumerate(actors.evaluators)},
                "editor": actors.editor,
            }
            started = actor_memory(ray, named, reset_peak=True)
        with Measure() as m:
            edited = ray.get(actors.editor.edit.remote(cases))
        if not isinstance(edited, Edited):
            raise BenchError(f"runtime: the {method} batch was rejected by the delta guard: {edited.reason}")
        with Measure() as sync:
            ray.get([e.follow.remote(edited.deltas, 1) for e in actors.evaluators])
        sample = cases[: cfg.runtime_eval_cases]
        request = EvalRequest(eval_id=1, retention=[], cases=sample, n_edits=len(cases), generative=False)
        with Measure() as scored:
            ray.get(actors.evaluators[0].evaluate.remote(request, 1))
        during = actor_memory(ray, named)
    finally:
        ray.get(logger.close.remote())  # its DuckDB file is free for the results (as a run's end)
        release([logger])
        if actors is not None:
            release(actors.handles(), actors.shards.placement_group)
    delta_bytes = sum(d.numel() * d.element_size() for d in edited.deltas.values())
    plan = runtime_plan(cfg, method=method, hparams=hparams, dtype=dtype, shards=shards)
    return {
        "method": method,
        "batch_size": len(cases),
        "shards": shards,
        "n": len(cases),
        "device": "cpu",
        "seconds": m.seconds,
        "rate": len(cases) / m.seconds,
        "unit": "edits/s",
        "phases": {**edited.timings, "sync": sync.seconds, "eval": scored.seconds},
        "setup_seconds": setup.seconds,
        "peak_rss_mb": max(m.peak_rss_mb, sync.peak_rss_mb, scored.peak_rss_mb),  # the driver's
        "note": (
            f"{dtype} weights; one batch after the actors started (set-up: actors, loading, the editor's "
            f"key statistics); sync: the evaluator follows the deltas; eval: it scores {len(sample)} cases"
        ),
        "runtime": {
            "dtype": dtype,
            "bytes": {
                "deltas_to_driver": delta_bytes,
                "deltas_to_each_evaluator": delta_bytes,
                "evaluators": len(actors.evaluators),
            },
            "memory": {
                name: {
                    "start_peak_mb": started[name]["peak_rss_mb"],
                    "batch_peak_mb": during[name]["peak_rss_mb"],
                    "rss_mb": during[name]["rss_mb"],
                }
                for name in named
            },
            "plan": plan,
        },
    }


def actor_memory(ray, named: dict, reset_peak: bool = False) -> dict[str, dict]:
    """Each actor's resident memory and high-water mark (MB), asked of the actor itself."""
    found = ray.get([h.memory.remote(reset_peak) for h in named.values()])
    return dict(zip(named, found))


def runtime_plan(cfg: BenchConfig, *, method: str, hparams: dict, dtype: str, shards: int) -> dict:
    """:func:`lme_sim.sizing.memory_plan` for the batch's run (the model's config read from its folder)."""
    from transformers import AutoConfig

    from .arch import DEFAULT_MODULE
    from .editors.hparams import load_hparams
    from .models import model_path
    from .sizing import memory_plan

    hp = load_hparams(method, cfg.model, hparams)
    config = AutoConfig.from_pretrained(model_path(cfg.model)).get_text_config()
    stored = str(getattr(config, "dtype", None)).removeprefix("torch.")  # the checkpoint's tensors
    return memory_plan(
        config,
        shards=shards,
        dtype=dtype,
        method=method,
        layers=list(hp.layers),
        module=getattr(hp, "module", DEFAULT_MODULE),
        stored_dtype=stored if stored in ("float32", "bfloat16", "float16") else None,
    )


def _json(value) -> dict:
    import json

    return json.loads(value) if isinstance(value, str) else (value or {})


SECTION_RUNNERS = {
    "edits": bench_edits,
    "probes": bench_probes,
    "history": bench_history,
    "shards": bench_shards,
    "runtime": bench_runtime,
}
# result keys kept in the JSON file only (the bench_results table has a column for every other key)
JSON_ONLY = ("runtime",)


# ---- output -------------------------------------------------------------------------------------


def write_result(result: dict, out: str | Path, db: str | Path) -> None:
    """The JSON file, and one ``bench_results`` row per result (each with the machine and versions)."""
    import json

    from .storage.logger import RunLogger

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    common = {k: result[k] for k in ("bench_id", "preset", "created_at", "machine", "versions")}
    with RunLogger(db) as logger:
        rows = [{k: v for k, v in r.items() if k not in JSON_ONLY} for r in result["results"]]
        logger.append("bench_results", [{**common, **r} for r in rows])
