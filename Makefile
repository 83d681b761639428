# The front door. `make demo` and `make test` set everything up first (scripts/setup.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test protos check-protos stack-up stack-down bench-refscore bench-trainer clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m offdpo.cli demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

protos: setup
	$(PY) -m offdpo.protogen

check-protos: setup
	$(PY) -m offdpo.protogen --check

stack-up: setup
	$(PY) -m offdpo.cli stack up

stack-down: setup
	$(PY) -m offdpo.cli stack down

bench-refscore: setup
	$(PY) -m bench.refscore

bench-trainer: setup
	$(PY) -m bench.trainer

clean:
	-$(PY) -m offdpo.cli stack down
	rm -rf .stack .cache
