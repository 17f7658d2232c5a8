# Quick start: `make demo` runs keel on its built-in model, `make test` runs the test suite.
# Both create .venv on first use. On a machine without an NVIDIA GPU the CPU build of torch
# (torch==2.13.0) is installed first so pip never pulls the CUDA packages.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= Hello, keel!

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: venv
	$(VENV)/bin/keel generate --model keel-demo --max-new-tokens 48 "$(PROMPT)"

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
