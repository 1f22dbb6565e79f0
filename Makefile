# mmlib: two commands on a fresh machine with Python 3.11 and make:
#   make demo   install, build the tiny model, run the main job
#   make test   install if needed, run the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Models built from code go into the checkout (git-ignored), never a shared home folder.
export MMLIB_CACHE ?= $(CURDIR)/.cache/mmlib
export PYTHONHASHSEED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: install tiny demo test lint lab bench clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

tiny: install
	$(BIN)/python -m mmlib.tiny

demo: tiny
	$(BIN)/python -m mmlib.demo

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check .

lab: install
	$(BIN)/jupyter lab notebooks/

bench: install
	$(BIN)/python benchmarks/bench_losses.py

clean:
	rm -rf $(VENV) .cache outputs runs
