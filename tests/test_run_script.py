"""`./run`: the project's entry point, run from other directories than the project's root.

The script is copied into a project of its own whose Python and tools are stand-ins: each
records where it ran (its working directory), its arguments and AGENTPAY_DATA_DIR."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Python, and every tool of the venv it makes: records the call, then does what the script
# needs of it (`-m venv DIR` makes DIR/bin with these same stand-ins).
STAND_IN = """#!/usr/bin/env bash
printf '%s\\t%s\\t%s\\t%s\\n' "$(basename "$0")" "$PWD" "${AGENTPAY_DATA_DIR-unset}" "$*" \\
    >> "$RUN_SCRIPT_LOG"
if [ "${1-}" = -m ] && [ "${2-}" = venv ]; then
    mkdir -p "$3/bin"
    for tool in python agentpay ruff mypy; do cp "$0" "$3/bin/$tool"; done
fi
exit 0
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "run", project / "run")
    (project / "pyproject.toml").write_text('[project]\nname = "stand-in"\n')
    python = tmp_path / "python3"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    return project


def run(
    project: Path, cwd: Path, *args: str, env: dict[str, str] | None = None
) -> list[tuple[str, str, str, str]]:
    """`<project>/run ARGS` started in `cwd`: each call of a stand-in, as (tool, working
    directory, AGENTPAY_DATA_DIR, arguments)."""
    log = project.parent / "calls.log"
    log.unlink(missing_ok=True)
    environ = {k: v for k, v in os.environ.items() if k not in ("AGENTPAY_DATA_DIR", "DATA_DIR")}
    environ.update(PYTHON=str(project.parent / "python3"), RUN_SCRIPT_LOG=str(log), **(env or {}))
    script = os.path.join(".", os.path.relpath(project / "run", cwd))  # as a user types it
    result = subprocess.run(
        [script, *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    calls = [line.split("\t") for line in log.read_text().splitlines()]
    return [(tool, where, data_dir, argv) for tool, where, data_dir, argv in calls]


def test_commands_run_in_the_callers_directory(project: Path, tmp_path: Path) -> None:
    """A relative path given to `./run` is the caller's (it was the project root's); the
    first run installs into the project's .venv from there too; the default data directory
    is the project's .data wherever the script is started."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    calls = run(project, elsewhere, "dev", "--data-dir", "../dd")
    installs = [c for c in calls if c[0] == "python" and "pip install" in c[3]]
    assert [c[1] for c in installs] == [str(project), str(project)]  # the first run installs
    assert installs[-1][3].endswith("-e .[dev]")
    assert (project / ".venv" / ".install-stamp").exists()
    assert calls[-1] == ("agentpay", str(elsewhere), str(project / ".data"), "dev --data-dir ../dd")

    # Installed: no install again; a data directory of the caller's is kept.
    calls = run(project, elsewhere, "status", env={"AGENTPAY_DATA_DIR": "mine"})
    assert [c[0] for c in calls] == ["python3", "agentpay"]  # the version check, the command
    assert calls[-1] == ("agentpay", str(elsewhere), "mine", "status")
    assert run(project, project, "status")[-1] == (
        "agentpay",
        str(project),
        str(project / ".data"),
        "status",
    )


def test_test_runs_at_the_project_root_from_anywhere(project: Path, tmp_path: Path) -> None:
    run(project, project, "status")  # installed
    calls = run(project, tmp_path, "test", "-k", "name")
    assert [(tool, where, argv) for tool, where, _, argv in calls[1:]] == [
        ("ruff", str(project), "check ."),
        ("ruff", str(project), "format --check ."),
        ("mypy", str(project), "api tasks workers schema sandbox"),
        ("python", str(project), "-m pytest -k name"),
    ]
