"""Tests for lme_sim.data: the real shared files (skipped when absent) and small synthetic ones."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lme_sim.cases import EditCase
from lme_sim.data import DataError, load_cases, load_counterfact, load_known_facts, load_zsre

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"shared data file {path} not present")
    return path


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def nested_record(case_id=7, **rewrite) -> dict:
    rr = {
        "prompt": "{} is a citizen of",
        "subject": "Ada Lovelace",
        "relation_id": "P27",
        "target_new": {"str": "France", "id": "Q142"},
        "target_true": {"str": " United Kingdom", "id": "Q145"},
    }
    rr.update(rewrite)
    return {
        "case_id": case_id,
        "requested_rewrite": rr,
        "paraphrase_prompts": ["Ada Lovelace holds a passport from", "Ada Lovelace's citizenship is"],
        "neighborhood_prompts": ["Charles Babbage is a citizen of", "Alan Turing is a citizen of"],
        "attribute_prompts": ["Marie Curie is a citizen of"],
        "generation_prompts": ["Ada Lovelace was born in"],
    }


FLAT = {
    "case_id": 3,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "subject": "Danielle Darrieux",
    "target_new": "English",
    "ground_truth": "French",
    "rephrase_prompt": "Danielle Darrieux speaks",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}

ZSRE = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniforms",
    "rephrase": "What will be the product of UniFirst?",
    "alt": " unmanned aircraft",
    "answers": ["uniform", "work clothes"],
    "loc": "nq question: who plays walter",
    "loc_ans": "John Goodman",
}


# --------------------------------------------------------------------------- real shared files


def test_real_counterfact_flat():
    cases = load_counterfact(shared_file("counterfact-edit.json"))
    assert len(cases) == 10_000
    c = cases[0]
    assert isinstance(c, EditCase) and c.source == "counterfact"
    assert c.case_id == "0" and c.subject in c.prompt
    assert (c.target_new, c.target_true) == ("English", "French")
    assert len(c.paraphrases) == 1 and len(c.neighborhood) == 1
    assert all(not x.target_new.startswith(" ") for x in cases)


def test_real_counterfact_limit():
    assert len(load_counterfact(shared_file("counterfact-train.json"), limit=25)) == 25


def test_real_zsre_both_targets():
    path = shared_file("zsre_mend_train-1k.json")
    by_answers = load_zsre(path, target="answers")
    by_alt = load_zsre(path, target="alt")
    raws = json.loads(path.read_text())
    assert len(by_answers) == 1000
    assert len(by_alt) == sum(1 for r in raws if r["alt"].strip())  # two records have an empty alt
    raw = raws[0]
    a, b = by_answers[0], by_alt[0]
    assert a.target_new == raw["answers"][0] and a.target_true == raw["pred"]
    assert b.target_new == raw["alt"].strip() and b.target_true == raw["answers"][0]
    assert a.meta["zsre_target"] == "answers" and b.meta["zsre_target"] == "alt"
    assert all(c.subject in c.prompt for c in by_alt)
    assert all(not c.target_new.startswith(" ") for c in by_alt)


def test_real_known_facts():
    cases = load_known_facts(shared_file("known_1000.json"))
    assert len(cases) == 1209
    c = cases[0]
    assert c.target_new == c.target_true == "Antarctica"
    assert c.prompt == "Vinson Massif is located in the continent of" and c.relation == "P30"
    assert c.source == "known_facts" and c.meta["template"] == "{} is located in the continent"


# --------------------------------------------------------------------------- synthetic files


def test_counterfact_nested(tmp_path):
    path = write_json(tmp_path / "multi_counterfact.json", [nested_record(7), nested_record(8)])
    cases = load_counterfact(path)
    assert [c.case_id for c in cases] == ["7", "8"]
    c = cases[0]
    assert c.prompt == "Ada Lovelace is a citizen of" and c.subject == "Ada Lovelace"
    assert (c.target_new, c.target_true, c.relation) == ("France", "United Kingdom", "P27")
    assert len(c.paraphrases) == 2
    assert c.neighborhood == (
        ("Charles Babbage is a citizen of", "United Kingdom"),
        ("Alan Turing is a citizen of", "United Kingdom"),
    )
    assert c.meta["generation_prompts"] == ["Ada Lovelace was born in"]
    assert c.meta["template"] == "{} is a citizen of"


def test_counterfact_flat_jsonl(tmp_path):
    path = tmp_path / "cf.jsonl"
    path.write_text(json.dumps(FLAT) + "\n\n" + json.dumps({**FLAT, "case_id": 4}) + "\n")
    cases = load_counterfact(path)
    assert [c.case_id for c in cases] == ["3", "4"]
    assert cases[0].paraphrases == ("Danielle Darrieux speaks",)
    assert cases[0].neighborhood == (("Michel Rocard is a native speaker of", "French"),)


def test_zsre_target_option(tmp_path):
    path = write_json(tmp_path / "zsre.json", [ZSRE])
    (a,) = load_zsre(path)  # default: answers[0] (MEMIT/AlphaEdit)
    (b,) = load_zsre(path, target="alt")  # EasyEdit
    assert (a.target_new, a.target_true, a.meta["zsre_target"]) == ("uniform", "uniforms", "answers")
    assert (b.target_new, b.target_true, b.meta["zsre_target"]) == ("unmanned aircraft", "uniform", "alt")
    assert a.paraphrases == (ZSRE["rephrase"],) and a.neighborhood == ((ZSRE["loc"], "John Goodman"),)
    assert a.source == "zsre" and a.meta["answers"] == ["uniform", "work clothes"]
    (c,) = load_zsre(write_json(tmp_path / "nopred.json", [{k: v for k, v in ZSRE.items() if k != "pred"}]))
    assert c.target_true is None
    with pytest.raises(DataError, match="target"):
        load_zsre(path, target="pred")


def test_zsre_subject_matching_and_skips(tmp_path, caplog):
    records = [
        {**ZSRE, "subject": "unifirst"},  # case-insensitive match: uses the spelling in src
        {**ZSRE, "subject": "Acme Corp"},  # absent: skipped
        {**ZSRE, "alt": ""},  # empty alt: skipped in "alt" mode only
        ZSRE,
    ]
    path = write_json(tmp_path / "zsre.json", records)
    with caplog.at_level(logging.WARNING, logger="lme_sim.data"):
        cases = load_zsre(path)
    assert [c.case_id for c in cases] == ["0", "2", "3"]
    assert cases[0].subject == "UniFirst" and cases[0].meta["subject_original"] == "unifirst"
    assert "skipped 1 of 4" in caplog.text and "subject not in src" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lme_sim.data"):
        cases = load_zsre(path, target="alt")
    assert [c.case_id for c in cases] == ["0", "3"]
    assert "skipped 2 of 4" in caplog.text and "1 empty alt" in caplog.text


def test_load_cases_dispatch(tmp_path):
    path = write_json(tmp_path / "cf.json", [nested_record(1), nested_record(2), nested_record(3)])
    assert len(load_cases(f"counterfact:{path}")) == 3
    assert len(load_cases({"kind": "counterfact", "path": str(path), "limit": 2})) == 2
    zpath = write_json(tmp_path / "z.json", [ZSRE])
    (c,) = load_cases({"kind": "zsre", "path": zpath, "target": "alt"})
    assert c.meta["zsre_target"] == "alt"
    with pytest.raises(NotImplementedError, match="lme_sim.world"):
        load_cases({"kind": "world", "path": "x"})
    with pytest.raises(DataError, match="unknown kind"):
        load_cases("wikidata:x.json")
    with pytest.raises(DataError, match="target"):
        load_cases({"kind": "counterfact", "path": str(path), "target": "alt"})
    with pytest.raises(DataError, match="kind:path"):
        load_cases("counterfact")


def test_datasets_folders_load_for_real(tmp_path):
    """The ``datasets`` path with real local datasets: a folder written by ``save_to_disk`` and a
    folder of data files (what ``load_dataset`` reads as it would a hub id's files)."""
    import datasets

    records = [nested_record(5), nested_record(6)]
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(records).save_to_disk(str(saved))
    files = tmp_path / "files"
    files.mkdir()
    (files / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    for folder in (saved, files):
        cases = load_counterfact(str(folder))
        assert [c.case_id for c in cases] == ["5", "6"] and cases[0].subject == records[0][
            "requested_rewrite"
        ]["subject"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="could not be loaded as the local datasets folder"):
        load_counterfact(str(tmp_path / "empty"))  # a folder with no data files


def test_namespaced_hub_id_passes_validation(tmp_path, monkeypatch):
    """``owner/name`` that is not a local file is a hub id: validation accepts it (it used to call it a
    missing file); loading it offline fails with one clear DataError."""
    from lme_sim.preflight import load_checked

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets  # read at import: where an earlier test imported it, offline is set on it too
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # not 20 s of retries
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: s\nmodel: world:small\ndata: {kind: counterfact, path: someone/counterfact, n_edits: 5}\n"
    )
    assert load_checked(path).data.path == "someone/counterfact"
    path.write_text(
        "name: s\nmodel: world:small\ndata: {kind: counterfact, path: ./missing.json, n_edits: 5}\n"
    )
    with pytest.raises(Exception, match="field 'data.path': file './missing.json' not found"):
        load_checked(path)
    with pytest.raises(DataError, match="'someone/missing' is not a local file.*hub id"):
        load_counterfact("someone/missing")


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"counterfact: file '.*x\.json' not found"):
        load_counterfact(tmp_path / "x.json")
    with pytest.raises(DataError, match=r"zsre: file 'nope\.jsonl' not found"):
        load_zsre("nope.jsonl")
    with pytest.raises(DataError, match=r"known_facts: file '\./k\.json' not found"):
        load_known_facts("./k.json", limit=0)  # reported even when nothing is asked for


def test_bad_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"case_id": 1,\n   "prompt": }\n]')
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON at line 3 column"):
        load_counterfact(path)
    jl = tmp_path / "bad.jsonl"
    jl.write_text(json.dumps(FLAT) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: invalid JSON at line 2 column 2"):
        load_counterfact(jl)
    with pytest.raises(DataError, match=r"top\.json: expected a JSON list of records, got object"):
        load_counterfact(write_json(tmp_path / "top.json", {"a": 1}))


def test_missing_field(tmp_path):
    flat = [FLAT, {k: v for k, v in FLAT.items() if k != "target_new"} | {"case_id": 42}]
    with pytest.raises(DataError, match=r"cf\.json: record 1 \(case_id 42\): missing field 'target_new'"):
        load_counterfact(write_json(tmp_path / "cf.json", flat))
    rec = nested_record(9)
    del rec["requested_rewrite"]["target_true"]
    with pytest.raises(
        DataError, match=r"record 0 \(case_id 9\): missing field 'requested_rewrite.target_true'"
    ):
        load_counterfact(write_json(tmp_path / "nested.json", [rec]))
    with pytest.raises(DataError, match=r"k\.json: record 0 \(known_id 0\): missing field 'attribute'"):
        load_known_facts(write_json(tmp_path / "k.json", [{"known_id": 0, "subject": "A", "prompt": "A is"}]))
    with pytest.raises(DataError, match=r"z\.json: record 0: missing field 'answers'"):
        load_zsre(write_json(tmp_path / "z.json", [{k: v for k, v in ZSRE.items() if k != "answers"}]))
    with pytest.raises(DataError, match=r"l\.json: record 0 .*missing field 'locality_ground_truth'"):
        load_counterfact(
            write_json(tmp_path / "l.json", [{k: v for k, v in FLAT.items() if k != "locality_ground_truth"}])
        )


def test_wrong_type(tmp_path):
    with pytest.raises(DataError, match=r"z\.json: record 0: field 'answers' must be list, got string"):
        load_zsre(write_json(tmp_path / "z.json", [{**ZSRE, "answers": "uniform"}]))
    with pytest.raises(
        DataError, match=r"cf\.json: record 0 \(case_id 3\): field 'target_new' must be string, got integer"
    ):
        load_counterfact(write_json(tmp_path / "cf.json", [{**FLAT, "target_new": 5}]))
    rec = nested_record(1)
    rec["paraphrase_prompts"] = ["ok", 3]
    with pytest.raises(
        DataError, match=r"n\.json: .*field 'paraphrase_prompts\[1\]' must be string, got integer"
    ):
        load_counterfact(write_json(tmp_path / "n.json", [rec]))
    with pytest.raises(DataError, match=r"r\.json: record 0: expected an object, got list"):
        load_counterfact(write_json(tmp_path / "r.json", [[1, 2]]))


def test_other_record_errors(tmp_path):
    with pytest.raises(DataError, match=r"s\.json: record 0 \(case_id 3\): .*subject"):
        load_counterfact(write_json(tmp_path / "s.json", [{**FLAT, "subject": "Someone Else"}]))
    with pytest.raises(DataError, match=r"t\.json: .*'requested_rewrite.prompt' must be a template"):
        load_counterfact(
            write_json(tmp_path / "t.json", [nested_record(1, prompt="Ada Lovelace is a citizen of")])
        )
    with pytest.raises(DataError, match=r"e\.json: .*field 'target_new' is empty"):
        load_counterfact(write_json(tmp_path / "e.json", [{**FLAT, "target_new": "  "}]))
    with pytest.raises(DataError, match="limit"):
        load_counterfact(write_json(tmp_path / "ok.json", [FLAT]), limit=-1)
