# Two entry points for a fresh machine with Python 3.11+ and pip: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test chromium

# Installs everything (virtual environment, this package, the default model) and runs the main job:
# the whole pipeline on the KFP local runner, on the bundled sample, with the default model.
run: $(STAMP)
	$(VENV)/bin/rlhf run

# Lint, then the whole suite. The report's browser test needs Debian's Chromium; installed here when
# missing (as root, or with sudo).
test: $(STAMP) chromium
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest

chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)
