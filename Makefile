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

.PHONY: install tiny synthetic train demo test lint lab bench clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

tiny: install
	$(BIN)/python -m mmlib.tiny

# The synthetic set with a >= 1000-caption held-out test split (1920 images, 7718 captions, test
# 1203, ~6 MB): configs name it `manifest: synthetic:1920`, generated on first use into the cache.
synthetic: install
	$(BIN)/python -c "from mmlib.synthetic import resolve_manifest; print(resolve_manifest('synthetic:1920'))"

NBVAL := --nbval --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg

# The two runs of the Matryoshka comparison (notebook 05 loads them when present). Without
# final/ a run continues from its newest complete checkpoint (or starts: resume=auto); with an
# out-of-date final/ (config or install changed) it starts afresh (overwrite=true).
runs/tiny_%/final/mmlib_config.json: configs/tiny_%.yaml $(STAMP)
	$(BIN)/python -m mmlib.train --config $< --set output_dir=runs/tiny_$* \
		$(if $(wildcard runs/tiny_$*/final),overwrite=true,resume=auto)

train: tiny runs/tiny_mrl/final/mmlib_config.json runs/tiny_full/final/mmlib_config.json

# The notebooks first (executed copies and figures in outputs/), then the main job last, so
# that what stays on screen is the trained model at work and where those outputs are.
demo: train
	$(BIN)/python -m mmlib.tools.run_notebooks --out outputs
	$(BIN)/python -m mmlib.tools.demo --outputs outputs

test: install
	$(BIN)/python -m pytest tests notebooks $(NBVAL)

lint: install
	$(BIN)/ruff check .

lab: install
	$(BIN)/jupyter lab notebooks/

bench: install
	$(BIN)/python benchmarks/bench_losses.py
	$(BIN)/python benchmarks/bench_encoder.py
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) .cache outputs runs
