"""The README's promises that CI relies on."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    block = readme[readme.index("```bash") + 1: readme.index("```")]
    commands = [line for line in block if line and not line.startswith("#")]
    assert len(commands) == 2, "the README opens with two commands: the example, then the tests"
    example, tests = commands
    assert "tlearn train examples/" in example and "pytest" in tests
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert tests in ci
    assert '-m "not slow"' in tests, "the README's test command is the fast set"
    assert any(line.endswith("pytest -m slow") for line in ci), "CI runs the slow set too"


def test_every_sub_package_is_installed() -> None:
    """A non-editable install holds every package folder of tlearn/, not only those a list once named."""
    import pytest
    from setuptools import find_packages

    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = config.get("packages", {})
    found = set(listed) if isinstance(listed, list) else set(find_packages(str(ROOT), **listed["find"]))
    folders = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "tlearn").rglob("__init__.py")}
    assert folders and folders <= found, sorted(folders - found)
