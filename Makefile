# The two commands the README promises. Both work on a fresh machine with no GPU and no model hub.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# newer than pyproject.toml and constraints.txt: setup has nothing to install
STAMP := $(VENV)/.installed
# Ray's Prometheus endpoint under `make serve` (vlora's own metrics: /metrics on the API port)
METRICS_PORT ?= 8080

.PHONY: setup test serve unit

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch 2.13.0 is pinned first so pip takes the CPU wheel where one is provided locally;
# constraints.txt holds the exact versions the suite was last run with.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

unit: setup
	$(BIN)/python -m pytest -q tests/unit

serve: setup
	$(BIN)/python -m vlora.deployments.launch serve_config.yaml --metrics-export-port $(METRICS_PORT)
