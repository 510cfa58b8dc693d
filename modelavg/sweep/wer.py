"""Word error rate per sweep cell: each finished cell's ``final.pt`` decoded through one graph.

Why: the paper's tables are WER against the number of workers; frame accuracy alone cannot say
whether averaging over N workers cost 0.3 or 3 WER points. Three grid keys, beside the train
options, turn it on::

    graph: data/demo/lang_enus   # from modelavg make-graph
    decode: data/demo/test       # the data dir scored (its ``text``)
    acwt: 0.1                    # optional: without it each cell's scale is tuned on its cv dir

Tuning picks, per cell, the scale of ``decode.ACWT_GRID`` with the lowest WER on the cell's
``cv`` data dir (``tune_acwt``), as ``modelavg demo`` does: the best scale moves with the model.
A cell's decode lives in ``<cell>/decode_<graph>_<split>/`` (``hyp.txt``, ``wer.json``, the cv
decodes under ``tune_cv/``) with ``sweep_wer.json``, reused while the graph's inputs and these
keys are unchanged (a re-run cell starts from an empty directory). The graph is read once per
sweep; cells decode one at a time (the search keeps module state), each over ``--jobs``
processes.

Example::

    spec = wer_spec(raw_grid_dict, Path("experiments/wer_demo.yaml"))
    row.update(CellDecoder(spec, jobs=2).cell_wer(cell_dir, cv_dir))
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelavg.errors import UsageError
from modelavg.io import atomic_write_bytes

KEYS = ("graph", "decode", "acwt")  # the grid file's keys for this
COLUMNS = ("wer", "wer_ins", "wer_del", "wer_sub", "wer_words", "acwt", "cv_wer")


@dataclass(frozen=True)
class WerSpec:
    graph: Path
    data: Path
    acwt: float | None  # None: tuned per cell on its cv dir

    @property
    def split(self) -> str:
        return self.data.name


def wer_spec(raw: dict[str, Any], path: Path) -> WerSpec | None:
    """The grid's decode settings (None without ``graph``); one-line errors naming the file."""
    if not any(k in raw for k in KEYS):
        return None
    if not isinstance(raw.get("graph"), str) or not isinstance(raw.get("decode"), str):
        raise UsageError(f"{path}: 'graph' and 'decode' go together: a graph dir and a data dir")
    acwt = raw.get("acwt")
    if acwt is not None and (isinstance(acwt, bool) or not isinstance(acwt, int | float)):
        raise UsageError(f"{path}: acwt must be a number (or left out: tuned on cv)")
    if acwt is not None and acwt <= 0:
        raise UsageError(f"{path}: acwt must be positive, got {acwt}")
    return WerSpec(Path(raw["graph"]), Path(raw["decode"]), None if acwt is None else float(acwt))


class CellDecoder:
    """Decodes finished cells through the spec's graph, loaded at the first cell."""

    def __init__(self, spec: WerSpec, jobs: int) -> None:
        self.spec, self.jobs = spec, jobs
        self._graph = None
        self._meta: dict | None = None
        self._lock = threading.Lock()

    def check(self) -> None:
        """Fail before any training when the graph or the data dir is missing."""
        from modelavg.decoding.graph import load_graph

        load_graph(self.spec.graph, need_fst=False)
        if not (self.spec.data / "text").is_file():
            raise UsageError(f"{self.spec.data}/text: no such file (decode: needs transcripts)")

    def cell_wer(self, cell_dir: Path, cv_dir: str | None) -> dict[str, Any]:
        """The cell's WER columns, decoded now or read back from an earlier sweep."""
        from modelavg.decoding.decode import decode_data_dir, tune_acwt
        from modelavg.decoding.graph import load_graph

        with self._lock:
            spec = self.spec
            if self._meta is None:  # HCLG itself is read only when a cell needs decoding
                self._meta = load_graph(spec.graph, need_fst=False).meta
            out = cell_dir / f"decode_{spec.graph.name}_{spec.split}"
            key = {"graph_hash": self._meta.get("inputs_hash"), "data": str(spec.data),
                   "acwt_setting": spec.acwt}  # fmt: skip
            done = _read_json(out / "sweep_wer.json")
            if done is not None and done.get("key") == key:
                return done["columns"]
            if self._graph is None:
                self._graph = load_graph(spec.graph)
            graph = self._graph
            model, options = cell_dir / "final.pt", {"jobs": self.jobs, "progress": False}
            acwt, cv_wer = spec.acwt, None
            if acwt is None:
                if cv_dir is None:
                    raise UsageError(
                        f"{cell_dir}: no cv dir to tune acwt on; give acwt: in the grid"
                    )
                acwt, tuned = tune_acwt(model, cv_dir, graph, out / "tune_cv", **options)
                cv_wer = tuned[acwt]["wer"]
            r = decode_data_dir(model, spec.data, graph, acwt=acwt, out_dir=out, **options)
            if "wer" not in r:
                raise UsageError(f"{spec.data}/text: no such file (decode: needs transcripts)")
            values = (r["wer"], r["ins"], r["del"], r["sub"], r["words"], acwt, cv_wer)
            columns = dict(zip(COLUMNS, values, strict=True))
            record = {"key": key, "columns": columns}
            atomic_write_bytes(json.dumps(record, indent=1).encode(), out / "sweep_wer.json")
            return columns


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def format_wer_cell(row: dict[str, Any]) -> str:
    """``19.55% (14/2/27)``: WER with insertions/deletions/substitutions, for results.md."""
    if row.get("wer") is None:
        return ""
    return f"{100 * row['wer']:.2f}% ({row['wer_ins']}/{row['wer_del']}/{row['wer_sub']})"
