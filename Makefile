# Two entry points (README "Quick start"): `make demo` and `make test`.
# Both create .venv if missing and install the package with its dev extra.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean contract-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU torch wheel first and alone, so that no dependency can resolve a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .

# SGLang (the Dockerfile's version) and vLLM's Python code (the `gpu` extra's) for the contract tests, --no-deps into .cache/ (not the venv: its
# torch/transformers pins would replace ours); installed once, a second run finds it (tests/contract/).
contract-deps: install
	$(PY) -m tests.contract.sglang_env
	$(PY) -m tests.contract.vllm_env

test: install lint contract-deps
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m calibrl_mcore.cli demo

bench: install
	$(PY) bench/losses.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .cache
