"""The ``lme-sim`` command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log what happens (model loads, caches, statistics).")
def main(verbose: bool) -> None:
    """lme-sim: lifelong knowledge-editing simulator."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@main.group()
def world() -> None:
    """The embedded synthetic knowledge world."""


@world.command("build")
@click.option("--name", default="default", show_default=True, help="World name (see lme_sim.world.WORLDS).")
def world_build(name: str) -> None:
    """Generate the world and train (or load from cache) its model."""
    from .world import get_world_config
    from .world_model import TrainConfig, load_world_model, world_cache_dir, world_stats

    try:
        cfg = get_world_config(name)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    model, tok, w = load_world_model(cfg)
    stats = world_stats(name)
    click.echo(
        f"world {name!r}: {len(w.facts)} facts, {len(w.subjects)} subjects, {len(w.relations)} relations, "
        f"{len(w.changes)} dated changes; model accuracy {stats['accuracy']:.3f} "
        f"(trained in {stats['seconds']} s); cached at {world_cache_dir(cfg, TrainConfig())}"
    )


METHODS_HELP = "Comma-separated: only these of the scenario's editors (default: all of them)."


@main.command()
@click.argument("scenario", type=click.Path(dir_okay=False))
@click.option("--methods", default=None, help=METHODS_HELP + " Only their settings are checked.")
def validate(scenario: str, methods: str | None) -> None:
    """Check a scenario file without running it."""
    scn, specs = _load_scenario_or_exit(scenario, methods)
    from .catalog import data_dir, local_path
    from .preflight import named_datasets

    names = ", ".join(s.label() for s in specs)
    click.echo(f"{scenario}: ok ({names} on {scn.model}, {scn.data.n_edits} edits)")
    chosen = [s.method for s in specs]
    if missing := [n for n in named_datasets(scn, chosen) if not local_path(n).is_file()]:
        click.echo(
            f"datasets not yet in {data_dir()}: {', '.join(missing)} (lme-sim run downloads them, "
            f"or: lme-sim data get NAME)"
        )


@main.command()
@click.argument("scenario", type=click.Path(dir_okay=False))
@click.option("--db", default=None, help="DuckDB file (default: the scenario's db field).")
@click.option(
    "--address",
    default=None,
    help="Ray cluster address, e.g. auto or <head>:6379 (default: $RAY_ADDRESS, else start Ray locally).",
)
@click.option(
    "--resume",
    "resume",
    default=None,
    is_flag=False,
    flag_value="",
    metavar="[RUN_ID|STUDY_ID]",
    help="Continue a killed or failed run (RUN_ID), or every unfinished run of a study (STUDY_ID, "
    "<name>-<hex>: the random part its run ids share; alone: the scenario's latest study in the "
    "database), starting the study's runs not started yet. Finished runs are not redone (nothing "
    "left: exit code 0). Give it after the scenario.",
)
@click.option("--methods", default=None, help=METHODS_HELP)
def run(scenario: str, db: str | None, address: str | None, resume: str | None, methods: str | None) -> None:
    """Run a scenario on Ray (shards, editor, evaluators, DuckDB logger) and print a summary.

    A scenario whose ``editor`` is a list runs the same stream once per method (one run each), and
    ``seeds`` once per seed: a study, whose runs run ``runtime.concurrent_runs`` at once (auto: as many
    as the cluster holds), all logging to the one database. Named datasets (``data.source``,
    ``stats: {kind: cases, ...}``) missing here are downloaded first."""
    from .runtime.coordinator import run_study
    from .runtime.failures import RunFailed
    from .runtime.ray_utils import PlacementError

    scn, specs = _load_scenario_or_exit(scenario, methods)
    db = db or scn.db
    _db_or_exit(db, write=True)  # before Ray starts or anything is written
    _datasets_or_exit(scn, [s.method for s in specs], "run")
    runs = _study_runs_or_exit(scn, specs, scenario, db, resume)
    outcome = run_study(runs, scenario, db=db, address=address)
    if len(runs) > 1:
        click.echo("runs: " + " ".join(outcome))
    failed = [e for e in outcome.values() if e is not None]
    for e in failed:  # one line each: the run that stopped (RunFailed), or the fields (PlacementError)
        click.echo(f"error: {e}" if isinstance(e, RunFailed) else f"error: {scenario}: {e}", err=True)
    if failed:
        sys.exit(2 if any(isinstance(e, PlacementError) for e in failed) else 1)


def _run_tag(method: str | None, seed: int | None) -> str | None:
    """What a run id says between the scenario's name and its random part: the method (a list of
    methods) and ``s<seed>`` (a list of seeds)."""
    parts = ([method] if method else []) + ([f"s{seed}"] if seed is not None else [])
    return "-".join(parts) or None


def _study_runs_or_exit(scn, specs, scenario: str, db: str, resume: str | None):
    """The runs to run (:class:`~lme_sim.runtime.study.StudyRun`): every editor of ``specs`` at every
    seed (a new study); with ``resume``, the run it names, or the unfinished and not yet started runs
    of the study it names ("": the latest); or one line and exit (2: nothing to resume there; 0: all
    finished)."""
    from .runtime.study import StudyRun, new_study_hex, resume_plan, run_id, study_id

    seeds = scn.seeds or [scn.data.seed]
    by_label = {s.label(): s for s in specs}
    tagged = len(scn.editors) > 1  # a list of editors: each run id names its editor

    def new(label: str, seed: int, study_hex: str) -> StudyRun:
        tag = _run_tag(label if tagged else None, seed if scn.seeds else None)
        return StudyRun(scn.with_editor(by_label[label]).with_seed(seed), run_id(scn.name, tag, study_hex))

    def resumed(label: str, seed: int, rid: str) -> StudyRun:
        return StudyRun(scn.with_editor(by_label[label]).with_seed(seed), rid, resume=True)

    if resume is None:
        study_hex = new_study_hex()
        return [new(s.label(), seed, study_hex) for s in specs for seed in seeds]
    rows = _scenario_runs(db, scn.name) if Path(db).exists() else []
    if resume and (
        resume in {r.run_id for r in rows} or resume not in {study_id(r.run_id, scn.name) for r in rows}
    ):
        label, seed = _resumable_run_or_exit(db, resume, scn.name, scenario, set(by_label))  # a run id
        return [resumed(label, seed, resume)]
    if not rows:
        click.echo(f"error: {db}: no run of scenario {scn.name!r} to resume", err=True)
        sys.exit(2)
    study = resume or study_id(rows[-1].run_id, scn.name)
    todo, missing = resume_plan(rows, [(s.label(), seed) for s in specs for seed in seeds], study, scn.name)
    if not todo and not missing:
        click.echo(f"{db}: every run of study {study!r} is finished; nothing to resume")
        sys.exit(0)
    study_hex = study.rsplit("-", 1)[-1]
    return [resumed(r.label, r.seed, r.run_id) for r in todo] + [new(l, s, study_hex) for l, s in missing]


def _scenario_runs(db: str, name: str):
    """The runs of scenario ``name`` in ``db`` (read-only), oldest first, as
    :class:`~lme_sim.runtime.study.RunRow`."""
    from .runtime.study import RunRow

    rows = _query_or_exit(
        db,
        "select run_id, method, status, json_extract(scenario, '$.editor'), scenario->>'$.data.seed' "
        "from runs where name = ? order by created_at, run_id",
        [name],
    )[1]
    return [
        RunRow(rid, _editor_label(editor, method), int(seed or 0), status)
        for rid, method, status, editor, seed in rows
    ]


def _editor_label(editor_json: str | None, method: str) -> str:
    """A run's editor name (:meth:`EditorSpec.label`) from its ``runs.scenario`` editor."""
    from .scenario import EditorSpec

    return EditorSpec.model_validate(json.loads(editor_json)).label() if editor_json else method


def _trained_method(ctx, param, value: str) -> str:
    """A registered editor whose networks are trained (RLEdit, HiEdit): ``Editor.trained``."""
    from .editors.registry import editor_class, known_methods

    trained = [m for m in known_methods() if editor_class(m).trained]
    if value not in trained:
        raise click.BadParameter(f"{value!r} is not a trained editor (choose from {', '.join(trained)})")
    return value


@main.command("train-editor")
@click.option(
    "--method", required=True, callback=_trained_method, help="A trained editor, e.g. rledit or hiedit."
)
@click.option(
    "--model",
    "model_name",
    default="world:default",
    show_default=True,
    help="world:<name>, smollm2-135m or a from_pretrained id/folder.",
)
@click.option(
    "--data",
    "data_path",
    default=None,
    help="CounterFact/ZsRE file to train on (default: the world's train split for world models, "
    "else the hparams' train_data).",
)
@click.option(
    "--out",
    default=None,
    help="Checkpoint file (default: the cache that scenarios read when they name no checkpoint).",
)
@click.option(
    "--snapshot-every",
    "snapshot_every",
    type=click.IntRange(min=0),
    default=0,
    help="Also save the networks every N rollouts, as <out>-r<N>.pt (a quality-vs-budget curve).",
)
@click.option(
    "--hparams",
    "overrides",
    default="{}",
    show_default=True,
    help="YAML mapping of hyperparameters on top of lme_sim/editors/hparams/<method>.yaml, "
    "e.g. '{rollouts: 100, layers: [3, 4, 5]}'.",
)
@click.option(
    "--init-from",
    "init_from",
    default=None,
    help="For an editor whose training starts from another's networks (hiedit: RLEdit's), that "
    "checkpoint, for the same model and layers (default: the cached one for these hyperparameters, "
    "trained first when missing).",
)
def train_editor_cmd(
    method: str,
    model_name: str,
    data_path: str | None,
    out: str | None,
    overrides: str,
    init_from: str | None,
    snapshot_every: int,
) -> None:
    """Train a learned editor's networks (RLEdit, HiEdit) over sequences of edits and save a checkpoint.

    An editor whose training starts from another's networks (HiEdit's router trains on top of an
    RLEdit network; the editor's class says so) takes one with --init-from, or the cached one for
    these hyperparameters is used (trained first, and cached, when missing)."""
    import yaml

    from .editors.checkpoints import load_checkpoint, save_checkpoint
    from .editors.editor_training import (
        TrainingDiverged,
        TrainingJob,
        checkpoint_path,
        start_networks,
        train_editor,
    )
    from .editors.hparams import HParamsError, load_hparams
    from .editors.registry import editor_class, known_methods
    from .models import load_model, model_kind

    has_world = model_kind(model_name).has_world  # trains on its own world's train split
    try:
        extra = yaml.safe_load(overrides) or {}
        if not isinstance(extra, dict):
            raise HParamsError("--hparams: a mapping of fields, e.g. '{rollouts: 100}'")
        hp = load_hparams(method, model_name, extra, where="--hparams")
    except (HParamsError, yaml.YAMLError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if data_path is not None:
        if not Path(data_path).is_file():
            click.echo(f"error: --data: file {data_path!r} not found", err=True)
            sys.exit(2)
        hp = hp.model_copy(update={"train_data": data_path, "train_source": None})
    elif not has_world and hp.train_data is None and hp.train_source is None:
        click.echo(
            f"error: --data: model {model_name!r} has no embedded world; name a file to train on", err=True
        )
        sys.exit(2)
    elif hp.train_data is not None and not has_world and not Path(hp.train_data).is_file():
        click.echo(
            f"error: --hparams train_data: file {hp.train_data!r} not found (or pass --data)", err=True
        )
        sys.exit(2)
    elif hp.train_source is not None and not has_world:  # a named dataset: downloaded unless here
        from .catalog import CatalogError, get

        try:
            get(hp.train_source, progress=sys.stderr.isatty())
        except CatalogError as e:
            click.echo(f"error: lme-sim train-editor: {e}", err=True)
            sys.exit(2)
    starts_from = editor_class(method).starts_from  # the method's own rule (HiEdit: RLEdit's network)
    if init_from is not None and starts_from is None:
        starters = [editor_class(m) for m in known_methods() if getattr(editor_class(m), "starts_from", None)]
        what = ", ".join(f"an {editor_class(c.starts_from).__name__} checkpoint" for c in starters)
        click.echo(
            f"error: --init-from: only {', '.join(c.__name__ for c in starters)} starts from another "
            f"network ({what})",
            err=True,
        )
        sys.exit(2)
    init = None
    if init_from is not None:  # checked before the model loads
        try:
            init = load_checkpoint(init_from, starts_from)
        except (ValueError, FileNotFoundError) as e:
            click.echo(f"error: --init-from: {e}", err=True)
            sys.exit(2)
    lm = load_model(model_name)
    job = TrainingJob(
        method=method,
        hp=hp,
        model=lm.model,
        tok=lm.tok,
        model_name=model_name,
        world=lm.world,
        data_path=data_path,
    )
    out = Path(out or checkpoint_path(method, model_name, hp, lm.model))
    if init is None:  # the cached network to start from (if the method has one), trained first if missing
        init = start_networks(job)

    def snapshot(rollouts: int, ckpt: dict) -> None:
        save_checkpoint(ckpt, out.with_name(f"{out.stem}-r{rollouts}{out.suffix}"))

    try:
        ckpt = train_editor(job, init=init, snapshot_every=snapshot_every, on_snapshot=snapshot)
    except ValueError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except TrainingDiverged as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    path = save_checkpoint(ckpt, out)
    t = ckpt["train"]
    start = f" after a {starts_from} start of {ckpt['init']['seconds']:.0f} s" if ckpt.get("init") else ""
    click.echo(
        f"{method} for {model_name}: {hp.rollouts} rollouts over {t['n_facts']} training facts in "
        f"{t['seconds']:.0f} s{start}; edit loss {t['edit_loss'][0]:.3f} -> {t['edit_loss'][-1]:.3f}; "
        f"saved {path}"
    )
    layers = ", ".join(map(str, hp.layers))  # the editor refuses a checkpoint made for other layers
    click.echo(
        f"use it with  editor: {{method: {method}, hparams: {{checkpoint: {path}, layers: [{layers}]}}}}"
    )


@main.command()
@click.option(
    "--from",
    "source",
    required=True,
    help="CounterFact file (flat or nested ROME/MEMIT json/jsonl) or hub id, disjoint from the edits.",
)
@click.option("--out", required=True, help="Text file to write (one sentence per line).")
@click.option(
    "--records", default=None, type=click.IntRange(min=1), help="Use the first N records (default: all)."
)
def corpus(source: str, out: str, records: int | None) -> None:
    """Generic text for key statistics: every prompt and paraphrase completed with its true object.

    Use it with  editor.hparams.stats: {kind: file, path: OUT, n_samples: N}."""
    from .corpus import write_corpus
    from .data import DataError

    try:
        path, n = write_corpus(source, out, records)
    except DataError as e:
        click.echo(f"error: --from: {e}", err=True)
        sys.exit(2)
    click.echo(f"{path}\t{n} lines")


@main.command()
@click.option(
    "--quick",
    is_flag=True,
    help="The small world and short streams (a few minutes on 2 CPU cores); "
    "learned editors train on a small budget.",
)
@click.option(
    "--model",
    default=None,
    help="world:<name> (default: world:default; --quick: world:small), or a real model such as "
    "smollm2-135m: then UltraEdit at batches of 100 on the --data cases, probes and 2 shard actors.",
)
@click.option(
    "--data",
    default=None,
    help="CounterFact JSON (flat or nested) the cases and probes of a real model come from, or a "
    "named dataset (downloaded unless here), e.g. counterfact-edit.",
)
@click.option(
    "--methods",
    default=None,
    help="Comma-separated editors (default: every registered one; a real model: ultraedit).",
)
@click.option(
    "--batch-sizes",
    default=None,
    help="Comma-separated edits per batch (default: 1,10; without --quick 1,10,100; a real model: 100).",
)
@click.option(
    "--sections",
    default=None,
    help="Comma-separated parts (default: edits,probes,history,shards; a real model: edits,probes,shards; "
    "also runtime: one batch per method through the actors, each actor's memory beside the computed plan).",
)
@click.option(
    "--device", default="auto", show_default=True, help="auto | cpu | cuda (auto: cuda where there is one)."
)
@click.option(
    "--threads",
    default=1,
    show_default=True,
    type=int,
    help="torch threads of the in-process work (1: what the runtime's Ray actors get).",
)
@click.option("--out", default="runs/bench.json", show_default=True, help="JSON result file.")
@click.option(
    "--db",
    default="runs/bench.duckdb",
    show_default=True,
    help="DuckDB file: rows go to its bench_results table (the shard runs to its runs tables).",
)
def bench(
    quick: bool,
    model: str | None,
    data: str | None,
    methods: str | None,
    batch_sizes: str | None,
    sections: str | None,
    device: str,
    threads: int,
    out: str,
    db: str,
) -> None:
    """Measure edits/s per method and phase, probes/s per backend, cost per batch over a long stream,
    and 1/2/4 shards through Ray; print tables, write JSON and DuckDB rows. With a real model
    (--model smollm2-135m --data counterfact-edit): UltraEdit in process and on 2 shards, and probes/s."""
    from .bench import BenchError, bench_config, run_bench
    from .bench_tables import print_result
    from .catalog import DATASETS, CatalogError, get

    if data in DATASETS and not Path(data).exists():  # a named dataset: downloaded unless here
        try:
            data = str(get(data, progress=sys.stderr.isatty()))
        except CatalogError as e:
            click.echo(f"error: lme-sim bench: {e}", err=True)
            sys.exit(2)
    try:
        cfg = bench_config(
            quick=quick,
            methods=methods,
            batch_sizes=batch_sizes,
            sections=sections,
            device=device,
            threads=threads,
            model=model,
            data=data,
        )
    except BenchError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    result = run_bench(cfg, out, db)
    print_result(result)
    click.echo(
        f"wrote {out}; rows in table bench_results of {db}, e.g.  lme-sim query "
        f'"select section, method, batch_size, rate from bench_results where bench_id = '
        f"'{result['bench_id']}'\" --db {db}"
    )


@main.command()
@click.argument("sql")
@click.option("--db", default="runs/lme.duckdb", show_default=True, help="DuckDB file.")
def query(sql: str, db: str) -> None:
    """Run SQL on a results database and print the rows."""
    cols, rows = _query_or_exit(db, sql)
    click.echo("\t".join(cols))
    for r in rows:
        click.echo("\t".join(str(v) for v in r))


@main.command()
@click.argument("run_ids", nargs=-1, required=True)
@click.option("--db", default="runs/lme.duckdb", show_default=True, help="DuckDB file.")
def compare(run_ids: tuple[str, ...], db: str) -> None:
    """Side-by-side table of finished runs (the papers' Table-1 columns)."""
    from rich.console import Console

    from .analysis import comparison_table

    Console().print(_analysis_or_exit(comparison_table, db, list(run_ids)))


@main.command()
@click.argument("run_ids", nargs=-1, required=True)
@click.option("--db", default="runs/lme.duckdb", show_default=True, help="DuckDB file.")
@click.option("--out", default="out/report", show_default=True, help="Folder for the PNGs and index.html.")
def report(run_ids: tuple[str, ...], db: str, out: str) -> None:
    """PNG plots (forgetting, metrics over steps, condition numbers, layer usage) and an HTML page."""
    from .report import write_report

    for f in _analysis_or_exit(write_report, db, list(run_ids), out):
        click.echo(str(f))


@main.command()
@click.argument("run_id")
@click.option("--db", default="runs/lme.duckdb", show_default=True, help="DuckDB file.")
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv"]), default="parquet", show_default=True)
@click.option("--out", default=None, help="Folder (default: out/export/<run_id>).")
def export(run_id: str, db: str, fmt: str, out: str | None) -> None:
    """Every table's rows of one run as Parquet or CSV files."""
    from .analysis import export_run

    for p in _analysis_or_exit(export_run, db, run_id, out or f"out/export/{run_id}", fmt):
        click.echo(str(p))


@main.command("import")
@click.argument("sources", nargs=-1, required=True)
@click.option("--db", default="runs/lme.duckdb", show_default=True, help="DuckDB file to copy the runs into.")
@click.option(
    "--run",
    "run_ids",
    multiple=True,
    help="Only this run (repeatable); default: every run of each source.",
)
def import_cmd(sources: tuple[str, ...], db: str, run_ids: tuple[str, ...]) -> None:
    """Copy runs from other results databases into one, for compare and report.

    Every row of each run is copied in one transaction; a run id that is already there, or in two of
    the sources, is an error and nothing is written."""
    import duckdb

    from .storage.importer import import_runs
    from .storage.logger import DatabaseError
    from .storage.schema import SchemaError

    try:
        copied = import_runs(db, list(sources), list(run_ids) or None)
    except (DatabaseError, SchemaError, FileNotFoundError) as e:  # each names its file
        click.echo(f"error: {' '.join(str(e).split())}", err=True)
        sys.exit(2)
    except duckdb.Error as e:
        click.echo(f"error: {_db_error(db, e)}", err=True)
        sys.exit(2)
    for rid in copied:
        click.echo(rid)


@main.command()
@click.option("--db", default="runs/lme.duckdb", show_default=True, help="DuckDB file.")
def runs(db: str) -> None:
    """List the runs in a results database (a run whose logger died shows as interrupted)."""
    from .storage.logger import INTERRUPTED

    # the file opened read-only, so no logger has it (DuckDB lets one process write it): a run it
    # lists as running was interrupted
    cols, rows = _query_or_exit(
        db,
        "select r.run_id, r.name, r.model, r.method, "
        "case r.status when 'running' then ? else r.status end as status, r.created_at, "
        "(select count(*) from edits e where e.run_id = r.run_id) as edits "
        "from runs r order by r.created_at",
        [INTERRUPTED],
    )
    click.echo("\t".join(cols))
    for r in rows:
        click.echo("\t".join(str(v) for v in r))


def _db_error(db: str, e: BaseException) -> str:
    """One line naming the database for an error of opening or querying it."""
    msg = " ".join(str(e).split())  # duckdb's messages span lines (the SQL, a caret)
    return msg if msg.startswith((str(db), str(Path(db)))) else f"{db}: {msg}"


def _db_or_exit(db: str, write: bool = False) -> None:
    """Exit with one ``error:`` line (code 2) if ``db`` cannot be read (``write``: written by a run):
    a directory, a read-only file, a file that is not DuckDB or of another schema version."""
    from .storage.logger import check_writable, open_read_only

    try:
        check_writable(db) if write else open_read_only(db).close()
    except Exception as e:  # FileNotFoundError, DatabaseError, SchemaError: each names the file
        click.echo(f"error: {_db_error(db, e)}", err=True)
        sys.exit(2)


def _query_or_exit(db: str, sql: str, params=None) -> tuple[list[str], list[tuple]]:
    """``read_only_query``, or its error (no database, not DuckDB, bad SQL) as one line and exit code 2."""
    from .storage.logger import read_only_query

    try:
        return read_only_query(db, sql, params)
    except Exception as e:  # duckdb's own message names the problem
        click.echo(f"error: {_db_error(db, e)}", err=True)
        sys.exit(2)


def _resumable_run_or_exit(
    db: str, run_id: str, name: str, scenario: str, labels: set[str]
) -> tuple[str, int]:
    """The editor's name (:meth:`EditorSpec.label`) and the data seed of run ``run_id`` of scenario
    ``name`` (file ``scenario``, editors ``labels``) in ``db`` (read-only), or one ``error:`` line naming
    the database and the id and exit code 2 (no such database, no such run, a run of another scenario
    or editor); a finished run: one line saying so and exit code 0 (nothing to do)."""
    if not Path(db).exists():
        click.echo(f"error: {db}: no such database, so no run {run_id!r} to resume", err=True)
        sys.exit(2)
    rows = _query_or_exit(
        db,
        "select name, method, status, json_extract(scenario, '$.editor'), scenario->>'$.data.seed' "
        "from runs where run_id = ?",
        [run_id],
    )[1]
    if not rows:
        click.echo(
            f"error: {db}: no run {run_id!r} to resume (lme-sim runs --db {db} lists the runs)", err=True
        )
        sys.exit(2)
    ((run_name, method, status, editor, seed),) = rows
    if run_name != name:
        click.echo(
            f"error: {db}: run {run_id!r} is a run of scenario {run_name!r}, not of {name!r}", err=True
        )
        sys.exit(2)
    label = _editor_label(editor, method)
    if label not in labels:
        click.echo(
            f"error: {db}: run {run_id!r} is a {label} run, but {scenario} has no {label} editor",
            err=True,
        )
        sys.exit(2)
    if status == "finished":  # resuming it again would change nothing: say so and succeed
        click.echo(f"{db}: run {run_id!r} is finished; nothing to resume")
        sys.exit(0)
    return label, int(seed or 0)


def _analysis_or_exit(fn, *args):
    """``fn(*args)``, or its AnalysisError (an unknown run or database) as one line and exit code 2;
    so is a database that cannot be read (not DuckDB, another schema version: ``args[0]``)."""
    import duckdb

    from .analysis import AnalysisError
    from .storage.logger import DatabaseError
    from .storage.schema import SchemaError

    try:
        return fn(*args)
    except AnalysisError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (DatabaseError, SchemaError, duckdb.Error) as e:
        click.echo(f"error: {_db_error(args[0], e)}", err=True)
        sys.exit(2)


def _load_scenario_or_exit(path: str, methods: str | None = None):
    """The validated scenario and its editors that ``--methods`` chose (all where None; only those
    are checked), or one line naming the file and field (or the option) and exit code 2."""
    from .preflight import load_checked
    from .scenario import ScenarioError, load_scenario

    chosen = None
    if methods:
        chosen = [m.strip() for m in methods.split(",") if m.strip()]
        try:  # a method (all its editors) or an editor's name (mose-b1: MOSE in batches of 1)
            editors = load_scenario(path).editors
        except ScenarioError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        known = [s.label() for s in editors]
        if missing := [m for m in chosen if m not in set(known) | {s.method for s in editors}]:
            click.echo(
                f"error: --methods: {path} has no {missing[0]!r} editor (its editors: {', '.join(known)})",
                err=True,
            )
            sys.exit(2)
        chosen = [s.label() for s in editors if s.method in chosen or s.label() in chosen]
        methods_chosen = sorted({s.method for s in editors if s.label() in chosen})
    try:
        scn = load_checked(path, None if chosen is None else methods_chosen)
    except ScenarioError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    return scn, [s for s in scn.editors if chosen is None or s.label() in chosen]


def _datasets_or_exit(scn, methods: list[str], command: str) -> None:
    """Download the catalog datasets the scenario reads that are not here yet, or one ``error:`` line
    naming the command and the source and exit code 2 (nothing half-written)."""
    from .catalog import CatalogError, get, local_path
    from .preflight import named_datasets

    for name in named_datasets(scn, methods):
        fresh = not local_path(name).is_file()
        try:
            path = get(name, progress=sys.stderr.isatty())
        except CatalogError as e:
            click.echo(f"error: lme-sim {command}: {e}", err=True)
            sys.exit(2)
        if fresh:
            click.echo(f"downloaded {name} to {path}")


@main.group()
def data() -> None:
    """Named public datasets (CounterFact, ZsRE, ...): download them, list what is here.

    They live in $LME_SIM_DATA, else $LME_SIM_CACHE/data (~/.cache/lme_sim/data)."""


@data.command("get")
@click.argument("names", nargs=-1, required=True)
@click.option("--url", default=None, help="Download from this mirror instead of the dataset's source.")
@click.option(
    "--sha256",
    default=None,
    help="Also check the file against this digest (one NAME only). Datasets without a published "
    "digest get theirs recorded at the first download and checked thereafter.",
)
def data_get(names: tuple[str, ...], url: str | None, sha256: str | None) -> None:
    """Download datasets into the data folder (those already there are checked, not downloaded)."""
    from .catalog import CatalogError, dataset, get, local_path, verify

    if (url or sha256) and len(names) > 1:
        click.echo("error: lme-sim data get: --url and --sha256 go with one dataset name", err=True)
        sys.exit(2)
    for name in names:
        try:
            ds = dataset(name)
            there = local_path(name).is_file()
            path = get(name, url=url, sha256=sha256, progress=sys.stderr.isatty())
            how = verify(name, sha256)
        except CatalogError as e:
            click.echo(f"error: lme-sim data get: {e}", err=True)
            sys.exit(2)
        click.echo(
            f"{name}\t{path}\t{'already here' if there else 'downloaded from ' + (url or ds.url)}; {how}"
        )


@data.command("list")
def data_list() -> None:
    """Every known dataset: whether it is here, its size and checksum state, and its source."""
    from .catalog import data_dir, listing

    click.echo(f"data folder: {data_dir()}")
    click.echo("\t".join(("name", "kind", "size", "status", "source")))
    for r in listing():
        size = "" if r["size"] is None else f"{r['size']:,}"
        click.echo("\t".join((r["name"], r["kind"], size, r["status"], r["source"])))


if __name__ == "__main__":
    main()
