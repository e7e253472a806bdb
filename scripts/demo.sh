#!/usr/bin/env bash
# The main job: set up .venv, train the toy DeepSeek-style model on the CPU (progress bar),
# print samples, and write the loss plot, metrics and checkpoint to runs/toy/.
# Extra arguments go to `python -m deepseek_mini.train` (see its --help):
#   bash scripts/demo.sh --overwrite                      # run again over a finished demo
#   bash scripts/demo.sh --resume runs/toy --steps 1600   # continue it (config and folder come from the checkpoint)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for arg in "$@"; do
  if [ "$arg" = "--resume" ] || [ "${arg%%=*}" = "--resume" ]; then
    exec .venv/bin/python -m deepseek_mini.train "$@"
  fi
done
exec .venv/bin/python -m deepseek_mini.train --config toy --out runs/toy "$@"
