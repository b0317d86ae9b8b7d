PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test test-fast lint demo bench recipe clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

# Reinstall whenever the package metadata or the pins change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,export,tracking,search,explain,peft]'
	touch $(STAMP)

install: $(STAMP)  ## make .venv with the pinned torch/torchvision and the package (editable)

test: $(STAMP)  ## run the whole test suite (slow tests included), installing first if needed
	$(PY) -m pytest -q

test-fast: $(STAMP)  ## the tests without the slow marker
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check lora_cls hydra_plugins tests scripts

demo: $(STAMP)  ## train ResNet34 + LoRA on the offline synthetic set, then evaluate it
	$(VENV)/bin/lora-train experiment=demo hydra.run.dir=outputs/demo/$$(date +%Y-%m-%d_%H-%M-%S)
	@run=$$(ls -td outputs/demo/*/ | head -1); \
	$(VENV)/bin/lora-eval ckpt=$$run hydra.run.dir=$${run}eval && \
	echo "reports: $${run}reports  eval: $${run}eval"

bench: $(STAMP)  ## side-by-side training/eval throughput (scripts/bench.py --quick)
	$(PY) scripts/bench.py --quick

recipe: $(STAMP)  ## the recipe benchmark's table (scripts/recipe.py): the defaults on two transfer tasks, 3 seeds (hours on 2 cores)
	$(PY) scripts/recipe.py --variants lora full linear full_lr1e-3 lora_none lora_natural --jobs 2 --threads 1

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
