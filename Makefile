# Two commands do all set-up on a fresh Linux machine with Python 3.11:
#   make demo   # venv + pinned install + tiny assets + a LoRA finetune on the CPU and its scores (about 2.5 minutes)
#   make test   # the same environment + test tools, then the test suite
#   make unit   # only the fast in-process tests (tests/unit), without the .venv-hf environment
#   make demo-chat  # the demo on generated conversations, rendered with the tiny model's chat template
#   make demo-dpo   # DPO on generated preference pairs, starting from demo-chat's merged model (runs it if needed)
#   make demo-tools # tool calling: conversations with lookup_color calls, scored on held-out questions
#   make gguf-install  # llama-cpp-python, for quantized GGUF export (make test installs it too)
#   make vllm-install  # vLLM in .venv-vllm (the CPU build here, CUDA's where nvidia-smi runs), to serve the results
#   make test-vllm     # the vLLM serving tests (tests/test_vllm.py), kept out of make test for the 3.5 GB install
#   make bench  # speed and memory next to torchtune's recipe and TRL (not part of make test)
# Other targets: make assets, make lint, make clean.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
HFVENV := .venv-hf
VLLMVENV := .venv-vllm
VLLM_REQUIREMENTS := $(if $(shell command -v nvidia-smi 2>/dev/null),requirements-vllm-cuda.txt,requirements-vllm.txt)
BIN    := $(VENV)/bin
TINY   := assets/tiny

# The demo and the tests never touch the network (model, tokenizer and data are generated locally).
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline

.PHONY: demo demo-chat demo-dpo demo-tools test test-vllm unit bench install test-install gguf-install hf-install \
	vllm-install assets lint clean

install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

test-install: $(VENV)/.test-installed
$(VENV)/.test-installed: requirements-test.txt $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	@touch $@

# llama.cpp's quantizer for GGUF export (compiles llama.cpp the first time: a few minutes; without the
# multimodal library, which the project does not use).
gguf-install: $(VENV)/.gguf-installed
$(VENV)/.gguf-installed: requirements-gguf.txt $(VENV)/.installed
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $$CMAKE_ARGS" $(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-r requirements-gguf.txt
	@touch $@

# transformers + peft in their own environment: peft 0.21 refuses to import beside torchtune's torchao 0.14.
hf-install: $(HFVENV)/.installed
$(HFVENV)/.installed: requirements-hf.txt
	@test -x $(HFVENV)/bin/python || $(PYTHON) -m venv $(HFVENV)
	$(HFVENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-hf.txt
	@touch $@

# vLLM in its own environment (see requirements-vllm.txt); the CPU build's vision and audio wheels do not load.
vllm-install: $(VLLMVENV)/.installed
$(VLLMVENV)/.installed: requirements-vllm.txt requirements-vllm-cuda.txt
	@test -x $(VLLMVENV)/bin/python || $(PYTHON) -m venv $(VLLMVENV)
	$(VLLMVENV)/bin/python -m pip install --quiet --disable-pip-version-check -r $(VLLM_REQUIREMENTS)
	$(VLLMVENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	@touch $@

assets: $(TINY)/model.safetensors
$(TINY)/model.safetensors: lora_tools/tiny_assets.py lora_tools/demo/assets.py lora_tools/demo/llama3_2_instruct.jinja $(VENV)/.installed
	$(BIN)/python -m lora_tools.tiny_assets --out $(TINY)

demo: install assets
	PATH="$(CURDIR)/$(BIN):$$PATH" $(OFFLINE) tune run lora_finetune_single_device.py --config configs/tiny.yaml \
		"eval_tasks=[tiny_qa,tiny_qa_gen]"

demo-chat: install assets
	PATH="$(CURDIR)/$(BIN):$$PATH" $(OFFLINE) tune run lora_finetune_single_device.py --config configs/tiny_chat.yaml

CHAT_MODEL := outputs/tiny_chat/checkpoints/step_0000120/model/model.safetensors  # configs/tiny_dpo.yaml's base
demo-dpo: install assets
	@test -f $(CHAT_MODEL) || $(MAKE) demo-chat
	PATH="$(CURDIR)/$(BIN):$$PATH" $(OFFLINE) tune run lora_finetune_single_device.py --config configs/tiny_dpo.yaml

demo-tools: install assets
	PATH="$(CURDIR)/$(BIN):$$PATH" $(OFFLINE) tune run lora_finetune_single_device.py --config configs/tiny_tools.yaml

# The installs first, side by side (llama.cpp compiles while pip fetches .venv-hf); then two test processes, each
# file on one, one thread each (two processes of two threads would fight for 2 cores).
test:
	@$(MAKE) --no-print-directory -j3 test-install gguf-install hf-install assets
	PATH="$(CURDIR)/$(BIN):$$PATH" $(OFFLINE) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25 \
		--ignore=tests/test_vllm.py tests

# vLLM's OpenAI-compatible server on localhost against the project's own answers (CI runs it after make test).
test-vllm:
	@$(MAKE) --no-print-directory -j2 test-install hf-install assets vllm-install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(OFFLINE) $(BIN)/python -m pytest -q --durations=10 tests/test_vllm.py

unit: test-install assets
	PATH="$(CURDIR)/$(BIN):$$PATH" $(OFFLINE) $(BIN)/python -m pytest -q tests/unit

# CPU by default; on a GPU: make bench BENCH_ARGS="--device cuda --model 3b --variants default,ac,ac+offload"
bench: install hf-install assets
	PATH="$(CURDIR)/$(BIN):$$PATH" $(OFFLINE) $(BIN)/python -m bench.run --repeats 3 $(BENCH_ARGS)

lint: test-install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf outputs $(TINY)
