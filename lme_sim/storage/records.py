"""Typed rows of the run database, one dataclass per table (:data:`~.schema.TABLES`): what the runtime
builds, and the only place where a row's fields are named. Records are keyword-only: a row of ten
fields is built by name, never by position. ``tests/test_storage.py`` checks that
every record has exactly its table's columns (``run_id`` is added by the logger)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(kw_only=True)
class BatchRecord:
    TABLE: ClassVar[str] = "batches"
    batch_id: int  # the run's one counter (docs/database.md)
    sim_time: dt.datetime
    n_edits: int
    seconds: float
    timings: dict[str, float]
    checkpoint: str | None  # the checkpoint written after this batch (None between checkpoints)
    committed_at: dt.datetime | None = None  # the logger's clock when None


@dataclass(kw_only=True)
class EditRecord:
    TABLE: ClassVar[str] = "edits"
    edit_id: int
    batch_id: int
    sim_time: dt.datetime
    kind: str
    case_id: str
    fact_key: str
    subject: str
    relation: str
    prompt: str
    target_new: str
    target_old: str | None
    supersedes: int | None
    modules: list[str]
    delta_norms: list[float]


@dataclass(kw_only=True)
class WeightStatRecord:
    TABLE: ClassVar[str] = "weight_stats"
    batch_id: int
    module: str
    frobenius: float
    spectral: float
    condition: float
    delta_norm: float
    cum_delta_norm: float


@dataclass(kw_only=True)
class ProbeRecord:
    TABLE: ClassVar[str] = "probes"
    eval_id: int
    batch_id: int  # the model scored is the one after this batch (-1: unedited)
    edit_id: int | None
    probe: str
    prompt: str
    target: str
    logprob: float
    token_acc: float
    correct: bool


@dataclass(kw_only=True)
class MetricRecord:
    TABLE: ClassVar[str] = "metrics"
    eval_id: int
    batch_id: int  # the model scored is the one after this batch (-1: unedited)
    name: str
    value: float
    n: int | None  # how many edits (or items) the value was computed over


@dataclass(kw_only=True)
class RejectedBatchRecord:
    TABLE: ClassVar[str] = "rejected_batches"
    after_batch: int
    sim_time: dt.datetime
    n_edits: int
    edit_ids: list[int]
    reason: str
    rejected_at: dt.datetime


RECORDS = (BatchRecord, EditRecord, WeightStatRecord, ProbeRecord, MetricRecord, RejectedBatchRecord)


def rows(records: list) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by table, as the logger's row dicts (fields left None are left to defaults)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        row = {k: v for k, v in dataclasses.asdict(r).items() if v is not None or k != "committed_at"}
        out.setdefault(r.TABLE, []).append(row)
    return out


def row(record) -> dict[str, Any]:
    return rows([record])[record.TABLE][0]
