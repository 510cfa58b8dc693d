"""``modelavg sweep``: a grid of training runs, one results table, plots and speedup-to-accuracy.

Why: the paper's claims are comparisons across runs (N workers, averaging period K, minibatch,
optimiser, initialisation, schedule). A sweep runs every combination once, can be stopped and
started again, and puts the outcome in one table with plots.

How the parts fit, in the order data flows through them:

- ``grid``: the grid file -> ``Grid`` of ``Cell`` s (name, varying options, full train config),
  every cell checked before anything runs; ``time_models`` checks its ``time_model:`` entry.
- ``runner``: each cell -> one ``modelavg train`` process in ``--out/<cell name>``; plans
  skip / resume / run / infeasible from what the directory holds, runs ``--jobs`` at once.
- ``results``: a finished cell's files -> a result row (options, status, accuracy, timings,
  learning curve, noise-scale curve).
- ``tables``, ``plots``, ``speedup``: the rows -> results.csv and results.md, the PNGs, and
  speedup.md (frames to the 1-worker accuracy, priced by ``time_models``).

Example::

    from modelavg.sweep.runner import run_sweep

    rows = run_sweep("experiments/demo_quick.yaml", "exp/sweep/demo_quick", jobs=2)
    # or: modelavg sweep --grid experiments/demo_quick.yaml --out exp/sweep/demo_quick --jobs 2
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``modelavg sweep`` options."""
    parser.add_argument("--grid", required=True, help="grid YAML file (see modelavg/sweep/grid.py)")
    parser.add_argument("--out", required=True, help="sweep directory: one subdirectory per cell")
    parser.add_argument(
        "--dry-run", action="store_true", help="list the cells and their commands, run nothing"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue half-finished cells from their last checkpoint (default: restart them)",
    )
    parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep finished cells' checkpoints (default: delete them, keep final.pt)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="cells to run at once (default 1; one per core)"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="run and report only the cells whose grid option has this value, e.g. "
        "--only optimizer=ngsgd; VALUE may list several, e.g. --only averaging=model,bmuf "
        "(repeatable: a cell must match each; cell directories are the full grid's)",
    )


def run(args: argparse.Namespace) -> int:
    """0 when every cell finished (or could not fit its data: infeasible), else 1.

    The runner is imported here: building the CLI parser imports this package, and the runner
    brings torch with it."""
    from modelavg.sweep.runner import run_sweep

    rows = run_sweep(
        args.grid,
        args.out,
        args.dry_run,
        resume=args.resume,
        keep_checkpoints=args.keep_checkpoints,
        jobs=args.jobs,
        only=args.only,
    )
    failed = [r["cell"] for r in rows if r["status"] == "failed"]
    if failed:
        print(f"modelavg: {len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
