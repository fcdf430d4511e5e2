# Two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test chaos lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## run: install and run the main job (the fullest demo that exists today)
run: $(STAMP)
	$(BIN)/tidelog demo

## test: install and run the whole suite, lint and type check included
test: $(STAMP)
	bash .ci/system-packages
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

## chaos: the long runs: chaos-marked tests, the stateful cluster tests' long profile, a mixed-fault run
chaos: $(STAMP)
	bash .ci/system-packages
	$(BIN)/python -m pytest -m chaos
	HYPOTHESIS_PROFILE=chaos $(BIN)/python -m pytest tests/e2e/test_cluster_stateful.py
	$(BIN)/tidelog chaos run --cluster failover --duration 600 --acks replicated \
		--nemesis kill,pause,partition,partition-etcd,corrupt,power-loss,eio,slow-fsync \
		--seed 7 --out chaos-runs/seed-7

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/tidelog bench storage

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
