# totango-worker: every target sets itself up on a fresh machine (venv + locked install).
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed

# pytest's exit code 5 means it collected no tests: the suite went missing, which fails too.
define pytest
$(BIN)/pytest $(1) || { rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests" >&2; exit $$rc; }
endef

.PHONY: help install demo test unit lint worker flower bench bench-cluster faults lock clean
.PHONY: promtool ops-validate docker-lint

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the locked dependencies
	@true

demo: install ## Run the whole flow: embedded broker, gateway emulator, a real worker
	$(PY) -m worker demo

lint: install ## ruff (lint + format check), mypy --strict on worker/, the emulator and bench/, import layer contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint promtool ## Lint, then every test but the fault suite, in random order, with the coverage gate
	rm -f .coverage .coverage.*
	$(call pytest,-m "not faults" --cov --cov-report=term-missing:skip-covered)

# --- deployment files: ops/ and docker/ --------------------------------------------------
OPS_TESTS := tests/test_deploy_static.py tests/test_monitoring.py

promtool: ## Install promtool (Debian's prometheus package) if missing; starts no server
	@bash ops/prometheus/install-promtool.sh

ops-validate: install promtool ## Check ops/, docker/: schemas, yamllint, compose, promtool, dashboard; needs RabbitMQ on 127.0.0.1
	$(call pytest,$(OPS_TESTS))

docker-lint: install ## hadolint on docker/Dockerfile (every rule, no ignores)
	$(BIN)/hadolint --config docker/hadolint.yaml docker/Dockerfile

unit: install promtool ## Only the tests that need no broker
	$(call pytest,-m "not integration and not faults")

faults: install ## The fault-injection suite: kills, cuts, outages, poison, a 3-node cluster (~15 min)
	$(call pytest,tests/faults -m faults)

worker: install ## Run a worker with sane defaults (settings from TOTANGO_* variables)
	$(BIN)/celery -A worker.app worker --loglevel=INFO

flower: install ## Run Flower against the configured broker (set FLOWER_BASIC_AUTH=user:pass)
	@test -n "$$FLOWER_BASIC_AUTH" || { echo "set FLOWER_BASIC_AUTH=user:password first"; exit 2; }
	$(BIN)/celery -A worker.app flower --address=127.0.0.1 --port=5555

bench: install ## Throughput, CPU per event, latency and the state store's cost against the floors; writes docs/bench.png (~7 min)
	$(PY) -m bench.run $(BENCH_ARGS)

bench-cluster: install ## events/s of 1, 2, 4 workers on a 3-node RabbitMQ cluster of its own (~4 min)
	$(PY) -m bench.cluster $(BENCH_ARGS)

lock: ## Re-pin requirements.lock (the worker extra, the image), requirements-dev.lock, requirements-producer.lock
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra worker --extra flower --python-version 3.11 --generate-hashes -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra worker --extra dev --python-version 3.11 --generate-hashes -o requirements-dev.lock
	$(BIN)/uv pip compile pyproject.toml --python-version 3.11 --generate-hashes -o requirements-producer.lock

clean: ## Remove the venv and generated files
	rm -rf $(VENV) .demo .bench .mypy_cache .ruff_cache .pytest_cache .hypothesis tests/node/node_modules
