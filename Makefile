# Entry points for a fresh machine: `make test` builds .venv, lints and runs the whole suite;
# `make test-fast` runs the unit tier only; `make demo` builds .venv if needed and runs the whole
# mission on the embedded local stack (pipelines/demo.py).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv lint test test-fast demo docs clean-venv

venv: $(STAMP)

# torch and torchvision go in first and are pinned for everything after (see README, "Set-up"),
# otherwise a dependency resolver may swap in another torch build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch torchvision
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# ruff's linter and formatter, configured in pyproject.toml; `make test` (and so CI) runs it first
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: venv lint
	$(BIN)/python -m pytest tests

# the unit tier: everything not marked slow (no Ray cluster, local stack or whole entry point)
test-fast: venv
	$(BIN)/python -m pytest -m "not slow" tests

# DEMO_ARGS: key=value overrides, e.g. make demo DEMO_ARGS='train=[max_steps=20]'
demo: venv
	$(BIN)/python -m pipelines.demo $(DEMO_ARGS)

# Regenerate the README's config and metrics reference from the typed configs.
docs: venv
	$(BIN)/python -m pipelines.docs

clean-venv:
	rm -rf $(VENV)
