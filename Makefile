# Quick start: `make serve` serves keel's built-in model over the OpenAI API, `make test` runs the tests.
# `make demo` prints one generation instead.
# Both create .venv on first use. On a machine without an NVIDIA GPU the CPU build of torch
# (torch==2.13.0) is installed first so pip never pulls the CUDA packages.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= Hello, keel!
PORT ?= 8000

.PHONY: venv serve demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[test]"
	touch $@

serve: venv
	$(VENV)/bin/keel serve --model keel-demo --port $(PORT)

demo: venv
	$(VENV)/bin/keel generate --model keel-demo --max-new-tokens 48 "$(PROMPT)"

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
