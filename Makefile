# qwenft: two commands on a fresh machine.
#   make demo   create .venv, install everything, fine-tune the tiny Qwen on data/, merge, chat
#   make test   create .venv, install everything, run the whole test suite (end to end included)
# QWENFT_INSTALL=cpu|cuda|auto picks the install path (default auto: CUDA if nvidia-smi answers).

VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint bench bench-gpu clean-venv

setup:
	@scripts/setup_env.sh

demo: setup
	@scripts/demo.sh

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not e2e"

lint: setup
	$(VENV)/bin/ruff check qwenft tests scripts

clean-venv:
	rm -rf $(VENV)

bench: setup
	$(PY) scripts/bench.py

bench-gpu: setup
	scripts/bench_gpu.sh
