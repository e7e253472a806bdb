#!/usr/bin/env bash
# Create .venv and install deepseek_mini with everything the course needs.
# Needs only python3 (>= 3.10) and pip. Safe to run again: it skips the install when
# pyproject.toml has not changed since the last successful one.
#
# TORCH_SPEC picks the torch build (default: the pinned CPU wheel, installed first so that
# pip never pulls a multi-GB CUDA build on a CPU machine). On a GPU machine, for example:
#   TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    # Debian/Ubuntu ship python3 without ensurepip unless python3-venv is installed.
    echo "[setup] 'python3 -m venv' is unavailable; using virtualenv instead"
    rm -rf "$VENV"
    "$PYTHON" -m pip install --quiet --user virtualenv || "$PYTHON" -m pip install --quiet --break-system-packages --user virtualenv
    "$PYTHON" -m virtualenv --quiet "$VENV"
  fi
fi

stamp="$VENV/.deepseek-mini-installed"
want="$(cat pyproject.toml scripts/setup.sh | "$VENV/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())') $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

echo "[setup] installing $TORCH_SPEC"
"$VENV/bin/python" -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install --quiet $TORCH_SPEC 2>&1 | grep -v "is ignored" || true
echo "[setup] installing deepseek_mini and the course tools (jupyterlab, nbval, triton, ...)"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import torch, deepseek_mini, nbval, jupyterlab; print('[setup] ok: torch', torch.__version__)"
echo "$want" > "$stamp"
