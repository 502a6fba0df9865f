# Two set-up commands for a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-out
PROFILE ?= tiny
# Idle OpenMP threads sleep instead of spinning: several torch processes (SuperLink, sites, app processes, test
# workers) share few cores here, and spinning threads slowed every one of them several-fold.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: help venv samples test test-fast test-compose demo bench lint compose-check compose-demo compose-clean clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CPU build of torch pinned through constraints.txt: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet -c constraints.txt "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)  ## create .venv with the project and its dev tools

samples: $(STAMP)  ## fetch the real public sample images (cached)
	$(BIN)/invcoss samples fetch

test: $(STAMP)  ## create the environment, fetch the sample data, run the whole test suite
	$(BIN)/invcoss samples fetch
	INVCOSS_REQUIRE_SAMPLES=1 $(BIN)/python -m pytest -q --durations=15

test-fast: $(STAMP)  ## unit tests only (no multi-process integration tests)
	$(BIN)/python -m pytest -q -m "not integration"

demo: $(STAMP)  ## create the environment, fetch the sample data, run the federated demo on loopback
	$(BIN)/invcoss samples fetch
	$(BIN)/invcoss demo --profile $(PROFILE) --out $(DEMO_OUT)

bench: $(STAMP)  ## the method comparison (tiny smoke run; PROFILE=small for the real one)
	$(BIN)/invcoss bench --profile $(PROFILE) --out bench-out/$(PROFILE)

lint: $(STAMP)  ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

compose-check:  ## validate docker-compose.yml offline (needs Debian's docker-compose)
	docker-compose config -q

# Offline (no registry reachable, or INVCOSS_COMPOSE_OFFLINE=1): local base image, wheels and compose file first.
COMPOSE_ENV := PYTHON=$(abspath $(BIN)/python) INVCOSS=$(abspath $(BIN)/invcoss)

compose-demo: $(STAMP)  ## build and run the docker-compose federation to the end, print model/report/audit, tear down
	$(COMPOSE_ENV) deploy/scripts/compose-demo.sh all

compose-clean:  ## remove the compose federation's containers and volumes (its run state)
	$(COMPOSE_ENV) deploy/scripts/compose-demo.sh clean

test-compose: $(STAMP)  ## the compose federation's test alone (needs root: installs Docker from Debian when absent)
	$(BIN)/python -m pytest -q -m compose tests/deploy --durations=3   # setup of the first test: build + run

clean:  ## remove the environment and outputs (not the sample-data cache)
	rm -rf $(VENV) $(DEMO_OUT) bench-out compose-out .pytest_cache .mypy_cache .ruff_cache *.egg-info
