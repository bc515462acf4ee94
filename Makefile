# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint format bench clean

setup: $(STAMP)

# (re)install when pyproject.toml changes; torch/torchvision come from the pinned versions
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev,modal]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mole demo --workdir $(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/stacked_inference.py
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/train_concurrent.py
	$(BIN)/python bench/ocr_detector.py
	$(BIN)/python bench/route_cost.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
