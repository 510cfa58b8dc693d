# Set-up, demo and tests. `make demo` and `make test` are the README's two commands.
# Python packages go into a virtual environment ($(VENV)), never into the system Python, so the
# same commands work where PEP 668 forbids that (Debian 12/13, Ubuntu 24.04). Later commands:
# `. .venv/bin/activate` puts modelavg, python and pytest from it on PATH.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The venv is up to date when this is newer than the dependency lists (keeps a warm setup fast).
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := openmpi-bin libopenmpi-dev asterisk-core-sounds-en-wav asterisk-core-sounds-en \
	pocketsphinx-testdata dataset-fashion-mnist asterisk-core-sounds-es-wav asterisk-core-sounds-fr-wav \
	asterisk-core-sounds-it-wav asterisk-core-sounds-ru-wav \
	festival festvox-kallpc16k festlex-cmu slurm-wlm munge

.PHONY: setup apt demo test lint

setup: apt $(STAMP)
	@echo "modelavg is installed in $(VENV); for later commands: . $(BIN)/activate"

# Debian packages, installed only when missing, with what `python3 -m venv` and a package built
# from source need (python3-venv, python3-dev, gcc) where this Python or machine lacks it.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done; \
		$(PYTHON) -c 'import ensurepip' 2>/dev/null || echo python3-venv; \
		include=$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("include"))'); \
		[ -e "$$include/Python.h" ] || echo python3-dev; \
		command -v gcc >/dev/null || echo gcc); \
	if [ -n "$$missing" ]; then \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }

$(STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

demo: setup
	$(BIN)/modelavg demo

test: setup
	MODELAVG_REQUIRE_MPI=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check modelavg tests benchmarks experiments
	$(BIN)/ruff format --check modelavg tests benchmarks experiments
