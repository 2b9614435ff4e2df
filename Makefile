# ORFEAS: `make run` starts the stack, `make test` runs the suite.
# Both set everything up first (`make install`), which is idempotent and
# quick once done.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PIP_VERSION := 26.3
PROTOS := $(shell find protos -name '*.proto')
PB := pb/.built

export GATEWAY_PORT ?= 5000
export GENERATION_PORT ?= 50051
export TELEMETRY_PORT ?= 50052
export DATA_DIR ?= $(CURDIR)/data

# Each make/*.mk adds its own targets and may append to EXTRA_INSTALL the
# set-up steps `make install` must also run (the browser, npm packages, ...).
EXTRA_INSTALL :=
-include $(sort $(wildcard make/*.mk))

.PHONY: install run test protos openapi clean

install: $(INSTALLED) $(PB) $(EXTRA_INSTALL)

$(INSTALLED): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# A current pip first: the venv's own (23.2) spends about a minute of CPU resolving these pins
	# against the registries, 26.3 a third of that (`make install` on a fresh clone: 45 s shorter).
	$(BIN)/pip install -q --disable-pip-version-check pip==$(PIP_VERSION)
	# Byte-compiled here, up front: where PYTHONDONTWRITEBYTECODE is set (as on this machine), nothing
	# else would ever write a .pyc, and every service start would compile torch from source again.
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	# compat mode puts the repo root on sys.path, so pb/ (built later) imports too.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
		-e . --config-settings editable_mode=compat
	touch $@

protos: $(PB)
$(PB): $(PROTOS) scripts/build_protos.sh $(INSTALLED)
	PYTHON=$(BIN)/python scripts/build_protos.sh
	touch $@

run: install
	$(BIN)/python -m services.stack

# Three pytest-xdist workers, a test file each at a time: most tests wait on real services, so even
# on this 2-core machine a third worker shortens the suite a little. The longest files go first
# (tests/conftest.py), in that order, so none starts late and keeps the others waiting.
PYTEST_WORKERS ?= 3
test: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# docs/openapi.json: the REST contract as the gateway serves it; a test fails when the two differ.
openapi: $(PB)
	$(BIN)/python -m gateway.openapi

clean:
	rm -rf pb $(VENV) .pytest_cache
