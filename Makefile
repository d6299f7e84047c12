# make test: a fresh machine to a green suite. It creates .venv, installs the CPU build of
# torch 2.13.0 first (a bare `torch` requirement would pull a ~5.5 GB CUDA build), then this
# package editable with its test extras, then runs every test (Triton under its interpreter
# when there is no GPU).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: test install bench clean

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

# Microbenchmarks with timings (ratio table printed at the end).
bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-columns=median,ops -s

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
