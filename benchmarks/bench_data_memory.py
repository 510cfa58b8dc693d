"""Host memory of one process's data: peak RSS to read a corpus and build the shard table of one
worker of P, against the corpus's float32 frames, P = 1, 4, 8 side by side (each in a fresh
process; the same process importing torch and modelavg without reading is the baseline).

    python benchmarks/bench_data_memory.py --data data/synthetic/train     # 3.5M frames, ~1 min
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys
from modelavg.data.kaldi import read_corpus
from modelavg.data.sharded import shard_corpus
data, workers = sys.argv[1], int(sys.argv[2])
frames = dim = 0
if workers:
    corpus = read_corpus(data)
    shards = shard_corpus(corpus, workers, [0], avg_every=1, minibatch=1)
    frames, dim = corpus.num_frames(), corpus.dim
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "frames": frames, "dim": dim}))
"""


def peak(data: str, workers: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, data, str(workers)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a data directory with feats.scp")
    args = parser.parse_args()
    base = peak(args.data, 0)["peak_kib"]
    print("| P | peak RSS above baseline (MB) | corpus float32 frames (MB) | ratio | 1/P |")
    print("|---|---|---|---|---|")
    for workers in (1, 4, 8):
        r = peak(args.data, workers)
        corpus_mb = r["frames"] * r["dim"] * 4 / 1e6
        extra = (r["peak_kib"] - base) * 1024 / 1e6
        ratio = extra / corpus_mb
        print(f"| {workers} | {extra:.0f} | {corpus_mb:.0f} | {ratio:.2f} | {1 / workers:.2f} |")


if __name__ == "__main__":
    main()
