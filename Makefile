# On a fresh clone, `make local` or `make test` alone installs what is missing first.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
# The install stamp is newer than pyproject.toml once the venv matches it.
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install local test lint bench bench-scale bench-sink clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision: plain pip takes the pinned wheels from the machine's wheel store.
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project with its test dependencies

local: $(STAMP) ## Run the main job on a generated sample set, CPU only, output under out/
	$(PY) jobs/local.py --samples data/samples --output out/local

test: $(STAMP) ## Run the whole test suite (end-to-end on a local Ray, and unit)
	$(PY) -m pytest tests -q

lint: $(STAMP) ## Format check and lint (ruff)
	$(VENV)/bin/ruff format --check pipeline jobs tests bench
	$(VENV)/bin/ruff check pipeline jobs tests bench

bench: $(STAMP) ## Benchmark the pipeline against the plain PyTorch loop (about 25 min on 2 cores)
	$(PY) bench/bench.py

bench-scale: $(STAMP) ## Driver cost per input at 10k, 100k and 1M synthetic inputs (about 10 min)
	$(PY) bench/scale.py --before

bench-sink: $(STAMP) ## Our Delta datasink against Ray Data's write_delta on the same rows (about 2 min)
	$(PY) bench/sink.py --rows 100000 --rows-per-file 25000

clean: ## Remove generated data and outputs (keeps .venv)
	rm -rf out data
