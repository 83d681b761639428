# The front door. `make demo` and `make test` set everything up first (scripts/setup.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test protos check-protos stack-up stack-down bench-refscore bench-trainer clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m cli.main demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

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

clean:
	-$(PY) -m cli.main stack down
	rm -rf .stack .cache
