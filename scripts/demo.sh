#!/usr/bin/env bash
# The main job: set up .venv, train the toy DeepSeek-style model on the CPU (progress bar),
# print samples, and write the loss plot, metrics and checkpoint to runs/toy/.
# Extra arguments go to `python -m deepseek_mini.train` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m deepseek_mini.train --config toy --out runs/toy "$@"
