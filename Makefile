# The two commands of the README. Each installs what is missing first (scripts/install.sh is idempotent).
VENV   ?= .venv
BIN    := $(VENV)/bin
DURATION ?= 60
DEMO_FLAGS ?=

.PHONY: install demo test lint typecheck unit integration long bench clean

install:
	bash scripts/install.sh

## The main job: a local two-datacenter sandbox (bj -> 20 ms link -> gz) running the whole pipeline.
demo: install
	$(BIN)/wmb sandbox demo --up --duration $(DURATION) $(DEMO_FLAGS)

## Every check CI runs: lint, types, unit, integration and bounded fault tests against real servers.
test: install lint typecheck
	$(BIN)/pytest -q

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy wmb binlog_capture broker cache_updater

unit: install
	$(BIN)/pytest -q tests/unit

## Long soak and fault durations (60 s and 5 min link cuts ...), not run in CI.
long: install
	$(BIN)/pytest -q --long

bench: install
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf .wmb .pytest_cache .mypy_cache .ruff_cache
