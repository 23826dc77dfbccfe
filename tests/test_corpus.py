"""``lme-sim corpus``: key-statistics text from flat and nested CounterFact files."""

import json

from click.testing import CliRunner

from lme_sim.cli import main
from lme_sim.corpus import write_corpus

from .test_data import FLAT, nested_record


def test_corpus_command_flat_and_nested(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps([FLAT, {**FLAT, "case_id": 4, "ground_truth": "Dutch"}]))
    out = tmp_path / "corpus" / "flat.txt"
    r = CliRunner().invoke(main, ["corpus", "--from", str(flat), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"{out}\t4 lines"
    assert out.read_text().splitlines() == [
        "The mother tongue of Danielle Darrieux is French.",
        "Danielle Darrieux speaks French.",
        "The mother tongue of Danielle Darrieux is Dutch.",
        "Danielle Darrieux speaks Dutch.",
    ]
    nested = tmp_path / "nested.jsonl"
    nested.write_text("\n".join(json.dumps(nested_record(i)) for i in range(3)))
    path, n = write_corpus(nested, tmp_path / "nested.txt", records=2)
    lines = path.read_text().splitlines()
    assert n == len(lines) == 6  # the prompt and 2 paraphrases per record
    assert lines[:3] == [
        "Ada Lovelace is a citizen of United Kingdom.",
        "Ada Lovelace holds a passport from United Kingdom.",
        "Ada Lovelace's citizenship is United Kingdom.",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # written atomically


def test_corpus_command_errors(tmp_path):
    args = ["corpus", "--from", str(tmp_path / "none.json"), "--out", str(tmp_path / "o.txt")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "not found" in r.output and not (tmp_path / "o.txt").exists()
    r = CliRunner().invoke(main, ["corpus", "--from", "x.json", "--out", "o.txt", "--records", "0"])
    assert r.exit_code == 2
