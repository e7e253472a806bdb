#!/usr/bin/env bash
# Every test: set up .venv, make sure Chromium is there for the book's browser check, then
# pytest over tests/ (which also builds the book and opens every page in headless Chromium)
# plus strict nbval over the lecture notebooks and the exercise solutions.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing Debian's chromium for the browser check"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "[test] chromium is missing: install it (Debian/Ubuntu: sudo apt-get install chromium)" >&2
  fi
fi
export PYTHONHASHSEED=0
exec .venv/bin/python -m pytest tests notebooks solutions \
  --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=600 -p no:cacheprovider "$@"
