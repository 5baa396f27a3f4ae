# Thin aliases; the logic lives in stages/ and dvc.yaml.
# `make demo` and `make test` are all a fresh machine needs: both install first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DVC := $(VENV)/bin/dvc
# dvc.yaml runs `python -m stages...`: make that the venv's python.
export PATH := $(abspath $(VENV))/bin:$(PATH)
PYTHON ?= python3
# torch is pinned to 2.13.0. Where no CPU wheel is at hand, pass its index, e.g.
#   make install TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_ARGS ?=

.PHONY: install demo test data base repro serve chat bench bench-process bench-train bench-evaluate bench-serve clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(TORCH_ARGS)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: install
	$(DVC) repro
	$(DVC) metrics show

repro: install
	$(DVC) repro

test: install
	$(PY) -m pytest -q -ra tests

data: install
	$(PY) -m stages.download

base: install
	$(PY) -m stages.base

bench: bench-process bench-train bench-evaluate

bench-process: install
	$(PY) bench/process.py

bench-train: install
	$(PY) bench/train.py

bench-evaluate: install
	$(PY) bench/evaluate.py

clean:
	rm -rf .pytest_cache
