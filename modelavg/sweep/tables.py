"""results.csv (every row, every measured column) and results.md (the readable table, the
paper's N-by-K table shape, the plots and the speedup section).

Example::

    write_csv(grid, rows, out / "results.csv")
    (out / "results.md").write_text(results_markdown(grid, rows, plots, speedup_text))
"""

from __future__ import annotations

import csv
from io import StringIO
from pathlib import Path
from typing import Any

from modelavg.io import atomic_write_bytes
from modelavg.sweep.grid import Grid, format_option
from modelavg.sweep.results import KEY_OPTIONS, group_key, grouped, label
from modelavg.sweep.wer import COLUMNS as WER_COLUMNS
from modelavg.sweep.wer import format_wer_cell

RESULT_COLUMNS = (
    "cv_frame_accuracy",
    "cv_cross_entropy",
    "epochs_run",
    "frames_per_worker",
    "frames_per_worker_epoch",
    "rounds_per_epoch",
    "wall_s",
    "train_s",
    "averaging_share",
    "step_s",
    "syncs",
    "parameters",
    "cv_acc_per_epoch",
    "error",
)


def csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def write_csv(grid: Grid, rows: list[dict], path: Path) -> None:
    """One line per cell: its options (the key ones and the grid's), status and measurements."""
    options = list(KEY_OPTIONS) + [n for n in grid.varying if n not in KEY_OPTIONS]
    columns = ["cell", "status", *options, *RESULT_COLUMNS, *(WER_COLUMNS if grid.wer else ())]
    text = StringIO(newline="")
    writer = csv.DictWriter(text, columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: csv_value(format_option(k, row.get(k))) for k in columns})
    atomic_write_bytes(text.getvalue().encode(), path)


def results_markdown(grid: Grid, rows: list[dict], plots: list[Path], speedup: str | None) -> str:
    varying = grid.varying
    head = [*varying, "status", "CV acc", "CV loss", "epochs run", "frames/worker", "wall s"]
    head.append("avg %")
    if grid.wer is not None:
        head += [f"{grid.wer.split} WER (ins/del/sub)", "acwt"]
    lines = [
        f"# Sweep results: {grid.path.name}",
        "",
        "Fixed options: "
        + (", ".join(f"`{k}={format_option(k, v)}`" for k, v in grid.fixed.items()) or "none"),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        done = r["status"] == "done"
        cells = [str(format_option(k, r.get(k))) for k in varying] + [r["status"]]
        if done:
            cells += [
                f"{100 * r['cv_frame_accuracy']:.2f}%",
                f"{r['cv_cross_entropy']:.4f}",
                str(r["epochs_run"]),
                str(r["frames_per_worker"]),
                f"{r['wall_s']:.1f}" if r.get("wall_s") is not None else "",
                f"{100 * r['averaging_share']:.2f}",
            ]
        else:
            cells += [r.get("error", "")[:80].replace("|", "/"), "", "", "", "", ""]
        if grid.wer is not None:
            cells += [format_wer_cell(r), f"{r['acwt']:g}" if r.get("acwt") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "CV accuracy per epoch (epoch 0 = initial model) is in results.csv.", ""]
    if any("workers" not in names for names, _ in grid.axes) and "workers" in varying:
        lines += [*pivot_by_workers(grid, rows), ""]  # N against another axis
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    if speedup:
        lines += ["", speedup]
    return "\n".join(lines) + "\n"


def pivot_by_workers(grid: Grid, rows: list[dict]) -> list[str]:
    """The paper's table shape: one row per N, one column per point of the longest other axis
    (ties: the later one), one table per setting of the remaining options.  Each entry is the
    final CV accuracy with, in brackets, the averaging rounds per epoch (the regime: the paper
    had hundreds), or why the cell has no result."""
    axes = [names for names, _ in grid.axes if "workers" not in names]
    sizes = {names: len(points) for names, points in grid.axes}
    column_axis = max(reversed(axes), key=lambda names: sizes[names])
    rest = [n for names in axes if names != column_axis for n in names]
    lines = ["CV frame accuracy (%) by N; [averaging rounds per epoch]:"]
    for table_key, table_rows in grouped(rows, rest).items():
        columns = list(grouped(table_rows, column_axis))
        by_cell = {(int(r["workers"]), group_key(r, column_axis)): r for r in table_rows}
        lines.append("")
        if rest:
            lines += [f"{label(table_key)}:", ""]
        lines += [
            "| N | " + " | ".join(label(c) for c in columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for n in sorted({int(r["workers"]) for r in table_rows}):
            entries = [pivot_entry(by_cell.get((n, c))) for c in columns]
            lines.append(f"| {n} | " + " | ".join(entries) + " |")
    return lines


def pivot_entry(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] != "done":
        return row["status"]
    return f"{100 * row['cv_frame_accuracy']:.2f} [{row['rounds_per_epoch']}]"
