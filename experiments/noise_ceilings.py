"""The sample-efficiency ceilings along one 1-worker run trained with ``--noise-scale``.

    python experiments/noise_ceilings.py exp/noise_ng/synthetic [--margin 0.5]

For N = 2 ... 32: the best sample efficiency N workers could have had along the run up to its
final CV accuracy less ``margin`` points (the speedup tables' target), in both metrics the run
logged (``modelavg.analysis.noise.trajectory_efficiency_ceiling``), and the range of B it logged
in each epoch: the numbers of the noise-scale tables in docs/RESULTS.md, for a run made outside a
sweep (a sweep prints the same ceilings in speedup.md when its reference cell has
``noise_scale: true``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from modelavg.analysis.noise import trajectory_efficiency_ceiling
from modelavg.sweep.results import NOISE_CEILINGS, cell_result
from modelavg.sweep.speedup import frames_to_reach

WORKERS = (2, 4, 8, 16, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a train --out directory with final_cv.json")
    parser.add_argument("--margin", type=float, default=0.5, help="target = final - margin (%%)")
    args = parser.parse_args()
    if not (args.run / "final_cv.json").exists():
        raise SystemExit(f"{args.run}: no final_cv.json (not a finished train --out directory)")
    run = cell_result(args.run)
    if all(len(run[s.curve][0]) < 2 for s in NOISE_CEILINGS):
        raise SystemExit(f"{args.run}: logged no noise scale (train it with --noise-scale)")
    minibatch = int(yaml.safe_load((args.run / "config.yaml").read_text())["minibatch"])
    target = run["cv_frame_accuracy"] - args.margin / 100
    until = frames_to_reach(*run["curve"], target)
    per_epoch = run["frames_per_worker_epoch"]
    print(f"{args.run}: final {100 * run['cv_frame_accuracy']:.2f}%, target {100 * target:.2f}%")
    print(f"reached after {until:,.0f} frames (minibatch {minibatch})")
    for series in NOISE_CEILINGS:
        frames, scales = run[series.curve]
        if len(frames) < 2:  # e.g. no NG-metric series in an SGD run
            continue
        for epoch in range(run["epochs_run"]):
            seen = [
                b for f, b in zip(frames, scales, strict=True) if epoch < f / per_epoch <= epoch + 1
            ]
            if seen:
                print(f"  {series.key}, epoch {epoch + 1}: {min(seen):,.0f} - {max(seen):,.0f}")
        ceilings = [
            100 * trajectory_efficiency_ceiling(frames, scales, minibatch, n, until=until)
            for n in WORKERS
        ]
        print(
            f"  ceiling ({series.metric}) at N = {WORKERS}: "
            + " / ".join(f"{c:.1f}" for c in ceilings)
            + "%"
        )


if __name__ == "__main__":
    main()
