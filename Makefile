# The front door. `make demo` and `make test` set everything up first (scripts/setup.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup lock demo test test-fast lint format faults screenshots protos check-protos stack-up stack-down bench-refscore bench-trainer bench-learning bench-rounds bench-offset-holes bench-scale clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m cli.main demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Every test that needs no broker, S3 server or engine (tests/conftest.py marks the others `integration`).
test-fast: setup
	$(PY) -m pytest -m "not integration" -n 2 $(PYTEST_ARGS)

# Lint, format check, types and import layers (pyproject.toml holds every tool's configuration).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	bash scripts/lint-protos.sh

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The annotation page's browser tests, publishing their screenshots to docs/.
screenshots: setup
	OFFDPO_SCREENSHOTS_DIR=docs $(PY) -m pytest tests/labeler/test_annotate_browser.py $(PYTEST_ARGS)

# The fault-injection suite, publishing its tables to bench/results/faults.{json,md}.
faults: setup
	OFFDPO_RESULTS_DIR=bench/results $(PY) -m pytest -m faults tests/faults $(PYTEST_ARGS)

# Re-resolve the CPU set-up's exact versions into scripts/requirements-cpu.lock (after changing dependencies).
lock:
	@bash scripts/lock.sh

protos: setup
	$(PY) -m localdev.protogen

check-protos: setup
	$(PY) -m localdev.protogen --check

stack-up: setup
	$(PY) -m cli.main stack up

stack-down: setup
	$(PY) -m cli.main stack down

bench-refscore: setup
	$(PY) -m bench.refscore

bench-trainer: setup
	$(PY) -m bench.trainer

# The DPO paper's controlled-sentiment experiment in miniature, through the real pipeline.
bench-learning: setup
	$(PY) -m bench.learning

# Records a consumer never reads on the local broker (Tansu), with and without OffsetHoleGuard.
bench-offset-holes: setup
	$(PY) -m bench.offset_holes

# Sharded state (issue 28): per-rank memory of FSDP over gloo at world sizes 1, 2, 4 (into scale.json/png).
bench-scale: setup
	$(PY) -m bench.scale

# Iterative DPO: 3 rounds vs one offline pass on the same labelling budget (into learning.json/png).
bench-rounds: setup
	$(PY) -m bench.rounds

clean:
	-$(PY) -m cli.main stack down
	rm -rf .stack .cache
