#!/usr/bin/env bash
# Create .venv and install qwenft with its training stack.
#
#   scripts/setup_env.sh            # auto: CUDA path if an NVIDIA GPU answers, else the CPU lock
#   QWENFT_INSTALL=cpu  scripts/setup_env.sh
#   QWENFT_INSTALL=cuda scripts/setup_env.sh
#
# CPU path: exact versions from requirements/cpu.lock, installed with --no-deps so every machine
# gets the same set (torch 2.13.0 CPU build, llamafactory 0.9.5, no torchvision (the vision
# extra adds it, with a hook for its CUDA-only ops), torchaudio without its CUDA-linked libraries;
# README.md, Install, says why).
# CUDA path: the ordinary resolver install of the package extras.
# A stamp in the venv skips the work when the lock and pyproject.toml have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
MODE=${QWENFT_INSTALL:-auto}
if [ "$MODE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then MODE=cuda; else MODE=cpu; fi
fi
case "$MODE" in cpu|cuda) ;; *) echo "QWENFT_INSTALL must be auto, cpu or cuda (got '$MODE')" >&2; exit 2;; esac

# QWENFT_EXTRAS="gguf optimizers tracking ray" (what `make test` sets) adds optional extras, each
# from its own lock, requirements/<extra>.lock, installed with --no-deps over the CPU lock (which
# they never change): gguf (llama-cpp-python, a source build of 6-12 minutes on 2 cores the first
# time; pip's wheel cache makes later installs quick), optimizers (GaLore, APOLLO, BAdam),
# tracking (TensorBoard, MLflow, W&B), ray (Ray, for `qwenft train --launcher ray`), vision
# (torchvision, for the Qwen-VL processors; on the CPU path with the hook below, docs/vision.md),
# rl (TRL 1.x for --stage grpo, in its own folder of the venv: requirements/rl.lock says why).
# `make demo` waits for none of them; the commands that need one, and `qwenft doctor`, say how to
# add it.
EXTRAS=${QWENFT_EXTRAS:-}
install_extra() {
  local name=$1 lock="requirements/$1.lock"
  [ -f "$lock" ] || { echo "setup: unknown extra '$name' (no $lock)" >&2; exit 2; }
  local want="$MODE $(cat "$lock" pyproject.toml | sha256sum | cut -c1-16)"
  local stamp="$VENV/.qwenft-extra-$name"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  echo "setup: adding the $name extra ($(grep -m1 '^# extra:' "$lock" | cut -c10-))"
  local overlay=""
  if [ "$name" = rl ]; then
    # trl 1.x and its datasets cannot live beside LLaMA-Factory's pins (requirements/rl.lock says
    # why): on both install paths they go into their own folder in the venv, which only the GRPO
    # process puts first on its PYTHONPATH (qwenft/rl/engine.py); written beside, then swapped in
    overlay="$VENV/qwenft-rl"
    rm -rf "$overlay.partial"
    "$VENV/bin/python" -m pip --disable-pip-version-check install -q --no-deps --target "$overlay.partial" -r "$lock"
    rm -rf "$overlay" && mv "$overlay.partial" "$overlay"
    PYTHONPATH="$overlay" "$VENV/bin/python" -c 'from trl import GRPOConfig, GRPOTrainer'
  elif [ "$MODE" = cpu ]; then
    if [ "$name" = vision ]; then
      # PyPI's torchvision is a CUDA build: its compiled ops cannot load beside CPU torch, and then
      # its import fails (operator torchvision::nms does not exist) unless those ops' schemas are
      # defined first. A .pth hook does that in every process of the venv, LLaMA-Factory's
      # included, and costs ~0.3 ms at interpreter start (qwenft/models/torchvision_cpu.py); it is
      # in place before torchvision is. Its compiled ops (nms, roi_align, ...) and image codecs
      # stay unavailable: Qwen-VL fine-tuning uses neither.
      site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      "$VENV/bin/python" -m qwenft.models.torchvision_cpu "$site" >/dev/null
    fi
    "$VENV/bin/python" -m pip --disable-pip-version-check install -q --no-deps -r "$lock"
    if [ "$name" = vision ]; then
      "$VENV/bin/python" -c 'import torchvision, transformers.models.qwen2_vl.video_processing_qwen2_vl'
    fi
  else
    "$VENV/bin/python" -m pip --disable-pip-version-check install -q -e ".[$name]"
  fi
  # the lock's own packages, as installed
  local pkgs
  pkgs=$(grep -oE '^[A-Za-z0-9_.-]+==[^ ;]+' "$lock" | tr '\n' ' ')
  PYTHONPATH="$overlay" "$VENV/bin/python" - $pkgs <<'PY'
import sys
from importlib.metadata import version

for pin in sys.argv[1:]:
    name, want = pin.split("==")
    got = version(name)
    assert got == want, f"{name}: {got} installed, {want} locked"
print("setup:", ", ".join(sys.argv[1:]))
PY
  echo "$want" > "$stamp"
}
install_extras() {
  local name
  for name in $EXTRAS; do install_extra "$name"; done
  compile_sources
}
# qwenft is installed editable: its modules are compiled when first imported, and where
# PYTHONDONTWRITEBYTECODE is set (as on this project's CI machines) in every process, about
# 0.15 CPU-seconds each. Compiled here once (up-to-date files are skipped; a stale .pyc is
# ignored by Python, never used).
compile_sources() {
  "$VENV/bin/python" -m compileall -q qwenft >/dev/null
}

stamp_want="$MODE $(cat requirements/cpu.lock pyproject.toml | sha256sum | cut -c1-16)"
stamp_file="$VENV/.qwenft-install"
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp_want" ]; then
  echo "setup: $VENV is up to date ($MODE install)"
  install_extras
  exit 0
fi

echo "setup: creating $VENV ($MODE install) with $PYTHON"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
rm -f "$stamp_file"

if [ "$MODE" = cpu ]; then
  # torch first: its CPU wheel must be the one every other package sees; setuptools and wheel
  # build the few source packages (deepspeed) in this venv rather than an isolated one.
  "${PIP[@]}" install -q --no-deps "$(grep -E '^torch==' requirements/cpu.lock)" setuptools==84.2.1 wheel==0.48.0
  # deepspeed is a source package whose setup.py imports torch: build it against the torch above.
  "${PIP[@]}" install -q --no-deps --no-build-isolation -r requirements/cpu.lock
  # torchaudio's wheel ships CUDA-linked native libraries that cannot load beside CPU torch;
  # without them torchaudio runs in its "no native library" mode, which text SFT needs (import only).
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -f "$site"/torchaudio/lib/*.so
  "${PIP[@]}" install -q --no-deps --no-build-isolation -e .
else
  "${PIP[@]}" install -q -e ".[train,deepspeed,bitsandbytes,serve,eval,dev]"
  # a CPU install's torchvision hook, left in a venv reused for CUDA: its torchvision loads its ops
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -f "$site/qwenft-torchvision-cpu.pth"
fi

"$VENV/bin/python" -c 'import torch, transformers, llamafactory; print("setup: torch", torch.__version__, "| transformers", transformers.__version__, "| llamafactory", llamafactory.__version__)'
echo "$stamp_want" > "$stamp_file"
rm -f "$VENV"/.qwenft-extra-*
install_extras
