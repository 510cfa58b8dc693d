"""The grid file: which training runs (cells) a sweep holds, each checked before anything runs.

Top-level keys are ``train`` options (underscored), fixed for every cell; ``grid`` maps option
names to lists of values (every combination is a cell; ``a+b: [[a1, b1], ...]`` varies two
options together); ``exclude`` drops the cells matching any of its option: value mappings (as a
CI matrix does); ``time_model`` and ``accuracy_drop`` configure the speedup table
(``modelavg.sweep.time_models``); ``graph``, ``decode`` and ``acwt`` add a word error rate per
cell (``modelavg.sweep.wer``)::

    data: data/demo/train
    cv: data/demo/cv
    in_process: true
    epochs: 3
    grid:
      workers: [1, 2, 4, 8]
      avg_every: [1, 10]
      optimizer+lr: [[sgd, 0.1], [ngsgd, 0.05]]
    exclude:
      - {workers: 1, avg_every: 10}       # one worker does not average
    time_model: [paper, paper-hardware]   # or measured, or {step_seconds: measured, ...}
    graph: data/demo/lang_enus            # decode each cell's final.pt on data/demo/test
    decode: data/demo/test

Example::

    grid = load_grid("experiments/demo_quick.yaml")
    [cell.name for cell in grid.cells]    # ["workers=1,epochs=4", ...]
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modelavg.config import config_fields, load_config
from modelavg.errors import UsageError
from modelavg.sweep.time_models import TimeModelSpec, time_model_specs
from modelavg.sweep.wer import KEYS as WER_KEYS
from modelavg.sweep.wer import WerSpec, wer_spec

RESERVED = ("grid", "exclude", "time_model", "accuracy_drop", *WER_KEYS)
SET_BY_SWEEP = ("out", "resume")
RANDOM_INIT = ("random", "none")
PAPER_DROP = 0.005  # the target: 1-worker accuracy minus this (absolute)


@dataclass(frozen=True)
class Cell:
    """One training run: its directory name, the options that vary, and every option given."""

    name: str
    varying: dict[str, Any]
    config: dict[str, Any]


@dataclass
class Grid:
    """A checked grid file: fixed options, axes (option names, one value tuple per point), the
    speedup settings, the decode settings (None: no WER) and the cells."""

    path: Path
    fixed: dict[str, Any]
    axes: list[tuple[tuple[str, ...], list[tuple]]]
    time_models: list[TimeModelSpec] = field(default_factory=lambda: [TimeModelSpec()])
    accuracy_drop: float = PAPER_DROP
    wer: WerSpec | None = None
    cells: list[Cell] = field(default_factory=list)

    @property
    def varying(self) -> list[str]:
        return [name for names, _ in self.axes for name in names]

    def others(self, name: str) -> list[str]:
        """The varying options not on ``name``'s axis: with ``workers+epochs``, cells that differ
        in N and in epochs still belong to one line of an N plot and one speedup table."""
        own = next((names for names, _ in self.axes if name in names), (name,))
        return [n for n in self.varying if n not in own]


def load_grid(path: str | os.PathLike) -> Grid:
    """Read and check a grid file; every cell's options are validated before anything runs."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: cannot read grid file ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a grid file must be a mapping of option: value")
    known = {f.name for f in config_fields()}
    for key in raw:
        if key not in known and key not in RESERVED:
            raise UsageError(f"{path}: unknown key {key!r} (train options, {', '.join(RESERVED)})")
        if key in SET_BY_SWEEP:
            raise UsageError(f"{path}: {key!r} is set by the sweep (one directory per cell)")
    fixed = {k: normalise(k, v) for k, v in raw.items() if k not in RESERVED}
    axes = parse_axes(path, raw.get("grid") or {}, known)
    overlap = set(fixed) & {n for names, _ in axes for n in names}
    if overlap:
        raise UsageError(f"{path}: {sorted(overlap)[0]!r} is both fixed and in the grid")
    drop = raw.get("accuracy_drop", PAPER_DROP)
    if not isinstance(drop, int | float) or not 0 <= drop < 1:
        raise UsageError(f"{path}: accuracy_drop must be a number in [0, 1), e.g. 0.005")
    specs = time_model_specs(raw.get("time_model"), path)
    grid = Grid(path, fixed, axes, specs, float(drop), wer_spec(raw, path))
    grid.cells = make_cells(grid, parse_exclude(path, raw.get("exclude") or [], grid.varying))
    return grid


def parse_exclude(path: Path, spec: Any, varying: list[str]) -> list[dict[str, Any]]:
    """``exclude:`` as a list of {grid option: value} mappings."""
    if not isinstance(spec, list) or not all(isinstance(e, dict) and e for e in spec):
        raise UsageError(f"{path}: 'exclude' must be a list of option: value mappings")
    for entry in spec:
        for name in entry:
            if name not in varying:
                raise UsageError(f"{path}: exclude: {name!r} is not an option of the grid")
    return [{n: normalise(n, v) for n, v in entry.items()} for entry in spec]


def parse_axes(path: Path, spec: Any, known: set[str]) -> list[tuple[tuple[str, ...], list[tuple]]]:
    """``grid:`` entries as (names, value tuples); ``a+b`` entries vary options together."""
    if not isinstance(spec, dict):
        raise UsageError(f"{path}: 'grid' must map option names to lists of values")
    axes = []
    for key, values in spec.items():
        names = tuple(str(key).split("+"))
        for name in names:
            if name not in known:
                raise UsageError(f"{path}: grid: unknown option {name!r}")
            if name in SET_BY_SWEEP:
                raise UsageError(f"{path}: grid: {name!r} is set by the sweep")
        if not isinstance(values, list) or not values:
            raise UsageError(f"{path}: grid: {key} must be a non-empty list of values")
        points = []
        for v in values:
            point = tuple(v) if len(names) > 1 and isinstance(v, list) else (v,)
            if len(point) != len(names):
                raise UsageError(f"{path}: grid: {key}: {v!r} is not {len(names)} values")
            points.append(tuple(normalise(n, x) for n, x in zip(names, point, strict=True)))
        axes.append((names, points))
    return axes


def normalise(name: str, value: Any) -> Any:
    """``init: random`` (or none/null) means a random initialisation: no --init."""
    if name == "init" and (value is None or str(value).lower() in RANDOM_INIT):
        return None
    return value


def make_cells(grid: Grid, exclude: list[dict[str, Any]]) -> list[Cell]:
    """Every combination of the axes not excluded, validated as a train config, with a unique
    safe name. An exclude entry that matches no combination is refused (a typo)."""
    cells, seen, used = [], {}, set()
    for combo in itertools.product(*[points for _, points in grid.axes]):
        varying = {
            n: v
            for (names, _), point in zip(grid.axes, combo, strict=True)
            for n, v in zip(names, point, strict=True)
        }
        hits = {i for i, e in enumerate(exclude) if all(varying[n] == v for n, v in e.items())}
        if hits:
            used |= hits
            continue
        config = {"progress": False, **grid.fixed, **varying}
        name = cell_name(varying)
        try:
            load_config(None, dict(config))
        except (UsageError, TypeError) as exc:
            raise UsageError(f"{grid.path}: cell {name}: {exc}") from None
        if name in seen:
            raise UsageError(f"{grid.path}: cells {seen[name]} and {varying} share the name {name}")
        seen[name] = varying
        cells.append(Cell(name, varying, config))
    for i, entry in enumerate(exclude):
        if i not in used:
            raise UsageError(f"{grid.path}: exclude: {entry} matches no cell")
    return cells


def default_of(name: str) -> Any:
    """A train option's default: an option left out and one spelled out at it are one run."""
    return next(f.default for f in config_fields() if f.name == name)


def format_option(name: str, value: Any) -> Any:
    """An option's value as tables show it (no ``--init``: random)."""
    return "random" if name == "init" and value is None else value


def format_value(name: str, value: Any) -> str:
    """An option's value as a cell name spells it: YAML's lower-case booleans."""
    value = format_option(name, value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def cell_name(varying: dict[str, Any]) -> str:
    """``workers=8,avg_every=10,optimizer=sgd``: a directory name from the varying options."""
    if not varying:
        return "single"
    parts = []
    for name, value in varying.items():
        text = re.sub(r"[^A-Za-z0-9._+-]+", "_", format_value(name, value)).strip("_") or "_"
        if len(text) > 40:  # e.g. a long --init path: keep the end, disambiguate with a hash
            digest = hashlib.sha1(str(value).encode()).hexdigest()[:8]
            text = f"{text[-31:]}-{digest}"
        parts.append(f"{name}={text}")
    return ",".join(parts)
