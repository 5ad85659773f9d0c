"""The design's boundaries, checked: the API never reaches the provider; one module owns stripe."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "tasks", "workers", "schema", "sandbox")


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_the_api_process_never_loads_stripe() -> None:
    code = (
        "import sys; from api.app import create_app; create_app(); "
        "import api.routes, api.deps, api.models; "
        "print(sorted(m for m in sys.modules if m == 'stripe' or m.startswith('stripe.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_only_the_provider_module_imports_stripe() -> None:
    importers = sorted(
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "stripe" in imported_modules(path)
    )
    assert importers == ["tasks/provider.py"]


def test_api_never_imports_the_provider() -> None:
    for path in (ROOT / "api").rglob("*.py"):
        source = path.read_text()
        assert "tasks.provider" not in source and "from tasks import provider" not in source, path


def test_sandbox_and_schema_import_nothing_of_ours() -> None:
    ours = {"api", "tasks", "workers", "bench"}
    for package in ("sandbox", "schema"):
        for path in (ROOT / package).rglob("*.py"):
            assert not imported_modules(path) & ours, path


def test_the_procfile_runs_each_role_alone_and_serves_on_every_interface() -> None:
    """One process type per role (each scales alone); the web process listens on every
    interface, or a platform's router could not reach it (`agentpay api` alone binds
    127.0.0.1)."""
    from tasks.settings import ROLES

    lines = dict(
        line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line
    )
    assert set(lines) == {"web", *ROLES}
    assert all(lines[role] == f"agentpay worker {role}" for role in ROLES)
    assert "agentpay api --host 0.0.0.0 --port ${PORT:-8000}" in lines["web"]
