# One command each: `make demo` (set-up + the demo), `make test` (set-up + tests).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?=

.PHONY: setup demo test bench-score bench-train clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision pins come from this machine's pip cache/disk in under a minute.
	# .[dev] = the core, the `local` (moto S3 endpoint) and `report` (matplotlib) extras, and the test tools.
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/dragons demo $(if $(DATA),--data $(DATA),)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench-score: $(STAMP)
	$(BIN)/python benchmarks/bench_score.py

bench-train: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache dragons_demo
