#!/usr/bin/env bash
# Build the online book into book/_build/html (offline; Sphinx warnings are errors).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python book/build.py
echo "[book] open book/_build/html/index.html"
