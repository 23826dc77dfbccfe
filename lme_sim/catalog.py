"""Named public datasets: where each comes from, and the local folder it is downloaded into.

A scenario names one (``data: {kind: counterfact, source: counterfact-edit}``) instead of a path;
``lme-sim data get NAME`` downloads it into :func:`data_dir` (``$LME_SIM_DATA``, else
``$LME_SIM_CACHE/data``) and ``lme-sim data list`` shows what is there.

Checksums: a dataset whose sha256 is established from a public source (the files of a public git
repository at a pinned commit) is checked against it. The ROME/MEMIT files are served from their
project sites, with no published checksum that we found (and they could not be fetched where this was
written): their sha256 and size are recorded beside the file at the first download (``<file>.sha256``)
and checked thereafter; ``--sha256`` checks a digest you trust.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .paths import cache_root

_ROME = "https://rome.baulab.info/data/dsets"  # kmeng01/rome: util/globals.yml REMOTE_ROOT_URL
_MEMIT = "https://memit.baulab.info/data/dsets"  # kmeng01/memit: globals.yml REMOTE_ROOT_URL
# Jometeorie/KnowledgeSpread at a pinned commit: flat (EasyEdit) CounterFact edit/train splits, ZsRE
_KS = "https://raw.githubusercontent.com/Jometeorie/KnowledgeSpread/51d7402617c2e52bde0dc11b76e400c3725a181a/data"


class CatalogError(ValueError):
    """A dataset that is unknown, missing, or whose bytes differ from its checksum."""


@dataclass(frozen=True)
class Dataset:
    name: str
    kind: str  # the loader in lme_sim.data: counterfact | zsre | known_facts
    url: str
    # sha256 of the public file, where established from a public source; None: recorded at download
    sha256: str | None
    about: str

    @property
    def file(self) -> str:
        return self.url.rsplit("/", 1)[1]


DATASETS = {
    d.name: d
    for d in (
        Dataset(
            "counterfact",
            "counterfact",
            f"{_ROME}/counterfact.json",
            None,
            "CounterFact as ROME published it (nested format, several paraphrase and neighborhood prompts)",
        ),
        Dataset(
            "multi_counterfact",
            "counterfact",
            f"{_MEMIT}/multi_counterfact.json",
            None,
            "MEMIT's CounterFact (nested format; conflicting edits removed)",
        ),
        Dataset(
            "zsre",
            "zsre",
            f"{_ROME}/zsre_mend_eval.json",
            None,
            "ZsRE question answering in MEND's format, as ROME and MEMIT evaluate on it",
        ),
        Dataset(
            "known_1000",
            "known_facts",
            f"{_ROME}/known_1000.json",
            None,
            "ROME's facts GPT-2 XL knows (retention probes)",
        ),
        Dataset(
            "counterfact-edit",
            "counterfact",
            f"{_KS}/counterfact/counterfact-edit.json",
            "bfe31a7081932739406e282bb625d74222549c3386c15b1df3dfbc3978c69eec",
            "10,000 CounterFact cases, flat EasyEdit format (one paraphrase, one neighborhood prompt)",
        ),
        Dataset(
            "counterfact-train",
            "counterfact",
            f"{_KS}/counterfact/counterfact-train.json",
            "f7d443ffb0c5da6cbe816cdac45281ccb3f204b8a840f00d07a4aafa949bcd76",
            "10,000 CounterFact cases disjoint from counterfact-edit (training, key-statistics corpus)",
        ),
        Dataset(
            "zsre_mend_train-1k",
            "zsre",
            f"{_KS}/zsre/zsre_mend_train-1k.json",
            "e62596101d8ed551889c26c0d2a5277f92eaef3b14416d8eaee39b04a244ab60",
            "1,000 ZsRE records in MEND's format",
        ),
    )
}


def data_dir() -> Path:
    """``$LME_SIM_DATA``, else ``$LME_SIM_CACHE/data``."""
    env = os.environ.get("LME_SIM_DATA")
    return Path(env).expanduser() if env else cache_root() / "data"


def dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise CatalogError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    return DATASETS[name]


def local_path(name: str) -> Path:
    """Where dataset ``name`` is (or will be) in :func:`data_dir`."""
    return data_dir() / dataset(name).file


def resolve(name: str) -> Path:
    """The local file of dataset ``name``; a :class:`CatalogError` saying how to get it if absent."""
    path = local_path(name)
    if not path.is_file():
        raise CatalogError(
            f"dataset {name!r} is not in {data_dir()} (download it with: lme-sim data get {name})"
        )
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def expected(name: str) -> tuple[str | None, str]:
    """The sha256 the local file must have and where it comes from: "published" (the catalog),
    "recorded" (at its first download), or (None, "none")."""
    ds, path = dataset(name), local_path(name)
    if ds.sha256 is not None:
        return ds.sha256, "published"
    record = _record_path(path)
    if record.is_file():
        return record.read_text().split()[0], "recorded"
    return None, "none"


def verify(name: str, sha256: str | None = None) -> str:
    """Check the local file against ``sha256`` (if given) and against :func:`expected`; returns
    how it was checked. A :class:`CatalogError` where a digest differs."""
    path = resolve(name)
    digest = sha256_of(path)
    checks = []
    for want, how in ((sha256, "--sha256"), expected(name)):
        if want is None:
            continue
        if digest != want.lower():
            raise CatalogError(f"{path}: sha256 {digest} differs from the {how} one {want}")
        checks.append(how)
    return f"sha256 matches the {' and '.join(checks)} one" if checks else "no checksum to check against"


def get(name: str, url: str | None = None, sha256: str | None = None, progress: bool = True) -> Path:
    """Download dataset ``name`` (from ``url``, a mirror, else its source) into :func:`data_dir`
    unless it is there, and check it. The download goes to a temporary file renamed into place only
    once it is complete and its checksum matches (torch.hub's downloader), so an interrupted or
    failed download leaves nothing. Returns the local path."""
    from urllib.error import URLError

    from torch.hub import download_url_to_file

    ds, path = dataset(name), local_path(name)
    if not path.is_file():
        want = sha256 or ds.sha256
        path.parent.mkdir(parents=True, exist_ok=True)
        source = url or ds.url
        try:
            download_url_to_file(source, str(path), hash_prefix=want and want.lower(), progress=progress)
        except (URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise CatalogError(f"cannot download {name!r} from {source}: {reason}") from e
        except RuntimeError as e:  # torch.hub: "invalid hash value (expected ..., got ...)"
            raise CatalogError(f"{source}: the download's {e}; nothing was kept") from e
        if ds.sha256 is None:
            record = _record_path(path)
            tmp = record.with_name(record.name + ".tmp")
            tmp.write_text(f"{sha256_of(path)}  {path.stat().st_size}\n")
            os.replace(tmp, record)
    verify(name, sha256)
    return path


def listing() -> list[dict]:
    """One row per catalog dataset: name, kind, whether it is here, its size and checksum state."""
    rows = []
    for ds in DATASETS.values():
        path = local_path(ds.name)
        row = {"name": ds.name, "kind": ds.kind, "path": str(path), "source": ds.url, "about": ds.about}
        if path.is_file():
            row["size"] = path.stat().st_size
            try:
                row["status"] = verify(ds.name)
            except CatalogError as e:
                row["status"] = f"CHANGED: {e}"
        else:
            row["size"], row["status"] = None, "not downloaded"
        rows.append(row)
    return rows
