# The README's two commands: `make demo` and `make test`. Both set up whatever is missing first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
QGIS_PY := /usr/bin/python3
DEMO_DIR ?= demo-out
export QT_QPA_PLATFORM ?= offscreen

.PHONY: setup setup-venv test test-fast test-engine test-engine-processes test-engine-rest test-plugin test-plugin-340 test-plugin-344 lint demo demo-train plugin-zip plugin-install panel-screenshot wheel clean

setup:
	@scripts/setup.sh

# the venv only: the demos use nothing else (no Debian QGIS packages, no chroot)
setup-venv:
	@scripts/setup.sh --venv

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/bandit -q -r geo_r1_qgis --severity-level medium

# The pure tests, in under a minute: the core's rules and the training maths (no engine process, no model, no
# QGIS; the venv only).
FAST_TESTS := tests/geo_r1_qgis/core tests/train/test_metrics.py tests/train/test_rewards.py tests/train/test_chips.py \
	tests/train/test_data_format.py
test-fast: setup-venv
	$(PY) -m pytest -q $(FAST_TESTS)

test-engine: setup
	$(PY) -m pytest tests/engine tests/train tests/geo_r1_qgis/core

# The same suite in two halves of about equal time, for make test to run side by side with the QGIS suites: the
# tests that serve real engines (the server, Ray, scale-out, end to end), and the rest.
ENGINE_PROCESS_TESTS := tests/engine/server tests/engine/test_ray_ground.py tests/engine/test_scale_out.py \
	tests/engine/test_end_to_end.py
test-engine-processes: setup
	$(PY) -m pytest $(ENGINE_PROCESS_TESTS)

test-engine-rest: setup
	$(PY) -m pytest tests/engine tests/train tests/geo_r1_qgis/core $(addprefix --ignore=,$(ENGINE_PROCESS_TESTS))

test-plugin: setup
	$(QGIS_PY) -m pytest tests/geo_r1_qgis --ignore=tests/geo_r1_qgis/core

# The same plugin suite under QGIS 3.40 LTR (Debian 13 chroot) and 3.44 LTR (Debian 13 + trixie-backports
# chroot), each built once by scripts/setup_qgis_chroot.sh (root). NOT RUN fails.
test-plugin-340: setup
	scripts/test_plugin_chroot.sh 3.40

test-plugin-344: setup
	scripts/test_plugin_chroot.sh 3.44

# The five suites two at a time (scripts/test_suites.sh; GEO_R1_TEST_JOBS=1 for one at a time).
test: setup lint
	@scripts/test_suites.sh

demo: setup-venv
	@scripts/demo.sh "$(DEMO_DIR)"

# The fine-tuning loop end to end on the CPU (about 7 minutes): dataset, SFT, GRPO, DAPO, report.
demo-train: setup-venv
	@scripts/demo_train.sh "$(DEMO_DIR)-train"

# The engine as a wheel, dist/geo_r1-<version>-py3-none-any.whl (offline: the venv's setuptools builds it).
# build/lib is emptied first: setuptools packs whatever an earlier build left there (modules since moved or
# no longer shipped, such as the plugin's GUI ones).
# One build at a time (flock: the venv and plugin suites both run make wheel, side by side), written beside
# dist/ and renamed in, so that a test reading the wheel never sees it half written.
wheel: setup
	@mkdir -p build dist
	flock build/.wheel.lock bash -c 'rm -rf build/lib build/wheel-tmp && \
	  $(VENV)/bin/pip wheel --no-deps --no-build-isolation --quiet -w build/wheel-tmp . && \
	  mv -f build/wheel-tmp/*.whl dist/'

plugin-zip:
	$(QGIS_PY) scripts/package_plugin.py --output dist/geo_r1_qgis.zip

# The README's screenshot: the desktop test (Debian's QGIS under Xvfb, a real engine) saving it to docs/panel.png.
panel-screenshot: setup
	GEO_R1_SCREENSHOT=$(CURDIR)/docs/panel.png $(QGIS_PY) -m pytest tests/geo_r1_qgis/test_desktop.py -q

# Install the plugin into the default QGIS profile (unzipped; replaces an older copy of it).
QGIS_PLUGINS ?= $(HOME)/.local/share/QGIS/QGIS3/profiles/default/python/plugins
plugin-install: plugin-zip
	mkdir -p "$(QGIS_PLUGINS)"
	rm -rf "$(QGIS_PLUGINS)/geo_r1_qgis"
	cd "$(QGIS_PLUGINS)" && $(QGIS_PY) -m zipfile -e "$(CURDIR)/dist/geo_r1_qgis.zip" .
	@echo "installed into $(QGIS_PLUGINS)/geo_r1_qgis: enable Geo-R1 in Plugins > Manage and Install Plugins"

clean:
	rm -rf $(DEMO_DIR) $(DEMO_DIR)-train .cache .pytest_cache
