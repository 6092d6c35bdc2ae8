# One command each: `make demo` (set-up + the demo), `make test` (set-up + tests).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?=

.PHONY: setup browser demo lint test bench-score bench-train bench-driver clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# torch/torchvision pins come from this machine's pip cache/disk in under a minute.
	@# .[dev] = the core, the `local` (moto S3 endpoint) and `report` (matplotlib) extras, and the test tools.
	@# pip's own notices go to a file (the terminal shows them only when the install fails).
	@echo "installing dragons and its pinned dependencies into $(VENV) (pip's output: $(VENV)/install.log)"
	@{ $(BIN)/pip install --upgrade pip && $(BIN)/pip install -e '.[dev]'; } > $(VENV)/install.log 2>&1 \
		|| { tail -n 40 $(VENV)/install.log; echo "error: pip install failed; the whole output is in $(VENV)/install.log"; exit 1; }
	@touch $(STAMP)

setup: $(STAMP)

# Headless Chromium for the run report's browser test (tests/test_run_report.py):
# Debian's package, installed once (as root, as CI runs); apt's output goes to a file.
browser:
	@command -v chromium >/dev/null || { echo "installing chromium for the report's browser test (apt's output: /tmp/dragons-apt-chromium.log)"; \
		{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; } > /tmp/dragons-apt-chromium.log 2>&1 \
		|| { tail -n 20 /tmp/dragons-apt-chromium.log; echo "error: could not install chromium (needs root and Debian's package lists); install it by hand: apt-get install chromium"; exit 1; }; }

demo: $(STAMP)
	@$(BIN)/dragons demo $(if $(DATA),--data $(DATA),)

# Lint, format and types (pyproject.toml's [tool.ruff] and [tool.mypy]): seconds, before the suite.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP) browser lint
	$(BIN)/python -m pytest -q --durations=40 tests

bench-score: $(STAMP)
	$(BIN)/python benchmarks/bench_score.py

bench-train: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py

bench-driver: $(STAMP)
	$(BIN)/python benchmarks/bench_driver.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dragons_demo
