# One entry point for a fresh machine: `make test` builds .venv and runs the suite.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test bench clean-venv

venv: $(STAMP)

# torch and torchvision go in first and are pinned for everything after (see README, "Set-up"),
# otherwise a dependency resolver may swap in another torch build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch torchvision
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest tests

clean-venv:
	rm -rf $(VENV)
