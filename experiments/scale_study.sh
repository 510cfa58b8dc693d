#!/usr/bin/env bash
# The scale study (docs/RESULTS.md) from a prepared checkout, in two queues that each use one core:
#   experiments/scale_study.sh fashion     # ~1.7 h on one core
#   experiments/scale_study.sh demo        # ~3 h on one core
# Data first: modelavg prepare-fashion --out data/fashion; modelavg prepare-demo --out data/demo.
# Every sweep is resumable: run the same command again after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  fashion)
    [ -f exp/dbn_fashion/dbn.pt ] || modelavg pretrain --data data/fashion/train \
      --out exp/dbn_fashion --hidden-layers 2 --hidden-dim 256 --context 0 --in-process \
      --workers 1 --threads 1 --no-progress
    for grid in ngsgd_vs_sgd_fashion scale_nk_fashion scale_factors_fashion speedup_fashion; do
      modelavg sweep --grid "experiments/$grid.yaml" --out "exp/sweep/$grid"
    done ;;
  demo)
    [ -f exp/dbn_demo/dbn.pt ] || modelavg pretrain --data data/demo/train --out exp/dbn_demo \
      --hidden-layers 2 --hidden-dim 256 --context 5 --in-process --workers 1 --threads 1 \
      --no-progress
    for grid in ngsgd_vs_sgd_demo scale_nk_demo scale_factors_demo speedup_demo; do
      modelavg sweep --grid "experiments/$grid.yaml" --out "exp/sweep/$grid"
    done ;;
  *) echo "usage: $0 fashion|demo" >&2; exit 2 ;;
esac
