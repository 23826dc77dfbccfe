"""The tables ``lme-sim bench`` prints: one per section of a result (see :mod:`lme_sim.bench`)."""

from __future__ import annotations

import statistics
import sys

from rich.console import Console
from rich.table import Table

from .editors.base import PHASES


def print_result(result: dict, console: Console | None = None) -> None:
    """A header with the machine and versions, then a table per section that has rows."""
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    m, v = result["machine"], result["versions"]
    gpus = ", ".join(m["gpus"]) or "no GPU"
    console.print(
        f"[bold]lme-sim bench[/] {result['bench_id']} ({result['preset']}): {result['wall_seconds']:.0f} s "
        f"wall, {result['cpu_seconds']:.0f} s CPU in this process; {m['cpu_model']}, {m['cpu_cores']} cores "
        f"({m['torch_threads']} torch threads), {m['ram_gb']} GiB, {gpus}; load average {m['load_avg_1m']} "
        f"at start, {m['load_avg_1m_end']} at end"
    )
    console.print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    for section, table in (
        ("edits", edits_table),
        ("probes", probes_table),
        ("history", history_table),
        ("shards", shards_table),
        ("runtime", runtime_table),
    ):
        rows = [r for r in result["results"] if r["section"] == section]
        if rows:
            table(rows, result, console)


def _ms_per(r: dict, phase: str) -> str:
    t = (r.get("phases") or {}).get(phase)
    return "" if t is None else f"{1000 * t / r['n']:.1f}"


def _mb(x) -> str:
    return "" if x is None else f"{x:.0f}"


def _table(
    title: str, columns: tuple[str, ...], left: tuple[str, ...] = (), caption: str | None = None
) -> Table:
    t = Table(title=title, caption=caption)
    for c in columns:
        t.add_column(c, justify="left" if c in left else "right")
    return t


def edits_table(rows: list[dict], result: dict, console: Console) -> None:
    cuda = any(r.get("cuda_peak_mb") for r in rows)
    t = _table(
        "editing throughput (in process)",
        ("method", "batch", "edits", "edits/s", *PHASES, "set-up s", "peak MB", "state MB")
        + (("CUDA MB",) if cuda else ()),
        left=("method",),
        caption="phases: ms per edit; sync: deltas applied to an evaluator replica; peak: resident memory "
        "high-water mark while timed",
    )
    for r in rows:
        t.add_row(
            r["method"],
            str(r["batch_size"]),
            str(r["n"]),
            f"{r['rate']:.2f}",
            *[_ms_per(r, p) for p in PHASES],
            f"{r['setup_seconds']:.1f}",
            _mb(r["peak_rss_mb"]),
            f"{r['state_mb']:.2f}",
            *((_mb(r["cuda_peak_mb"]),) if cuda else ()),
        )
    console.print(t)
    for method, note in sorted(
        {(r["method"], r["note"]) for r in rows if "networks" in (r.get("note") or "")}
    ):
        console.print(f"{method}: {note}")


def probes_table(rows: list[dict], result: dict, console: Console) -> None:
    t = _table(
        "evaluator throughput",
        ("backend", "status", "probes", "probes/s", "sync ms", "peak MB", "note"),
        left=("backend", "status", "note"),
    )
    for r in rows:
        ok = r["status"] == "ok"
        t.add_row(
            r["backend"],
            r["status"],
            str(r["n"]),
            f"{r['rate']:.0f}" if ok else "",
            f"{1000 * r['phases']['sync']:.1f}" if ok else "",
            _mb(r.get("peak_rss_mb")),
            r.get("note") or "",
        )
    console.print(t)


def history_marks(rows: list[dict], marks) -> list[tuple[int, float, float, dict]]:
    """(mark, median wall and CPU seconds of batches mark-1..mark+1, the mark's own row) per reported
    batch."""
    by_step = {r["step"]: r for r in rows}
    out = []
    for k in marks:
        near = [by_step[s] for s in (k - 1, k, k + 1) if s in by_step]
        out.append(
            (
                k,
                statistics.median(r["seconds"] for r in near),
                statistics.median(r["cpu_seconds"] for r in near),
                by_step[k],
            )
        )
    return out


def history_table(rows: list[dict], result: dict, console: Console) -> None:
    marks = [k for k in result["config"]["history_marks"] if any(r["step"] == k for r in rows)]
    found = history_marks(rows, marks)
    t = _table(
        f"history scaling: one {rows[0]['method']} stream of {len(rows)} batches of {rows[0]['batch_size']}",
        ("batch k", "s per batch", "CPU s", "ms per edit", *PHASES[:4], "state MB", "peak MB"),
        caption="s per batch (wall and CPU of this process): median of batches k-1..k+1; phases: ms per "
        "edit at batch k",
    )
    for k, wall, cpu, r in found:
        t.add_row(
            str(k),
            f"{wall:.3f}",
            f"{cpu:.3f}",
            f"{1000 * wall / r['n']:.1f}",
            *[_ms_per(r, p) for p in PHASES[:4]],
            f"{r['state_mb']:.2f}",
            _mb(r["peak_rss_mb"]),
        )
    console.print(t)
    (k0, s0, c0, r0), (k1, s1, c1, r1) = found[0], found[-1]
    console.print(
        f"history: batch {k1} / batch {k0}: wall {s1 / s0:.2f}x, CPU {c1 / c0:.2f}x; editor state "
        f"{r0['state_mb']:.2f} MB -> {r1['state_mb']:.2f} MB"
    )


def shards_table(rows: list[dict], result: dict, console: Console) -> None:
    t = _table(
        f"shard scaling: {rows[0]['method']} through the Ray runtime, batches of {rows[0]['batch_size']}",
        ("shards", "device", "edits timed", "edits/s", *PHASES, "set-up s", "run"),
        caption="edits/s and phases (ms per edit) over batches 2.. (the first waits for the actors to "
        "start); set-up: the rest of the run's wall time",
    )
    for r in rows:
        t.add_row(
            str(r["shards"]),
            r["device"],
            str(r["n"]),
            f"{r['rate']:.2f}",
            *[_ms_per(r, p) for p in PHASES],
            f"{r['setup_seconds']:.1f}",
            r["run_id"],
        )
    console.print(t)


def runtime_table(rows: list[dict], result: dict, console: Console) -> None:
    """Per batch: seconds per phase and the bytes shipped; per actor: its measured resident peaks
    beside the computed plan (:func:`lme_sim.sizing.memory_plan`)."""
    t = _table(
        "one batch through the runtime's actors",
        ("method", "weights", "shards", "batch", "s", *PHASES, "eval s", "deltas MB", "set-up s"),
        left=("method", "weights"),
        caption="phases: seconds for the batch (sync: the evaluator follows its deltas; eval: it scores "
        "a sample of the batch); deltas: shipped once to the driver and once to each evaluator "
        "(computed figure in brackets)",
    )
    for r in rows:
        rt, ph = r["runtime"], r["phases"]
        t.add_row(
            r["method"],
            rt["dtype"],
            str(r["shards"]),
            str(r["batch_size"]),
            f"{r['seconds']:.2f}",
            *["" if ph.get(p) is None else f"{ph[p]:.2f}" for p in PHASES],
            f"{ph['eval']:.2f}",
            f"{rt['bytes']['deltas_to_driver'] / 2**20:.1f} ({rt['plan']['deltas_mb']:.1f})",
            f"{r['setup_seconds']:.1f}",
        )
    console.print(t)
    t = _table(
        "resident memory per actor: measured (computed)",
        ("method", "weights", "actor", "layers", "start peak MB", "batch peak MB", "after MB"),
        left=("method", "weights", "actor"),
        caption="measured: each actor's VmHWM while it started (loading, set-up) and during the batch, "
        "its VmRSS after; computed: tensors only (lme_sim/sizing.py), the load peak and what it holds "
        "after; the interpreter, torch and Ray add a few hundred MB per process, activations more",
    )
    for r in rows:
        rt = r["runtime"]
        for actor, mem in rt["memory"].items():
            plan = rt["plan"].get(actor, {})
            layers = plan.get("layers")
            t.add_row(
                r["method"],
                rt["dtype"],
                actor,
                "" if layers is None else f"{layers[0]}-{layers[1]}",
                f"{mem['start_peak_mb']:.0f} ({plan.get('peak_mb', 0):.0f})",
                f"{mem['batch_peak_mb']:.0f} ({plan.get('resident_mb', 0):.0f})",
                f"{mem['rss_mb']:.0f} ({plan.get('resident_mb', 0):.0f})",
            )
    console.print(t)
