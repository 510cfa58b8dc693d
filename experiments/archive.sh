#!/usr/bin/env bash
# Keep a sweep's measurements in the repository: every cell's options, logs and final CV result,
# and the reports, and each cell's test WER and hypotheses where the grid decodes, without models,
# checkpoints or TensorBoard files (a few KB per cell).
#   experiments/archive.sh NAME                    # exp/sweep/NAME -> experiments/runs/NAME
#   cp -r experiments/runs/NAME exp/sweep/         # back: `modelavg sweep` skips those cells
#                                                  # (final_cv.json) and reports them with the rest
# So a sweep longer than one sitting can be finished, and its tables re-made, from a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."
name="${1:?usage: $0 NAME (a directory in exp/sweep)}"
src="exp/sweep/$name" dst="experiments/runs/$name"
[ -d "$src" ] || { echo "$0: no sweep in $src" >&2; exit 2; }
mkdir -p "$dst"
cp "$src"/results.* "$src"/speedup.* "$src"/*.png "$dst"/ 2>/dev/null || true
for cell in "$src"/*/; do
  [ -f "$cell/final_cv.json" ] || continue                  # finished cells only
  mkdir -p "$dst/$(basename "$cell")"
  for f in cell.json cell.yaml config.yaml final_cv.json metrics.jsonl train.log; do
    [ -f "$cell/$f" ] && cp "$cell/$f" "$dst/$(basename "$cell")/"
  done
  for dec in "$cell"/decode_*/; do                          # a sweep's WER (graph: in the grid)
    [ -f "$dec/sweep_wer.json" ] || continue
    keep="$dst/$(basename "$cell")/$(basename "$dec")" && mkdir -p "$keep"
    for f in sweep_wer.json wer.json hyp.txt; do
      [ -f "$dec/$f" ] && cp "$dec/$f" "$keep/"
    done
  done
done
echo "$dst: $(find "$dst" -name final_cv.json | wc -l) finished cells"
