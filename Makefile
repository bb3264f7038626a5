# leakwatch: the two commands a newcomer runs are `make demo` and `make test`.
# Each creates its own virtualenv (.venv) and installs what it needs.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test lint typecheck system-deps kafka-libs bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

## The main job on the embedded default: broker, worker and synthetic feed on this machine.
demo: setup
	$(BIN)/leakwatch demo $(DEMO_ARGS)

## Everything CI runs: system packages, Kafka jars, lint, types, all tests.
test: setup system-deps kafka-libs lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

typecheck: setup
	$(BIN)/mypy schemas detectors

system-deps:
	bash scripts/install-system-deps.sh

kafka-libs:
	bash deploy/kafka/fetch.sh

bench: setup kafka-libs
	$(BIN)/python -m load_tests.bench_core
	$(BIN)/python -m load_tests.bench_e2e

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache artifacts
