# Two entry points: `make demo` (set up, then run the embedded demo) and `make test`
# (set up, then run the whole test suite). Both create .venv on first use; `make test` also builds
# .venv-app, where the browser app's tests run (gradio caps pillow below 13, and the conformance data was
# recorded with pillow 13, so the two cannot share one environment). `make test-vila` checks the
# package inside a VILA-like environment (transformers 4.46.0 pinned) in a second venv, .venv-vila.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sr3d-installed

.PHONY: setup demo test test-app test-vila lint bench clean chromium

$(STAMP): pyproject.toml requirements/cpu-pins.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements/cpu-pins.txt torch torchvision
	$(BIN)/python -m pip install --quiet -c requirements/cpu-pins.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/sr3d demo

# tests/test_app_browser.py drives a real headless Chromium: Debian's package (playwright never downloads one)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium)

# --- the browser app (`sr3d app`, extra `app`): its own venv, .venv-app --------------------------------
APP_VENV  := .venv-app
APP_STAMP := $(APP_VENV)/.sr3d-installed
APP_TESTS := tests/test_app.py tests/test_app_browser.py

$(APP_STAMP): pyproject.toml requirements/cpu-pins.txt
	test -x $(APP_VENV)/bin/python || $(PYTHON) -m venv $(APP_VENV)
	$(APP_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(APP_VENV)/bin/python -m pip install --quiet -c requirements/cpu-pins.txt torch torchvision
	$(APP_VENV)/bin/python -m pip install --quiet -c requirements/cpu-pins.txt -e ".[test-app]"
	touch $(APP_STAMP)

test-app: $(APP_STAMP) chromium
	$(APP_VENV)/bin/python -m pytest -n 2 --dist loadgroup $(APP_TESTS)

test: $(STAMP) $(APP_STAMP) chromium
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadgroup tests $(addprefix --ignore=,$(APP_TESTS))
	$(APP_VENV)/bin/python -m pytest -n 2 --dist loadgroup $(APP_TESTS)

# --- second stack: VILA's transformers pin (docs/vila.md "Install into a VILA environment") ---------------
VILA_VENV  := .venv-vila
VILA_STAMP := $(VILA_VENV)/.sr3d-installed
VILA_TESTS := tests/test_vila_integration.py tests/test_layers.py

# torch and transformers first, as a VILA environment has them; then the package exactly as docs/vila.md
# says (`pip install` of the package, no constraints), which must leave transformers at 4.46.0.
$(VILA_STAMP): pyproject.toml requirements/vila-pins.txt $(shell find sr3d_plugin -name '*.py')
	rm -rf $(VILA_VENV)
	$(PYTHON) -m venv $(VILA_VENV)
	$(VILA_VENV)/bin/python -m pip install --quiet --no-compile -c requirements/vila-pins.txt torch transformers pytest
	$(VILA_VENV)/bin/python -m pip install --quiet .
	touch $(VILA_STAMP)

test-vila: $(VILA_STAMP)
	cd $(VILA_VENV) && bin/python -c "import transformers as t; assert t.__version__ == '4.46.0', t.__version__; \
	import sr3d_plugin, sr3d_plugin.geometry, sr3d_plugin.tiling, sr3d_plugin.sources, sr3d_plugin.regions, \
	sr3d_plugin.plugins, sr3d_plugin.integrations.vila; from sr3d_plugin.modeling import PositionEncoder3D, \
	RegionExtractor, build_projector; print('transformers', t.__version__, '- core and integrations.vila import from', \
	sr3d_plugin.__file__)"
	$(VILA_VENV)/bin/pytest -q -p no:cacheprovider $(VILA_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) $(VILA_VENV) $(APP_VENV) .pytest_cache .ruff_cache build dist
