# `make demo`: set up, fetch the embedded model and data, run the main job with the owner in the loop (about 35 min on 2 CPU cores, the ceiling and floor rows included).
# `make test`: set up, run the tests (tiny random models, a few minutes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo quick test test-slow bench clean

# the demo's recipe (docs/transfer.md): layer drop to 8 of the 26 middle blocks (no build cost), the data
# owner tunes the bottom adapter blocks, the owner's correction at its default period (--assist-every
# without a value: offsite.assist.RECIPE_EVERY, every 4 optimizer steps)
RECIPE := --method uniform --keep 8 --tune-blocks bottom --assist-every

setup: $(STAMP)

# torch is pinned to 2.13.0: the CPU build on disk here, the CUDA build from PyPI on a GPU machine.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/offsite fetch --model smollm2-135m --tasks arc_easy,webqs
	$(BIN)/offsite run --model smollm2-135m --task arc_easy $(RECIPE) --preset demo --overwrite

quick: setup
	$(BIN)/offsite fetch --model smollm2-135m --tasks arc_easy,webqs
	$(BIN)/offsite run --model smollm2-135m --task arc_easy $(RECIPE) --preset quick --overwrite

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python bench/efficiency.py

clean:
	rm -rf $(VENV) runs .pytest_cache
