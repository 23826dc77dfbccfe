"""The live table of a study's runs: one row per run, redrawn in place on a terminal.

Runs update their row from their own threads (:meth:`Board.update`); where the output is not a
terminal nothing is drawn (each run prints a plain line per evaluation instead,
:meth:`lme_sim.runtime.coordinator.Run._progress_line`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from rich.live import Live
from rich.table import Table


@dataclass
class RunProgress:
    """One run's row: what it edits, where it is, and since when."""

    what: str  # e.g. alphaedit on world:small
    total: int  # events of its stream
    status: str = "waiting"
    position: int = 0  # events done
    edits: int = 0  # edits committed
    started: float = field(default_factory=time.monotonic)


def board_table(rows: dict[str, RunProgress], now: float) -> Table:
    """The table of ``rows`` (run id -> its progress) at time ``now`` (``time.monotonic``)."""
    table = Table(title="runs", title_justify="left")
    for col, justify in (("run", "left"), ("editor", "left"), ("status", "left"), ("events", "right")):
        table.add_column(col, justify=justify)
    table.add_column("edits", justify="right")
    table.add_column("time", justify="right")
    for run_id, p in rows.items():
        share = f" ({p.position / p.total:.0%})" if p.total else ""
        running = p.status not in ("waiting", "finished", "failed")
        spent = f"{(now - p.started) / 60:.1f} min" if running else ""
        table.add_row(run_id, p.what, p.status, f"{p.position}/{p.total}{share}", str(p.edits), spent)
    return table


class Board:
    """The runs' rows, drawn live on ``console`` while the board is open (a terminal only)."""

    def __init__(self, console):
        self.console = console
        self.rows: dict[str, RunProgress] = {}
        self._lock = threading.Lock()
        self._live: Live | None = None

    def add(self, run_id: str, what: str, total: int) -> None:
        with self._lock:
            self.rows[run_id] = RunProgress(what, total)

    def update(self, run_id: str, **fields) -> None:
        """Set fields of a run's row (``status``, ``position``, ``edits``); ``status`` "starting" also
        starts its clock. A run without a row (it could not be prepared) has nothing to update."""
        with self._lock:
            p = self.rows.get(run_id)
            if p is None:
                return
            for k, v in fields.items():
                setattr(p, k, v)
            if fields.get("status") == "starting":
                p.started = time.monotonic()

    def table(self) -> Table:
        with self._lock:
            return board_table(dict(self.rows), time.monotonic())

    def __enter__(self) -> Board:
        if self.console.is_terminal:
            self._live = Live(console=self.console, get_renderable=self.table, refresh_per_second=2)
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
