# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint format bench clean

setup: $(STAMP)

# rapidocr-onnxruntime (PP-OCRv4 models inside the wheel) for `mole data ocr-crops`. It is installed
# without its dependencies: it asks for opencv-python, a second cv2 (GUI build, needs libGL) over our
# opencv-python-headless; its other dependencies are pinned in pyproject's `ocr` extra.
RAPIDOCR := rapidocr-onnxruntime==1.4.4

# (re)install when pyproject.toml or this file changes; torch/torchvision come from the pinned versions
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev,modal,ocr,s3]"
	$(BIN)/python -m pip install --quiet --no-deps $(RAPIDOCR)
	$(BIN)/python -c "import cv2, rapidocr_onnxruntime"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mole demo --workdir $(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the edit loop: unit tests only, without the slow ones (they still run in `make test`); under a minute.
# One OpenMP thread: the tiny model's ops gain nothing from a second one, and on a busy 2-core machine
# the spinning threads took 77 s of wall time against 47 s with one.
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests/unit -m "not slow"

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
