# embedpipe: `make demo` and `make test` do everything on a fresh machine (see README.md).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
EP := $(VENV)/bin/embedpipe
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
STAMP := $(VENV)/.installed
BQ_VENV := $(VENV)/opt/bqemulator

.PHONY: help setup demo test test-unit test-integration test-e2e bench quality lint up down clean

help: ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-bqemulator.txt shared/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e shared
	test -x $(BQ_VENV)/bin/python || python3 -m venv $(BQ_VENV)
	$(BQ_VENV)/bin/python -m pip install -q -r requirements-bqemulator.txt || { rm -f $(BQ_VENV)/bin/bqemulator; \
	  echo "warning: bqemulator could not be installed here: the local stack runs without BigQuery"; }
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install pinned dependencies + the embedpipe package

demo: setup ## start the local stack, upload the demo dataset, wait for index-updated, print it
	$(EP) up
	$(EP) upload examples/demo/data --dataset demo --wait

test: setup ## every test tier: unit, integration (real emulators), e2e (whole loop on the local stack)
	$(PY) -m pytest tests -q -p no:cacheprovider

test-unit: setup ## unit tests only (fast: fakes only, no sockets, subprocesses or services)
	$(PY) -m pytest tests/unit -q

test-integration: setup ## integration tests (start their own emulators and Milvus Lite)
	$(PY) -m pytest tests/integration -q

test-e2e: setup ## end-to-end tests (start and stop their own local stack)
	$(PY) -m pytest tests/e2e -q

bench: setup ## benchmarks vs named baselines (same run); table + bench-results.json
	$(PY) -m bench.run $(SECTIONS)

quality: setup ## retrieval quality on a real BEIR set (EMBEDPIPE_QUALITY_DATA, default ../shared/data/cisi); table + quality-results.json
	$(PY) -m quality.run

lint: setup ## ruff lint + format check + import contracts (.importlinter: layers, no torch in functions, no cycles)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports

up: setup ## start the local stack
	$(EP) up

down: ## stop the local stack, leaving no process behind
	$(EP) down

clean: down ## stop the stack and delete local state
	rm -rf .embedpipe
