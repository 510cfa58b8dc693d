# Set-up, demo and tests. `make demo` and `make test` are the README's two commands.
SHELL := /bin/bash
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := openmpi-bin libopenmpi-dev asterisk-core-sounds-en-wav asterisk-core-sounds-en \
	pocketsphinx-testdata dataset-fashion-mnist asterisk-core-sounds-es-wav asterisk-core-sounds-fr-wav \
	asterisk-core-sounds-it-wav asterisk-core-sounds-ru-wav \
	festival festvox-kallpc16k festlex-cmu

.PHONY: setup demo test lint

setup:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps -e .

demo: setup
	modelavg demo

test: setup
	MODELAVG_REQUIRE_MPI=1 $(PYTHON) -m pytest -q

lint:
	ruff check modelavg tests benchmarks experiments
	ruff format --check modelavg tests benchmarks experiments
