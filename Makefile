# Two entry points for a fresh machine with Python 3.11+ and pip: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test

# Installs everything (virtual environment, this package, the default model) and runs the main job.
run: $(STAMP)
	$(VENV)/bin/rlhf prepare-model
	$(VENV)/bin/rlhf validate --output-dir runs/validated-sample-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(VENV)/bin/python -m pytest

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)
