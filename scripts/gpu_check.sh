#!/usr/bin/env bash
# The one-call GPU check (issue 23): environment, CUDA tests, correctness matrix, sync audit and
# throughput, summarised in OUT_DIR/summary.json (default: $OUT/gpu_check, else ./gpu_check).
#   scripts/gpu_check.sh [--device cuda|cuda:N|cpu] [--quick] [--out OUT_DIR]
# No network is needed: wheels the machine lacks (kaldiio, ...) may be carried in .whl/ and are
# installed into a scratch folder. Exit 0 when every step passed.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import kaldiio" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d)
  "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$site" .whl/*.whl &&
    export PYTHONPATH="$PYTHONPATH:$site"
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
