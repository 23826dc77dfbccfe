"""benchmarks/gpu_check.py on the CPU with a tiny Llama, so that the GPU check cannot rot: it runs from
the repository root with ``PYTHONPATH=.`` (as on the device machine, where lme-sim is not installed),
with Ray, vLLM and DuckDB made unimportable, and writes every figure."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the script as `python benchmarks/gpu_check.py ...`, with the runtime's packages unimportable
RUN = (
    "import runpy, sys; sys.modules.update(dict.fromkeys(['ray', 'duckdb', 'vllm'])); "
    "sys.argv = ['benchmarks/gpu_check.py', *sys.argv[1:]]; sys.path.insert(0, '.'); "
    "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')"
)


def test_gpu_check_runs_on_the_cpu_and_writes_every_figure(tmp_path):
    args = ["--shape", "tiny", "--device", "cpu", "--batch", "4", "--corpus-texts", "20"]
    args += ["--out", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LME_SIM_CACHE")}
    env |= {"PYTHONPATH": ".", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", RUN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed"] == []
    assert report["settings"]["shape"] == "tiny" and report["versions"]["torch"]
    assert report["machine"]["cpu_cores"] and report["peak_cuda_mb"] is None  # on the CPU
    figures = {
        "ultraedit": report["ultraedit"]["edits_per_s"],
        "alphaedit suffix": report["alphaedit"]["suffix"]["seconds"],
        "alphaedit reference": report["alphaedit"]["reference"]["seconds"],
        "memit": report["memit"]["seconds"],
        "mose": report["mose"]["seconds"],
        "probes": report["probes"]["probes_per_s"],
        "generation": report["generation"]["tokens_per_s"],
    }
    for name, value in figures.items():
        assert math.isfinite(value) and value > 0, name
    assert len(report["ultraedit"]["seconds"]) == 3
    assert report["model"]["parameters"] > 0
