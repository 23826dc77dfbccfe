"""Dataset loaders: CounterFact, ZsRE and ROME known facts, each read into a list of :class:`EditCase`.

Every loader accepts a local ``.json`` / ``.jsonl`` path or a ``datasets`` hub id, and reports bad
input as a :class:`DataError` that names the file, the record and the field.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from lme_sim.cases import EditCase

log = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "counterfact_record",
    "load_cases",
    "load_counterfact",
    "load_known_facts",
    "load_zsre",
]

ZsreTarget = Literal["answers", "alt"]

_LOCAL_SUFFIXES = (".json", ".jsonl", ".ndjson")
_TYPE_NAMES = {str: "string", int: "integer", list: "list", dict: "object"}
_MISSING = object()


class DataError(ValueError):
    """A dataset file or spec that cannot be read into edit cases."""


# --------------------------------------------------------------------------- reading records


def looks_local(path_or_id: str | Path) -> bool:
    """True where the argument can only be meant as a local file (never tried as a hub id)."""
    if isinstance(path_or_id, Path):
        return True
    s = str(path_or_id)
    return s.lower().endswith(_LOCAL_SUFFIXES) or s.startswith(("/", "./", "../", "~"))


def _read_json_file(kind: str, path: Path) -> Iterator[tuple[str, Any]]:
    """(label, record) pairs from a JSON list file or a JSON-lines file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{kind}: cannot read file '{path}': {e}") from e
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return _parse_jsonl(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {_type_name(type(data))}")
    return ((f"record {i}", r) for i, r in enumerate(data))


def _parse_jsonl(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """(label, record) pairs from JSON-lines text; blank lines are ignored."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {lineno} column {e.colno}: {e.msg}") from e
    return iter(rows)


def _read_datasets(kind: str, source: str, split: str) -> Iterator[tuple[str, Any]]:
    """(label, record) pairs through ``datasets`` (imported lazily): a hub id (``name`` or
    ``owner/name``), a local folder of data files, or a folder written by ``save_to_disk``."""
    folder = Path(source).expanduser()
    try:
        import datasets

        if folder.is_dir() and any((folder / f).is_file() for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(str(folder))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - any failure means "could not load"
        where = "the local datasets folder" if folder.is_dir() else "a datasets hub id"
        raise DataError(
            f"{kind}: '{source}' is not a local file, and could not be loaded as {where} "
            f"(split {split!r}): {type(e).__name__}: {e}"
        ) from e
    return ((f"record {i}", r) for i, r in enumerate(ds))


def _read_raw(kind: str, path_or_id: str | Path, split: str) -> tuple[str, Iterator[tuple[str, Any]]]:
    """The display name of the source and its (label, raw record) pairs."""
    path = Path(path_or_id).expanduser()
    if path.is_file():
        return str(path_or_id), _read_json_file(kind, path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{kind}: '{path_or_id}' is not a file")
    if not path.exists() and looks_local(path_or_id):
        raise DataError(f"{kind}: file '{path_or_id}' not found")
    return f"{path_or_id}[{split}]", _read_datasets(kind, str(path_or_id), split)


def _type_name(t: type | tuple[type, ...]) -> str:
    types = t if isinstance(t, tuple) else (t,)
    return " or ".join(_TYPE_NAMES.get(x, x.__name__) for x in types)


class _Record:
    """One raw record plus where it came from, with checked field access."""

    def __init__(self, where: str, data: Mapping[str, Any]) -> None:
        self.where = where
        self.data = data

    @classmethod
    def of(cls, where: str, data: Any, id_field: str | None) -> _Record:
        """Wrap one raw record, adding its id (where it has one) to the location."""
        if not isinstance(data, Mapping):
            raise DataError(f"{where}: expected an object, got {_type_name(type(data))}")
        if id_field is not None and data.get(id_field) is not None:
            where += f" ({id_field} {data[id_field]})"
        return cls(where, data)

    def error(self, msg: str) -> DataError:
        return DataError(f"{self.where}: {msg}")

    def get(self, field: str, typ: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        """The value at dotted ``field``, checked against ``typ``; ``default`` where absent."""
        value: Any = self.data
        walked: list[str] = []
        for part in field.split("."):
            if not isinstance(value, Mapping):
                raise self.error(f"field '{'.'.join(walked)}' must be object, got {_type_name(type(value))}")
            walked.append(part)
            if value.get(part) is None:  # absent, or null in the file / hub schema
                if default is _MISSING:
                    raise self.error(f"missing field '{'.'.join(walked)}'")
                return default
            value = value[part]
        if not _is_instance(value, typ):
            raise self.error(f"field '{field}' must be {_type_name(typ)}, got {_type_name(type(value))}")
        return value

    def text(self, field: str, default: Any = _MISSING) -> Any:
        """A non-empty string field."""
        value = self.get(field, str, default)
        if isinstance(value, str) and not value.strip():
            raise self.error(f"field '{field}' is empty")
        return value

    def target(self, field: str, default: Any = _MISSING) -> Any:
        """A target string, stored without the leading space that scoring adds."""
        value = self.text(field, default)
        return value.strip() if isinstance(value, str) else value

    def texts(self, field: str, default: Any = _MISSING) -> tuple[str, ...]:
        """A list of strings, as a tuple; ``default`` where absent."""
        values = self.get(field, list, default)
        if values is default:
            return values
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise self.error(f"field '{field}[{i}]' must be string, got {_type_name(type(v))}")
        return tuple(values)

    def pair(self, prompt_field: str, answer_field: str) -> tuple[tuple[str, str], ...]:
        """An optional ``(prompt, answer)`` probe; the answer is required once the prompt is there."""
        prompt = self.text(prompt_field, None)
        return () if prompt is None else ((prompt, self.target(answer_field)),)

    def case(self, **fields: Any) -> EditCase:
        """An :class:`EditCase`, with its own validation errors located at this record."""
        try:
            return EditCase(**fields)
        except ValueError as e:
            raise self.error(str(e)) from e


def _is_instance(value: Any, typ: type | tuple[type, ...]) -> bool:
    types = typ if isinstance(typ, tuple) else (typ,)
    if isinstance(value, bool) and bool not in types:
        return False
    if dict in types and isinstance(value, Mapping):
        return True
    return isinstance(value, types)


def _records(kind: str, path_or_id: str | Path, split: str, id_field: str | None) -> Iterator[_Record]:
    """Checked records of a file or hub dataset; ``id_field`` names the record id shown in errors."""
    name, raw = _read_raw(kind, path_or_id, split)  # eager: a missing file fails even with limit=0
    return (_Record.of(f"{name}: {label}", data, id_field) for label, data in raw)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DataError(f"limit must be a non-negative integer or None, got {limit!r}")


def _take(cases: Iterable[EditCase | None], limit: int | None) -> list[EditCase]:
    """The first ``limit`` cases (all where None), dropping skipped (None) records."""
    _check_limit(limit)
    out: list[EditCase] = []
    if limit == 0:
        return out
    for case in cases:
        if case is None:
            continue
        out.append(case)
        if limit is not None and len(out) >= limit:
            break
    return out


# --------------------------------------------------------------------------- CounterFact


def load_counterfact(
    path_or_id: str | Path, limit: int | None = None, *, split: str = "train"
) -> list[EditCase]:
    """CounterFact edits, from the flat EasyEdit json or the nested ROME/MEMIT format (detected per file)."""
    return _take(_counterfact_cases(_records("counterfact", path_or_id, split, "case_id")), limit)


def _counterfact_cases(records: Iterator[_Record]) -> Iterator[EditCase]:
    nested: bool | None = None
    for rec in records:
        if nested is None:  # the first record decides the format of the whole file
            nested = "requested_rewrite" in rec.data
        yield _counterfact_nested(rec) if nested else _counterfact_flat(rec)


def _counterfact_flat(rec: _Record) -> EditCase:
    """One record of the flat EasyEdit format."""
    return rec.case(
        case_id=str(rec.get("case_id", (int, str))),
        subject=rec.text("subject"),
        prompt=rec.text("prompt"),
        target_new=rec.target("target_new"),
        target_true=rec.target("ground_truth", None),
        paraphrases=tuple(p for p in [rec.text("rephrase_prompt", None)] if p is not None),
        neighborhood=rec.pair("locality_prompt", "locality_ground_truth"),
        source="counterfact",
        meta={"format": "flat"},
    )


def _counterfact_nested(rec: _Record) -> EditCase:
    """One record of ROME ``counterfact.json`` / MEMIT ``multi_counterfact.json``."""
    rw = "requested_rewrite"
    subject = rec.text(f"{rw}.subject")
    template = rec.text(f"{rw}.prompt")
    if "{}" not in template:
        raise rec.error(f"field '{rw}.prompt' must be a template containing '{{}}', got {template!r}")
    target_true = rec.target(f"{rw}.target_true.str")
    meta: dict[str, Any] = {"format": "nested", "template": template}
    for key in ("generation_prompts", "attribute_prompts"):
        if key in rec.data:
            meta[key] = list(rec.texts(key, ()))
    return rec.case(
        case_id=str(rec.get("case_id", (int, str))),
        subject=subject,
        prompt=template.replace("{}", subject),
        target_new=rec.target(f"{rw}.target_new.str"),
        target_true=target_true,
        relation=rec.get(f"{rw}.relation_id", str, ""),
        paraphrases=rec.texts("paraphrase_prompts", ()),
        neighborhood=tuple((p, target_true) for p in rec.texts("neighborhood_prompts", ())),
        source="counterfact",
        meta=meta,
    )


def counterfact_record(case: EditCase) -> dict[str, Any]:
    """``case`` as a record of the nested ROME format, which :func:`load_counterfact` reads back (the
    neighborhood prompts' answers become the case's true object, as in CounterFact): how synthetic
    cases (the embedded world's) become a file for what reads CounterFact files, e.g. ``lme-sim bench
    --data``."""
    return {
        "case_id": case.case_id,
        "requested_rewrite": {
            "prompt": case.prompt.replace(case.subject, "{}", 1),
            "subject": case.subject,
            "relation_id": case.relation,
            "target_new": {"str": case.target_new},
            "target_true": {"str": case.target_true if case.target_true is not None else case.target_new},
        },
        "paraphrase_prompts": list(case.paraphrases),
        "neighborhood_prompts": [p for p, _ in case.neighborhood],
    }


# --------------------------------------------------------------------------- ZsRE


def load_zsre(
    path_or_id: str | Path,
    target: ZsreTarget = "answers",
    limit: int | None = None,
    *,
    split: str = "train",
) -> list[EditCase]:
    """ZsRE (MEND json) edits toward ``answers[0]`` (MEMIT/AlphaEdit) or ``alt`` (EasyEdit).

    The choice is recorded in each case's ``meta["zsre_target"]``. Records that cannot be edited
    (subject absent from ``src`` even case-insensitively; empty ``alt`` in "alt" mode) are skipped,
    and the counts are logged as a warning.
    """
    if target not in ("answers", "alt"):
        raise DataError(f"zsre: target must be 'answers' or 'alt', got {target!r}")
    skips: Counter[str] = Counter()
    seen = 0
    records = _records("zsre", path_or_id, split, None)

    def cases() -> Iterator[EditCase | None]:
        nonlocal seen
        for index, rec in enumerate(records):
            seen += 1
            case = _zsre_case(rec, index, target)
            if isinstance(case, str):
                skips[case] += 1
                case = None
            yield case

    out = _take(cases(), limit)
    if skips:
        reasons = ", ".join(f"{n} {why}" for why, n in skips.items())
        log.warning(
            "zsre: skipped %d of %d records in %s (%s)", sum(skips.values()), seen, path_or_id, reasons
        )
    return out


def _zsre_case(rec: _Record, index: int, target: ZsreTarget) -> EditCase | str:
    """One MEND-format record, or the reason it is skipped."""
    src = rec.text("src")
    subject = _find_subject(rec.text("subject"), src)
    if subject is None:
        return "subject not in src"
    answers = rec.texts("answers")
    if not answers:
        raise rec.error("field 'answers' is empty")
    answer = answers[0].strip()
    if target == "alt":
        if not rec.get("alt", str).strip():
            return "empty alt"
        target_new, target_true = rec.target("alt"), answer
    else:
        target_new, target_true = answer, rec.target("pred", None)
    meta = {"zsre_target": target, "answers": [a.strip() for a in answers]}
    if subject != rec.data["subject"]:
        meta["subject_original"] = rec.data["subject"]
    return rec.case(
        case_id=str(index),
        subject=subject,
        prompt=src,
        target_new=target_new,
        target_true=target_true,
        paraphrases=tuple(p for p in [rec.text("rephrase", None)] if p is not None),
        neighborhood=rec.pair("loc", "loc_ans"),
        source="zsre",
        meta=meta,
    )


def _find_subject(subject: str, prompt: str) -> str | None:
    """``subject`` as it appears in ``prompt`` (matched case-insensitively), or None."""
    if subject in prompt:
        return subject
    m = re.search(re.escape(subject), prompt, flags=re.IGNORECASE)
    return prompt[m.start() : m.end()] if m else None


# --------------------------------------------------------------------------- known facts


def load_known_facts(
    path_or_id: str | Path, limit: int | None = None, *, split: str = "train"
) -> list[EditCase]:
    """ROME ``known_1000.json``: facts the model already knows (``target_new == target_true``), for
    retention probes."""
    return _take(map(_known_case, _records("known_facts", path_or_id, split, "known_id")), limit)


def _known_case(rec: _Record) -> EditCase:
    attribute = rec.target("attribute")
    meta = {k: v for k in ("template", "prediction") if (v := rec.get(k, str, None)) is not None}
    return rec.case(
        case_id=str(rec.get("known_id", (int, str))),
        subject=rec.text("subject"),
        prompt=rec.text("prompt"),
        target_new=attribute,
        target_true=attribute,
        relation=rec.get("relation_id", str, ""),
        source="known_facts",
        meta=meta,
    )


# --------------------------------------------------------------------------- dispatcher

_LOADERS: dict[str, Callable[..., list[EditCase]]] = {
    "counterfact": load_counterfact,
    "zsre": load_zsre,
    "known_facts": load_known_facts,
}


def file_kind(path: str | Path) -> str:
    """ "zsre" or "counterfact": the kind of a local json / jsonl file, read from its first record (a
    ZsRE (MEND) record has ``src``)."""
    with Path(path).expanduser().open(encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip().lstrip("[").lstrip()
    try:
        record, _ = json.JSONDecoder().raw_decode(head)
    except json.JSONDecodeError:
        record = {}
    return "zsre" if isinstance(record, dict) and "src" in record else "counterfact"


def load_cases(spec: str | Mapping[str, Any]) -> list[EditCase]:
    """Load cases from a local CounterFact / ZsRE file (its kind: :func:`file_kind`), ``"kind:path"``
    or ``{"kind": ..., "path": ..., "limit": ..., **options}``.

    Kinds: counterfact, zsre, known_facts. Options are the loader's keyword arguments
    (``target`` for zsre, ``split`` for hub ids).
    """
    if isinstance(spec, str) and Path(spec).expanduser().is_file():
        spec = {"kind": file_kind(spec), "path": spec}
    if isinstance(spec, str):
        kind, sep, path = spec.partition(":")
        if not sep or not path:
            raise DataError(f"data spec {spec!r} must look like 'kind:path' (kinds: {', '.join(_LOADERS)})")
        spec = {"kind": kind, "path": path}
    if not isinstance(spec, Mapping):
        raise DataError(f"data spec must be a string or a mapping, got {type(spec).__name__}")
    options = dict(spec)
    kind = options.pop("kind", None)
    if kind == "world":
        raise NotImplementedError(
            "kind 'world' (the synthetic world) is loaded by lme_sim.world, not lme_sim.data"
        )
    if not isinstance(kind, str) or kind not in _LOADERS:
        raise DataError(f"data spec: unknown kind {kind!r} (kinds: {', '.join(_LOADERS)})")
    if "path" not in options:
        raise DataError(f"data spec for {kind!r}: missing field 'path'")
    loader = _LOADERS[kind]
    allowed = set(inspect.signature(loader).parameters) - {"path_or_id"}
    unknown = set(options) - allowed - {"path"}
    if unknown:
        raise DataError(
            f"data spec for {kind!r}: unknown field(s) {sorted(unknown)} "
            f"(allowed: {sorted(allowed | {'path'})})"
        )
    return loader(options.pop("path"), **options)
