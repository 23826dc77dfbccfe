-- A database of schema version 3 (lme-sim before one counter, batch_id): its DDL as
-- lme_sim/storage/schema.py created it, and one tiny run. tests/test_storage.py opens it.
-- Run r-old: batches 0, 1, 2 of 2 edits each (a checkpoint after batch 1), a batch rejected after
-- batch 1, evaluation 1 after batch 1 (efficacy 0.9) and 2 after batch 2 (0.4: collapse at batch 2,
-- 6 edits). step = batch_id and model_version = batch_id + 1 everywhere.
CREATE TABLE schema_info (
        version INTEGER,
        created_at TIMESTAMP);
CREATE TABLE runs (
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
        lme_sim_version VARCHAR);
CREATE TABLE batches (
        run_id VARCHAR,
        batch_id INTEGER,
        step INTEGER,
        sim_time TIMESTAMP,
        n_edits INTEGER,
        model_version INTEGER,
        seconds DOUBLE,
        timings JSON,
        checkpoint VARCHAR,        -- the checkpoint written after this batch (NULL between checkpoints)
        committed_at TIMESTAMP,
        PRIMARY KEY (run_id, batch_id));
CREATE TABLE edits (
        run_id VARCHAR,
        edit_id INTEGER,
        batch_id INTEGER,
        step INTEGER,
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
        PRIMARY KEY (run_id, edit_id));
CREATE TABLE probes (
        run_id VARCHAR,
        eval_id INTEGER,
        model_version INTEGER,
        step INTEGER,
        edit_id INTEGER,           -- NULL for unrelated probes
        probe VARCHAR,             -- rewrite | paraphrase | neighborhood | retention | known
        prompt VARCHAR,
        target VARCHAR,
        logprob DOUBLE,
        token_acc DOUBLE,
        correct BOOLEAN);
CREATE TABLE metrics (
        run_id VARCHAR,
        eval_id INTEGER,
        model_version INTEGER,
        step INTEGER,
        name VARCHAR,
        value DOUBLE,
        -- how many edits (or items) the value was computed over
        n INTEGER);
CREATE TABLE weight_stats (
        run_id VARCHAR,
        batch_id INTEGER,
        model_version INTEGER,
        module VARCHAR,
        frobenius DOUBLE,
        spectral DOUBLE,
        condition DOUBLE,
        delta_norm DOUBLE,
        cum_delta_norm DOUBLE);
CREATE TABLE bench_results (
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
        versions JSON);
CREATE TABLE rejected_batches (
        run_id VARCHAR,
        after_batch INTEGER,       -- batch_id of the last committed batch before it (-1: none)
        sim_time TIMESTAMP,
        n_edits INTEGER,
        edit_ids INTEGER[],
        reason VARCHAR,            -- the module and what was wrong with its delta
        rejected_at TIMESTAMP);
CREATE VIEW forgetting_curve AS 
        SELECT p.run_id, p.step AS eval_step, p.step - e.step AS age,
               avg(p.correct::DOUBLE) AS retention, count(*) AS n_probes
        FROM probes p JOIN edits e ON p.run_id = e.run_id AND p.edit_id = e.edit_id
        WHERE p.probe = 'retention'
        GROUP BY p.run_id, p.step, p.step - e.step
        ORDER BY p.run_id, eval_step, age;
CREATE VIEW edit_history AS 
        SELECT e.run_id, e.fact_key, e.step, e.edit_id, e.batch_id, e.sim_time, e.kind,
               e.subject, e.relation, e.target_old, e.target_new, e.supersedes,
               s.edit_id AS superseded_by, s.step AS superseded_at_step,
               (SELECT min(p.step) FROM probes p WHERE p.run_id = e.run_id AND p.edit_id = e.edit_id
                  AND p.probe = 'retention' AND NOT p.correct) AS stopped_holding_at_step
        FROM edits e LEFT JOIN edits s ON s.run_id = e.run_id AND s.supersedes = e.edit_id
        ORDER BY e.run_id, e.fact_key, e.step, e.edit_id;
CREATE VIEW efficacy_curve AS 
        SELECT m.run_id, m.eval_id, m.step,
               (SELECT coalesce(sum(b.n_edits), 0) FROM batches b
                WHERE b.run_id = m.run_id AND b.step <= m.step) AS n_edits,
               m.value AS efficacy, m.n AS efficacy_n, g.value AS gen_efficacy
        FROM metrics m LEFT JOIN metrics g
          ON g.run_id = m.run_id AND g.eval_id = m.eval_id AND g.name = 'gen_efficacy'
        WHERE m.name = 'efficacy'
        ORDER BY m.run_id, m.step, m.eval_id;
CREATE VIEW collapse AS 
        SELECT r.run_id, r.method, 0.5 AS threshold,
               min(c.step) FILTER (WHERE c.efficacy < 0.5) AS collapse_step,
               arg_min(c.n_edits, c.step) FILTER (WHERE c.efficacy < 0.5) AS collapse_edits,
               min(c.step) FILTER (WHERE c.gen_efficacy < 0.5) AS gen_collapse_step,
               arg_min(c.n_edits, c.step) FILTER (WHERE c.gen_efficacy < 0.5) AS gen_collapse_edits
        FROM runs r LEFT JOIN efficacy_curve c ON c.run_id = r.run_id
        GROUP BY r.run_id, r.method;
CREATE VIEW method_summary AS 
        WITH last AS (
            SELECT m.* FROM metrics m
            WHERE m.eval_id = (SELECT max(eval_id) FROM metrics x WHERE x.run_id = m.run_id))
        SELECT r.run_id, r.name, r.method, r.model,
               CAST(json_extract(any_value(r.scenario), '$.stream.batch_size') AS INTEGER) AS batch_size,
               (SELECT count(*) FROM edits e WHERE e.run_id = r.run_id) AS n_edits,
               max(l.step) AS final_step,
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
               any_value(c.collapse_step) AS collapse_step, any_value(c.collapse_edits) AS collapse_edits,
               any_value(c.gen_collapse_step) AS gen_collapse_step,
               any_value(c.gen_collapse_edits) AS gen_collapse_edits
        FROM runs r LEFT JOIN last l ON l.run_id = r.run_id LEFT JOIN collapse c ON c.run_id = r.run_id
        GROUP BY r.run_id, r.name, r.method, r.model, r.created_at
        ORDER BY r.created_at;
CREATE VIEW layer_usage AS 
        SELECT run_id, batch_id, module, count(*) AS n_edits
        FROM (SELECT run_id, batch_id, unnest(modules) AS module FROM edits)
        GROUP BY run_id, batch_id, module
        ORDER BY run_id, batch_id, module;
CREATE VIEW weight_health AS 
        SELECT w.run_id, w.batch_id, w.module, w.frobenius, w.spectral, w.condition, w.delta_norm,
               w.cum_delta_norm,
               w.condition / first_value(w.condition)
                   OVER (PARTITION BY w.run_id, w.module ORDER BY w.batch_id)
                   AS condition_growth
        FROM weight_stats w
        ORDER BY w.run_id, w.module, w.batch_id;
INSERT INTO schema_info VALUES (3, TIMESTAMP '2025-01-01 00:00:00');
INSERT INTO runs VALUES ('r-old', 'old', 'scenarios/old.yaml', '{"stream": {"batch_size": 2}}', 'world:small', 'alphaedit', 'finished', TIMESTAMP '2025-01-01 00:00:00', TIMESTAMP '2025-01-01 00:01:00', 3, '0.1.0');
INSERT INTO batches VALUES ('r-old', 0, 0, TIMESTAMP '2025-01-01 00:00:00', 2, 1, 0.5, '{"solve": 0.25}', NULL, TIMESTAMP '2025-01-01 00:00:00');
INSERT INTO edits VALUES ('r-old', 0, 0, 0, TIMESTAMP '2025-01-01 00:00:00', 'edit', 'c0', 'S0|r', 'S0', 'r', 'S0 r is', 'new0', 'old0', NULL, ['m0'], [1.5]);
INSERT INTO edits VALUES ('r-old', 1, 0, 0, TIMESTAMP '2025-01-01 00:00:00', 'edit', 'c1', 'S1|r', 'S1', 'r', 'S1 r is', 'new1', 'old1', NULL, ['m0'], [1.5]);
INSERT INTO weight_stats VALUES ('r-old', 0, 1, 'm0', 10.0, 3.0, 2.0, 1.5, 1.5);
INSERT INTO batches VALUES ('r-old', 1, 1, TIMESTAMP '2025-01-02 00:00:00', 2, 2, 0.5, '{"solve": 0.25}', 'ckpt/batch-000001.pt', TIMESTAMP '2025-01-01 00:00:01');
INSERT INTO edits VALUES ('r-old', 2, 1, 1, TIMESTAMP '2025-01-02 00:00:00', 'edit', 'c2', 'S2|r', 'S2', 'r', 'S2 r is', 'new2', 'old2', NULL, ['m0'], [1.5]);
INSERT INTO edits VALUES ('r-old', 3, 1, 1, TIMESTAMP '2025-01-02 00:00:00', 'edit', 'c3', 'S3|r', 'S3', 'r', 'S3 r is', 'new3', 'old3', NULL, ['m0'], [1.5]);
INSERT INTO weight_stats VALUES ('r-old', 1, 2, 'm0', 10.0, 3.0, 3.0, 1.5, 3.0);
INSERT INTO batches VALUES ('r-old', 2, 2, TIMESTAMP '2025-01-03 00:00:00', 2, 3, 0.5, '{"solve": 0.25}', NULL, TIMESTAMP '2025-01-01 00:00:02');
INSERT INTO edits VALUES ('r-old', 4, 2, 2, TIMESTAMP '2025-01-03 00:00:00', 'edit', 'c4', 'S4|r', 'S4', 'r', 'S4 r is', 'new4', 'old4', NULL, ['m0'], [1.5]);
INSERT INTO edits VALUES ('r-old', 5, 2, 2, TIMESTAMP '2025-01-03 00:00:00', 'edit', 'c5', 'S5|r', 'S5', 'r', 'S5 r is', 'new5', 'old5', NULL, ['m0'], [1.5]);
INSERT INTO weight_stats VALUES ('r-old', 2, 3, 'm0', 10.0, 3.0, 4.0, 1.5, 4.5);
INSERT INTO rejected_batches VALUES ('r-old', 1, TIMESTAMP '2025-01-02 12:00:00', 2, [100, 101], 'm0: NaN', TIMESTAMP '2025-01-01 00:00:05');
INSERT INTO probes VALUES ('r-old', 1, 2, 1, 0, 'retention', 'S0 r is', 'new0', -1.0, 1.0, true);
INSERT INTO probes VALUES ('r-old', 1, 2, 1, 1, 'retention', 'S1 r is', 'new1', -1.0, 1.0, true);
INSERT INTO probes VALUES ('r-old', 1, 2, 1, 2, 'retention', 'S2 r is', 'new2', -1.0, 1.0, true);
INSERT INTO probes VALUES ('r-old', 1, 2, 1, 3, 'retention', 'S3 r is', 'new3', -1.0, 1.0, true);
INSERT INTO metrics VALUES ('r-old', 1, 2, 1, 'efficacy', 0.9, 4);
INSERT INTO metrics VALUES ('r-old', 1, 2, 1, 'specificity', 0.8, 4);
INSERT INTO probes VALUES ('r-old', 2, 3, 2, 0, 'retention', 'S0 r is', 'new0', -1.0, 1.0, false);
INSERT INTO probes VALUES ('r-old', 2, 3, 2, 1, 'retention', 'S1 r is', 'new1', -1.0, 1.0, false);
INSERT INTO probes VALUES ('r-old', 2, 3, 2, 2, 'retention', 'S2 r is', 'new2', -1.0, 1.0, true);
INSERT INTO probes VALUES ('r-old', 2, 3, 2, 3, 'retention', 'S3 r is', 'new3', -1.0, 1.0, true);
INSERT INTO probes VALUES ('r-old', 2, 3, 2, 4, 'retention', 'S4 r is', 'new4', -1.0, 1.0, true);
INSERT INTO probes VALUES ('r-old', 2, 3, 2, 5, 'retention', 'S5 r is', 'new5', -1.0, 1.0, true);
INSERT INTO metrics VALUES ('r-old', 2, 3, 2, 'efficacy', 0.4, 6);
INSERT INTO metrics VALUES ('r-old', 2, 3, 2, 'specificity', 0.8, 6);
