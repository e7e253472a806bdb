#!/usr/bin/env bash
# Every test: set up .venv, then pytest over tests/ plus strict nbval over the lecture
# notebooks and the exercise solutions (their stored outputs must be reproduced).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONHASHSEED=0 MPLBACKEND=Agg
exec .venv/bin/python -m pytest tests notebooks solutions \
  --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=600 -p no:cacheprovider "$@"
