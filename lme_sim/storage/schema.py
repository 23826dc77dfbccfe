"""DuckDB schema of the run database: tables, views and the schema version.

Every row carries ``run_id`` (``bench_results`` rows: ``bench_id``).  ``create_schema`` is idempotent
and refuses a file written by another schema version (``SchemaError``) instead of silently mixing layouts.
"""

from __future__ import annotations

SCHEMA_VERSION = 4  # 2: rejected_batches, bench_results; 3: metrics.n; 4: one counter, batch_id
# columns renamed since: {table: {old name: new name}}; what a migration copies under the new name
# (4: probes.step and metrics.step became batch_id; the copies step and model_version were dropped)
RENAMED = {"probes": {"step": "batch_id"}, "metrics": {"step": "batch_id"}}


class SchemaError(RuntimeError):
    """The database file was written with a different schema version."""


TABLES = {
    "schema_info": """
        version INTEGER,
        created_at TIMESTAMP""",
    "runs": """
        run_id VARCHAR PRIMARY KEY,
        name VARCHAR,
        scenario_path VARCHAR,
        scenario JSON,
        model VARCHAR,
        method VARCHAR,
        status VARCHAR,            -- running | finished | failed | interrupted (its logger died)
        created_at TIMESTAMP,
        finished_at TIMESTAMP,
        schema_version INTEGER,
        lme_sim_version VARCHAR""",
    "batches": """
        run_id VARCHAR,
        batch_id INTEGER,          -- the run's counter: 0, 1, ... per committed batch (see docs/database.md)
        sim_time TIMESTAMP,
        n_edits INTEGER,
        seconds DOUBLE,
        timings JSON,
        checkpoint VARCHAR,        -- the checkpoint written after this batch (NULL between checkpoints)
        committed_at TIMESTAMP,
        PRIMARY KEY (run_id, batch_id)""",
    "edits": """
        run_id VARCHAR,
        edit_id INTEGER,
        batch_id INTEGER,          -- the batch that committed it
        sim_time TIMESTAMP,
        kind VARCHAR,              -- edit | update | revert
        case_id VARCHAR,
        fact_key VARCHAR,          -- identifies the fact across updates, e.g. subject|relation
        subject VARCHAR,
        relation VARCHAR,
        prompt VARCHAR,
        target_new VARCHAR,
        target_old VARCHAR,
        supersedes INTEGER,        -- edit_id this one replaces, NULL if none (an edit of a rejected batch
                                   -- has no row here: see rejected_batches.edit_ids)
        modules VARCHAR[],
        delta_norms DOUBLE[],
        PRIMARY KEY (run_id, edit_id)""",
    "probes": """
        run_id VARCHAR,
        eval_id INTEGER,
        batch_id INTEGER,          -- the model scored: the one after this batch (-1: unedited)
        edit_id INTEGER,           -- NULL for unrelated probes
        probe VARCHAR,             -- rewrite | paraphrase | neighborhood | retention | known
        prompt VARCHAR,
        target VARCHAR,
        logprob DOUBLE,
        token_acc DOUBLE,
        correct BOOLEAN""",
    "metrics": """
        run_id VARCHAR,
        eval_id INTEGER,
        batch_id INTEGER,          -- the model scored: the one after this batch (-1: unedited)
        name VARCHAR,
        value DOUBLE,
        -- how many edits (or items) the value was computed over
        n INTEGER""",
    "weight_stats": """
        run_id VARCHAR,
        batch_id INTEGER,
        module VARCHAR,
        frobenius DOUBLE,
        spectral DOUBLE,
        condition DOUBLE,
        delta_norm DOUBLE,
        cum_delta_norm DOUBLE""",
    # ``lme-sim bench`` results (lme_sim.bench): one row per measurement, with the machine and versions
    "bench_results": """
        bench_id VARCHAR,          -- one bench invocation
        preset VARCHAR,            -- quick | full
        created_at TIMESTAMP,
        section VARCHAR,           -- edits | probes | history | shards
        status VARCHAR,            -- ok | unavailable | failed
        model VARCHAR,
        device VARCHAR,
        method VARCHAR,
        backend VARCHAR,           -- probes: hf | vllm
        batch_size INTEGER,
        shards INTEGER,
        step INTEGER,              -- history: the batch's number in the stream
        n INTEGER,                 -- edits or probes timed
        seconds DOUBLE,
        rate DOUBLE,
        unit VARCHAR,              -- edits/s | probes/s
        cpu_seconds DOUBLE,        -- CPU time of the measuring process (all threads)
        phases JSON,               -- phase -> seconds (keys, targets, solve, apply, sync)
        setup_seconds DOUBLE,
        peak_rss_mb DOUBLE,
        cuda_peak_mb DOUBLE,
        state_mb DOUBLE,           -- the editor's checkpointed state
        run_id VARCHAR,            -- shards: the run it timed (in the runs table)
        note VARCHAR,
        machine JSON,
        versions JSON""",
    # batches the delta guard refused (NaN/Inf or exploding deltas): no model copy kept them, their
    # edits are not in ``edits``; written with the next committed batch (or at the end of the run)
    "rejected_batches": """
        run_id VARCHAR,
        after_batch INTEGER,       -- batch_id of the last committed batch before it (-1: none)
        sim_time TIMESTAMP,
        n_edits INTEGER,
        edit_ids INTEGER[],
        reason VARCHAR,            -- the module and what was wrong with its delta
        rejected_at TIMESTAMP""",
}

# the tables whose every row belongs to one run (``run_id``); ``bench_results.run_id`` only names a
# run a benchmark timed
RUN_TABLES = tuple(t for t in TABLES if t not in ("schema_info", "bench_results"))

VIEWS = {
    # Mean correctness of retention probes per run, evaluation (``batch_id``: the model after that
    # batch) and edit age in batches (the evaluation's batch_id - the edit's).
    "forgetting_curve": """
        SELECT p.run_id, p.batch_id, p.batch_id - e.batch_id AS age,
               avg(p.correct::DOUBLE) AS retention, count(*) AS n_probes
        FROM probes p JOIN edits e ON p.run_id = e.run_id AND p.edit_id = e.edit_id
        WHERE p.probe = 'retention'
        GROUP BY p.run_id, p.batch_id, p.batch_id - e.batch_id
        ORDER BY p.run_id, p.batch_id, age""",
    # Every version of every fact: who superseded whom and when, and the first evaluation at which
    # the edit no longer held (its retention probe failed while it was the fact's latest value).
    "edit_history": """
        SELECT e.run_id, e.fact_key, e.batch_id, e.edit_id, e.sim_time, e.kind,
               e.subject, e.relation, e.target_old, e.target_new, e.supersedes,
               s.edit_id AS superseded_by, s.batch_id AS superseded_at_batch,
               (SELECT min(p.batch_id) FROM probes p WHERE p.run_id = e.run_id AND p.edit_id = e.edit_id
                  AND p.probe = 'retention' AND NOT p.correct) AS stopped_holding_at_batch
        FROM edits e LEFT JOIN edits s ON s.run_id = e.run_id AND s.supersedes = e.edit_id
        ORDER BY e.run_id, e.fact_key, e.batch_id, e.edit_id""",
    # Efficacy at every evaluation against the number of edits committed by then (the sum of
    # batches.n_edits up to the evaluation's batch_id); efficacy_n: how many edits it was computed over
    # (metrics.n).
    # gen_efficacy: the generative efficacy of the same evaluation (NULL where it was not measured).
    "efficacy_curve": """
        SELECT m.run_id, m.eval_id, m.batch_id,
               (SELECT coalesce(sum(b.n_edits), 0) FROM batches b
                WHERE b.run_id = m.run_id AND b.batch_id <= m.batch_id) AS n_edits,
               m.value AS efficacy, m.n AS efficacy_n, g.value AS gen_efficacy
        FROM metrics m LEFT JOIN metrics g
          ON g.run_id = m.run_id AND g.eval_id = m.eval_id AND g.name = 'gen_efficacy'
        WHERE m.name = 'efficacy'
        ORDER BY m.run_id, m.batch_id, m.eval_id""",
    # The collapse point (NAS, arXiv 2602.02543): per run, the first evaluation (its batch_id) at which
    # efficacy fell below 0.5, and the edits committed by then; NULL if it never did.
    # Other thresholds: lme_sim.analysis.collapse_points(db, run_ids, threshold).
    # gen_collapse_*: the same for generative efficacy.
    "collapse": """
        SELECT r.run_id, r.method, 0.5 AS threshold,
               min(c.batch_id) FILTER (WHERE c.efficacy < 0.5) AS collapse_batch,
               arg_min(c.n_edits, c.batch_id) FILTER (WHERE c.efficacy < 0.5) AS collapse_edits,
               min(c.batch_id) FILTER (WHERE c.gen_efficacy < 0.5) AS gen_collapse_batch,
               arg_min(c.n_edits, c.batch_id) FILTER (WHERE c.gen_efficacy < 0.5) AS gen_collapse_edits
        FROM runs r LEFT JOIN efficacy_curve c ON c.run_id = r.run_id
        GROUP BY r.run_id, r.method""",
    # The papers' Table-1 columns per run, from its last evaluation (NULL: not measured in this run;
    # consistency needs reference texts none of the shipped datasets has; general_ability is the
    # multiple-choice accuracy, general_ability_retention that accuracy over the unedited model's;
    # collapse_batch / collapse_edits: the run's row of the ``collapse`` view; gen_*: generative metrics;
    # batch_size: the run's edits per batch, its protocol).
    "method_summary": """
        WITH last AS (
            SELECT m.* FROM metrics m
            WHERE m.eval_id = (SELECT max(eval_id) FROM metrics x WHERE x.run_id = m.run_id))
        SELECT r.run_id, r.name, r.method, r.model,
               CAST(json_extract(any_value(r.scenario), '$.stream.batch_size') AS INTEGER) AS batch_size,
               (SELECT count(*) FROM edits e WHERE e.run_id = r.run_id) AS n_edits,
               max(l.batch_id) AS final_batch,
               max(l.value) FILTER (WHERE l.name = 'efficacy') AS efficacy,
               max(l.value) FILTER (WHERE l.name = 'generalization') AS generalization,
               max(l.value) FILTER (WHERE l.name = 'specificity') AS specificity,
               max(l.value) FILTER (WHERE l.name = 'gen_efficacy') AS gen_efficacy,
               max(l.value) FILTER (WHERE l.name = 'gen_generalization') AS gen_generalization,
               max(l.value) FILTER (WHERE l.name = 'gen_specificity') AS gen_specificity,
               max(l.value) FILTER (WHERE l.name = 'fluency') AS fluency,
               max(l.value) FILTER (WHERE l.name = 'consistency') AS consistency,
               max(l.value) FILTER (WHERE l.name = 'retention') AS retention,
               max(l.value) FILTER (WHERE l.name = 'general_ability') AS general_ability,
               max(l.value) FILTER (WHERE l.name = 'general_ability_retention') AS general_ability_retention,
               any_value(c.collapse_batch) AS collapse_batch, any_value(c.collapse_edits) AS collapse_edits,
               any_value(c.gen_collapse_batch) AS gen_collapse_batch,
               any_value(c.gen_collapse_edits) AS gen_collapse_edits
        FROM runs r LEFT JOIN last l ON l.run_id = r.run_id LEFT JOIN collapse c ON c.run_id = r.run_id
        GROUP BY r.run_id, r.name, r.method, r.model, r.created_at
        ORDER BY r.created_at""",
    # Which modules the edits touched (all edited modules for most methods; HiEdit picks per edit).
    "layer_usage": """
        SELECT run_id, batch_id, module, count(*) AS n_edits
        FROM (SELECT run_id, batch_id, unnest(modules) AS module FROM edits)
        GROUP BY run_id, batch_id, module
        ORDER BY run_id, batch_id, module""",
    # Norms and condition number of every edited matrix per batch, and the growth since the first batch.
    "weight_health": """
        SELECT w.run_id, w.batch_id, w.module, w.frobenius, w.spectral, w.condition, w.delta_norm,
               w.cum_delta_norm,
               w.condition / first_value(w.condition)
                   OVER (PARTITION BY w.run_id, w.module ORDER BY w.batch_id)
                   AS condition_growth
        FROM weight_stats w
        ORDER BY w.run_id, w.module, w.batch_id""",
}


def stored_version(con) -> int | None:
    """The schema version recorded in the open database, or None if it has none yet."""
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_info'"
    ).fetchone()[0]
    if not exists:
        return None
    row = con.execute("SELECT max(version) FROM schema_info").fetchone()
    return row[0]


def check_version(con, path) -> None:
    """Raise SchemaError if the database at ``path`` holds another schema version (an older one:
    :func:`migrate` brings it to this one)."""
    version = stored_version(con)
    if version is not None and version != SCHEMA_VERSION:
        raise SchemaError(
            f"{path}: database schema version {version}, but this lme-sim uses version "
            f"{SCHEMA_VERSION}; use a new database file or migrate this one"
        )


def _columns(con, table: str) -> list[str]:
    return [
        r[0]
        for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
            "ORDER BY ordinal_position",
            [table],
        ).fetchall()
    ]


def migrate(con, path="<database>") -> int | None:
    """Bring a database of an older schema version to this one, in one transaction; returns the
    version it had (None: nothing to do, it is new or current).

    Every table is rebuilt with its current columns and its rows copied by name: a column renamed
    since (:data:`RENAMED`) keeps its values under the new name, a dropped one is left behind, a new
    one is NULL; the views are made anew. Version 4 keeps one counter, ``batch_id``: the old
    ``step`` of probes and metrics is their ``batch_id``, and ``step`` / ``model_version`` elsewhere
    were copies of ``batch_id`` (``model_version`` = batch_id + 1). A newer version is a SchemaError."""
    version = stored_version(con)
    if version is None or version == SCHEMA_VERSION:
        return None
    if version > SCHEMA_VERSION:
        check_version(con, path)
    con.execute("BEGIN TRANSACTION")
    try:
        for name in VIEWS:  # they name the old columns
            con.execute(f"DROP VIEW IF EXISTS {name}")
        for table, cols in TABLES.items():
            old = _columns(con, table)
            if not old:
                con.execute(f"CREATE TABLE {table} ({cols})")
                continue
            renamed = RENAMED.get(table, {})
            con.execute(f"CREATE TABLE _lme_migrating ({cols})")
            new = set(_columns(con, "_lme_migrating"))
            kept = [(c, renamed.get(c, c)) for c in old if renamed.get(c, c) in new]
            if kept:  # column names from the schema, not values
                into, select = ", ".join(n for _, n in kept), ", ".join(f'"{c}"' for c, _ in kept)
                sql = f"INSERT INTO _lme_migrating ({into}) SELECT {select} FROM {table}"
                con.execute(sql)
            con.execute(f"DROP TABLE {table}")
            con.execute(f"ALTER TABLE _lme_migrating RENAME TO {table}")
        for name, sql in VIEWS.items():
            con.execute(f"CREATE VIEW {name} AS {sql}")
        con.execute("INSERT INTO schema_info VALUES (?, now()::TIMESTAMP)", [SCHEMA_VERSION])
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    return version


def create_schema(con, path="<database>") -> None:
    """Create all tables and views if missing and record SCHEMA_VERSION (idempotent); a database
    of an older version is migrated first (:func:`migrate`)."""
    migrate(con, path)
    check_version(con, path)
    for name, cols in TABLES.items():
        con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({cols})")
    for name, sql in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
    if stored_version(con) is None:
        con.execute("INSERT INTO schema_info VALUES (?, now()::TIMESTAMP)", [SCHEMA_VERSION])
