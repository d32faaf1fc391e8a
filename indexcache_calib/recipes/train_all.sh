#!/usr/bin/env bash
# Train both tiny DSA checkpoints into indexcache_calib/models/ within one wall-time budget.
#
#   bash indexcache_calib/recipes/train_all.sh [--device cuda] [--minutes 7] [extra train_tiny flags...]
#
# The default model (16 layers, hidden 128) gets 40% of the minutes and the deep one
# (48 layers, hidden 64) 60%, since each of its steps runs three times as many layers.
# On a GPU the per-stage epoch caps usually end each stage before its time budget.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
DEVICE=cuda
MINUTES=7
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --minutes) MINUTES=$2; shift 2 ;;
    *) break ;;
  esac
done
share() { "$PYTHON" -c "print(round($MINUTES * $1, 2))"; }
"$PYTHON" -m indexcache_calib.recipes.train_tiny --device "$DEVICE" --budget-minutes "$(share 0.4)" \
  --layers 16 --hidden 128 --out indexcache_calib/models/tiny-dsa "$@"
"$PYTHON" -m indexcache_calib.recipes.train_tiny --device "$DEVICE" --budget-minutes "$(share 0.6)" \
  --layers 48 --hidden 64 --out indexcache_calib/models/tiny-dsa-deep "$@"
du -sh indexcache_calib/models/tiny-dsa indexcache_calib/models/tiny-dsa-deep
