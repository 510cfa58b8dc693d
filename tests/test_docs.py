"""The command reference in docs/CLI.md is generated from the parser and must stay current."""

from pathlib import Path

from modelavg.cli import help_markdown


def test_cli_reference_is_current():
    path = Path(__file__).resolve().parent.parent / "docs" / "CLI.md"
    assert path.read_text() == help_markdown(), (
        "docs/CLI.md is stale: regenerate it with the command at its top"
    )


def test_readme_test_command_is_what_ci_runs():
    root = Path(__file__).resolve().parent.parent
    assert "    make test\n" in (root / "README.md").read_text()
    assert "\nmake test\n" in (root / ".ci" / "run").read_text()
