"""benchmarks/scale_1b.py with a tiny Llama, so that the 1B-scale runtime benchmark cannot rot (the same
code path: a random model folder, world cases and corpus, lme-sim bench's runtime section on 2 shard
actors and an evaluator, 16-bit weights with float32 masters); and the memory plan it prints beside the
measurements, against cluster/README.md's Llama-3-8B sizing. No timing is asserted."""

import importlib.util
import json
from pathlib import Path

import pytest

from lme_sim.data import counterfact_record, load_counterfact
from lme_sim.random_models import SHAPES, shape_config
from lme_sim.sizing import memory_plan, split_layers
from lme_sim.world import World, get_world_config

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9 / 2**20  # MB (2**20 bytes) per GB (1e9 bytes), the README's unit


def _script():
    spec = importlib.util.spec_from_file_location("scale_1b", ROOT / "benchmarks" / "scale_1b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scale_benchmark_runs_a_tiny_llama_through_the_runtime(tmp_path, ray_session):
    out, folder = tmp_path / "scale.json", tmp_path / "model"
    args = ["--shape", "tiny", "--folder", str(folder), "--dtypes", "bfloat16"]
    args += ["--ultraedit-batch", "4", "--alphaedit-batch", "2", "--corpus-sentences", "40"]
    args += ["--eval-cases", "2", "--out", str(out), "--db", str(tmp_path / "bench.duckdb")]
    assert _script().main(args) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["method"], r["batch_size"]) for r in rows] == [("ultraedit", 4), ("alphaedit", 2)]
    for r in rows:
        rt = r["runtime"]
        assert r["section"] == "runtime" and r["status"] == "ok" and rt["dtype"] == "bfloat16"
        assert {"keys", "solve", "apply", "sync", "eval"} <= set(r["phases"])
        # the deltas shipped are the computed ones: one float32 matrix per edited layer
        assert rt["bytes"]["deltas_to_driver"] == rt["plan"]["deltas_mb"] * 2**20 > 0
        assert set(rt["memory"]) == {"shard 0", "shard 1", "evaluator 0", "editor"}
        for mem in rt["memory"].values():
            assert mem["start_peak_mb"] > 0 and mem["batch_peak_mb"] > 0 and mem["rss_mb"] > 0
        assert rt["plan"]["shard 0"]["layers"] == [0, 1]  # (0, 1) in JSON
    assert "targets" in rows[1]["phases"]
    assert len(load_counterfact(folder / "cases.json")) == 4  # the folder keeps the cases it edited


def test_the_plan_reproduces_the_llama3_8b_sizing_table():
    """cluster/README.md, "Sizing": shard 0 holds 16 blocks (7.0 GB) and the embeddings and head
    (2.1 GB) in bf16, and the float32 master and first-seen copies of the 5 edited matrices (2.3 GB); the
    plan adds the copy saved before each batch (bf16, 0.59 GB), which the table leaves out. A batch's
    deltas: 1.17 GB per hop (docs/performance.md)."""
    plan = memory_plan(
        shape_config("llama3-8b"), shards=2, dtype="bfloat16", method="alphaedit", layers=[4, 5, 6, 7, 8]
    )
    shard0, shard1 = plan["shard 0"], plan["shard 1"]
    assert shard0["layers"] == (0, 15) and shard1["layers"] == (16, 31)
    assert shard0["weights_mb"] / GB == pytest.approx(7.0 + 2.1, abs=0.05)
    matrix = 4096 * 14336
    assert shard0["copies_mb"] * 2**20 == 5 * matrix * (4 + 4 + 2)
    assert shard1["copies_mb"] == 0
    assert plan["deltas_mb"] / GB == pytest.approx(1.17, abs=0.01)
    assert plan["evaluator 0"]["weights_mb"] / GB == pytest.approx(16.06, abs=0.01)  # 8.03B x 2 B
    # AlphaEdit: projector, accumulated and pending key covariance, 14336^2 float64 each, per layer
    assert plan["editor"]["resident_mb"] * 2**20 == 5 * 3 * 14336**2 * 8


def test_the_1b_shape_and_its_plan():
    """Llama-3.2-1B's shape: 1.24B parameters (tied embeddings counted once); float32 weights keep no
    master copies, 16-bit ones keep float32 masters on the shards and the evaluator."""
    config = shape_config("llama3.2-1b")
    fp32 = memory_plan(config, shards=2, dtype="float32", method="ultraedit", layers=[13, 14])
    bf16 = memory_plan(config, shards=2, dtype="bfloat16", method="ultraedit", layers=[13, 14])
    assert fp32["parameters"] == 1_235_814_400 and SHAPES["llama3.2-1b"]["tie_word_embeddings"]
    assert fp32["edited_matrix"] == (2048, 8192)
    matrix = 2048 * 8192
    assert fp32["shard 1"]["copies_mb"] * 2**20 == 2 * matrix * (4 + 4)  # first-seen + saved
    assert bf16["shard 1"]["copies_mb"] * 2**20 == 2 * matrix * (4 + 2 + 4)  # + the float32 master
    assert bf16["evaluator 0"]["copies_mb"] * 2**20 == 2 * matrix * (4 + 4)  # deltas' sum + master
    assert fp32["shard 0"]["load_mb"] == 2 * bf16["shard 0"]["load_mb"]  # each shard loads it all
    # a float32 checkpoint loaded in bfloat16: the float32 tensors and their bfloat16 copies
    converted = memory_plan(
        config, shards=2, dtype="bfloat16", method="ultraedit", layers=[13, 14], stored_dtype="float32"
    )
    assert converted["shard 0"]["load_mb"] == 3 * bf16["shard 0"]["load_mb"]
    assert converted["evaluator 0"]["weights_mb"] == bf16["evaluator 0"]["weights_mb"]
    assert fp32["editor"]["resident_mb"] == 0  # UltraEdit's normalizers are not counted


def test_split_layers():
    assert split_layers(4, 3) == [range(0, 1), range(1, 3), range(3, 4)]
    assert split_layers(16, 2) == [range(0, 8), range(8, 16)]
    with pytest.raises(ValueError):
        split_layers(4, 5)


def test_counterfact_record_reads_back(tmp_path):
    cases = World(get_world_config("default")).edit_cases(3, seed=0)
    f = tmp_path / "cases.json"
    f.write_text(json.dumps([counterfact_record(c) for c in cases]))
    back = load_counterfact(f)
    for c, b in zip(cases, back):
        assert (b.case_id, b.subject, b.prompt, b.target_new, b.target_true) == (
            c.case_id,
            c.subject,
            c.prompt,
            c.target_new,
            c.target_true,
        )
        assert b.paraphrases == c.paraphrases
        assert [p for p, _ in b.neighborhood] == [p for p, _ in c.neighborhood]
