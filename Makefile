# Two commands on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU torch wheel lies on disk on developer/CI machines; pin it first so nothing pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast quickstart clean

setup: $(STAMP)

$(STAMP): setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --config-settings editable_mode=compat -e ".[test,plot]" "$(TORCH_SPEC)"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

quickstart: setup
	$(PY) -m megatron_llamapro.quickstart --out quickstart

clean:
	rm -rf $(VENV) quickstart .pytest_cache
