# Two commands on a fresh machine (see README):
#   make demo   installs into .venv and runs the main job on built-in data (no download)
#   make test   installs into .venv and runs the test suite (what CI runs)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first at the version that has a local CPU build here; a plain
# resolution would pull a multi-GB CUDA build. Override with TORCH_SPEC= on other machines.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-all lint bench

$(BIN)/medfusion: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/medfusion

install: $(BIN)/medfusion

demo: install
	$(BIN)/medfusion demo --output runs/demo --overwrite

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: install
	$(BIN)/ruff check medfusion tests bench
	$(BIN)/lint-imports

bench: install
	$(BIN)/python bench/samplers.py
