# The README's two commands: `make demo` and `make test`. Both set up whatever is missing first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
QGIS_PY := /usr/bin/python3
DEMO_DIR ?= demo-out
export QT_QPA_PLATFORM ?= offscreen

.PHONY: setup test test-engine test-plugin lint demo bench plugin-zip clean

setup:
	@scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/bandit -q -r geo_r1_qgis --severity-level medium

test-engine: setup
	$(PY) -m pytest tests/engine tests/train

test-plugin: setup
	$(QGIS_PY) -m pytest tests/geo_r1_qgis

test: setup lint test-engine test-plugin

demo: setup
	@scripts/demo.sh "$(DEMO_DIR)"

clean:
	rm -rf $(DEMO_DIR) .cache .pytest_cache
