"""Set-up: one dependency list, everything installed into the venv, one version number."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import modelavg

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def name(requirement: str) -> str:
    """PEP 503 normalised project name of a requirement string."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9._-]+)", requirement)[1]).lower()


def installed_by(extras: set[str]) -> tuple[set[str], set[str]]:
    """(packages, extras) that `pip install .[extras]` brings, following modelavg[...] inside."""
    todo, seen, packages = set(extras), set(), {name(r) for r in PROJECT["dependencies"]}
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for req in PROJECT["optional-dependencies"][extra]:
            if name(req) == "modelavg":
                todo |= set(re.search(r"\[(.*)\]", req)[1].split(",")) - seen
            else:
                packages.add(name(req))
    return packages, seen


def test_requirements_install_the_project_with_every_extra():
    lines = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    (editable,) = [ln for ln in lines if ln.startswith("-e")]
    extras = set(re.fullmatch(r"-e \.\[(.*)\]", editable)[1].split(","))
    assert extras == {"speech", "mpi", "dev"}  # what the README tells pip users to install
    packages, reached = installed_by(extras)
    assert reached == set(PROJECT["optional-dependencies"]), "an extra that CI never installs"
    extra_lines = {name(ln) for ln in lines if ln != editable}
    assert extra_lines <= packages, (
        f"requirements.txt adds {sorted(extra_lines - packages)}: list it in pyproject.toml "
        "(requirements.txt may only pin what pyproject.toml asks for)"
    )


def test_version_is_the_package_metadata():
    assert modelavg.__version__ == importlib.metadata.version("modelavg") == PROJECT["version"]


@pytest.mark.skipif(
    "--version" not in (ROOT / "modelavg" / "cli.py").read_text(), reason="cli has no --version yet"
)
def test_version_flag():
    r = subprocess.run(
        [sys.executable, "-m", "modelavg", "--version"], capture_output=True, text=True, check=True
    )
    assert r.stdout == f"modelavg {importlib.metadata.version('modelavg')}\n"


def make_dry_run(target: str, venv: Path) -> list[str]:
    r = subprocess.run(
        ["make", "--no-print-directory", "-n", target, f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        # under `make test` (CI) the outer make's level would add "make[1]: ..." lines
        env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")},
    )
    return r.stdout.splitlines()


def test_make_installs_into_the_venv_only(tmp_path):
    """PEP 668 systems refuse pip into the system Python: only the venv's pip may run."""
    venv = tmp_path / "venv"
    commands = make_dry_run("test", venv)
    assert f"python3 -m venv {venv} || {{ rm -rf {venv}; exit 1; }}" in commands
    pips = [c for c in commands if "pip install" in c]
    assert pips == [f"{venv}/bin/python -m pip install -q -r requirements.txt"]
    assert commands[-1] == f"MODELAVG_REQUIRE_MPI=1 {venv}/bin/python -m pytest -q"


def test_warm_setup_skips_pip(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / ".installed").touch()
    assert not [c for c in make_dry_run("setup", venv) if "pip install" in c or " -m venv " in c]
