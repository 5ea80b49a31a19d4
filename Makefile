# qwenft: two commands on a fresh machine.
#   make demo   create .venv, install everything, fine-tune the tiny Qwen on data/, merge, chat
#   make test   create .venv, install everything, run the whole test suite (end to end included)
# QWENFT_INSTALL=cpu|cuda|auto picks the install path (default auto: CUDA if nvidia-smi answers).

VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-gguf setup-extras demo test test-fast test-model test-e2e lint bench bench-gpu clean-venv

setup:
	@scripts/setup_env.sh

# setup plus the optional extras, each from its own lock (requirements/<extra>.lock; they never
# change requirements/cpu.lock): what `make test` needs. gguf: llama-cpp-python (built once);
# optimizers: GaLore, APOLLO, BAdam; tracking: TensorBoard, MLflow, W&B; ray: Ray (--launcher ray);
# vision: torchvision for the Qwen-VL processors (on the CPU install with its hook, docs/vision.md);
# rl: TRL 1.x for --stage grpo, in its own folder of the venv (requirements/rl.lock says why)
EXTRAS ?= gguf optimizers tracking ray vision rl
setup-extras:
	@QWENFT_EXTRAS="$(EXTRAS)" scripts/setup_env.sh

setup-gguf:
	@QWENFT_EXTRAS=gguf scripts/setup_env.sh

demo: setup
	@scripts/demo.sh

# Tiers (tests/README.md), marked by tests/conftest.py from the fixtures each test uses:
#   test        everything, end to end included (what .ci/run runs)
#   test-fast   no model, no LLaMA-Factory launch; fails if torch/transformers/llamafactory get imported
#   test-model  the tiny models and tokenizers in-process, no LLaMA-Factory launch
#   test-e2e    the real LLaMA-Factory in child processes
# TEST_WORKERS pytest-xdist workers (default 2: this project's CI machines have 2 cores; the
# session's trained runs are made once for all workers, tests/conftest.py). worksteal: a worker
# that runs out of tests takes queued ones from the other (xdist's default hands them out ahead,
# and one worker sat idle for minutes at the end while the other ran the long end-to-end tests)
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist worksteal

test: setup-extras
	$(PY) -m pytest -q $(XDIST) --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not model"

test-model: setup
	$(PY) -m pytest -q -m "model and not e2e"

test-e2e: setup-extras
	$(PY) -m pytest -q $(XDIST) -m e2e --durations=15

lint: setup
	$(VENV)/bin/ruff check qwenft tests scripts

clean-venv:
	rm -rf $(VENV)

bench: setup
	$(PY) scripts/bench.py

bench-gpu: setup
	scripts/bench_gpu.sh
