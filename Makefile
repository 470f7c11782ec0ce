# `make test` and `make demo` work on a fresh machine: they create .venv and install into it.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
export OMP_NUM_THREADS := 1

.PHONY: test demo compare bench install clean

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[megatron,demo,nemo,dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

# The loss benchmark at TP = 2 (docs/benchmarks.md); pass options with ARGS="--dtype bf16".
bench: install
	$(VENV)/bin/torchrun --nproc-per-node 2 bench/losses.py $(ARGS)

# TrOPD on the built-in arithmetic task at TP = 2 on CPU; outputs in runs/demo (ARGS="--help").
demo: install
	$(VENV)/bin/torchrun --nproc-per-node 2 -m launch.demo $(ARGS)

# OPD, EOPD, REOPOLD and TrOPD variants on the tiny task, same seeds and budget: docs/compare.md.
compare: install
	$(VENV)/bin/torchrun --nproc-per-node 2 -m launch.compare $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
