# Entry points for a fresh machine: `make test` builds .venv, lints and runs the whole suite;
# `make test-fast` runs the unit tier only; `make demo` builds .venv if needed and runs the whole
# mission on the embedded local stack (pipelines/demo.py).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv lint test test-fast demo docs lock lock-cu128 clean-venv

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

# The cluster image's dependencies, every one pinned with its hashes (infra/docker/Dockerfile installs
# them with --require-hashes), resolved from pyproject.toml for the image's Python and platform. Needs
# uv (pip install uv, in any environment). `lock`: PyPI's torch, built for CUDA 13.0; `lock-cu128`:
# the CUDA 12.8 build from PyTorch's own index (build the image with --build-arg TORCH_CUDA=cu128).
UV        ?= uv
LOCK_ARGS := pip compile pyproject.toml --generate-hashes --python-version 3.11 \
             --python-platform x86_64-manylinux_2_28 --custom-compile-command 'make lock'

lock:
	$(UV) $(LOCK_ARGS) --index-url https://pypi.org/simple -o infra/docker/requirements-cu130.lock

lock-cu128:
	$(UV) $(LOCK_ARGS) --index-url https://download.pytorch.org/whl/cu128 --extra-index-url https://pypi.org/simple \
	    --index-strategy unsafe-best-match -o infra/docker/requirements-cu128.lock

clean-venv:
	rm -rf $(VENV)
