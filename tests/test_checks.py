"""The layer rules `make check` enforces (import-linter contracts in pyproject.toml): they hold
on the code as it is, and each one fails when a module takes a forbidden import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

CONTRACT_NAMES = {
    "no-routes-below-faces": "imaging, archive and index never import routes",
    "index-alone": "index never imports the archive, imaging, access or a face",
    "image-path-layers": "imaging above archive above index",
    "imaging-core-pure": "the imaging core imports no Flask, no database and no face",
    "archive-not-dicomweb": "the archive never imports dicomweb",
    "outer-faces": "nothing below the console and the API imports them",
    "archive-acyclic": "the archive's modules import each other without a cycle",
    "flat-cli-below-rooms": "portal.cli and portal.repeat import no room",
    "access-alone": "access imports no domain",
    "inbox-apart": "the quarantine is apart from the image path",
    "inbox-below-faces": "the inbox never imports the console or the API",
}


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter on the tree at ``root`` with its pyproject.toml, no cache."""
    return subprocess.run([str(LINT_IMPORTS), "--no-logo", "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=120, check=False)


def test_every_contract_is_kept_by_the_code() -> None:
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in CONTRACT_NAMES.values():
        assert f"{name} KEPT" in result.stdout
    assert f"Contracts: {len(CONTRACT_NAMES)} kept, 0 broken." in result.stdout


@pytest.mark.parametrize(("contract", "module", "forbidden"), [
    ("no-routes-below-faces", "portal/imaging/presets.py", "portal.studies.routes"),
    ("no-routes-below-faces", "portal/archive/store.py", "portal.health"),
    ("no-routes-below-faces", "portal/index/service.py", "portal.studies.patients"),
    ("index-alone", "portal/index/service.py", "portal.audit"),
    ("index-alone", "portal/index/models.py", "portal.archive.store"),
    ("image-path-layers", "portal/archive/store.py", "portal.imaging.render"),
    ("outer-faces", "portal/audit.py", "portal.admin.console"),
    ("outer-faces", "portal/notify.py", "portal.api.openapi"),
    ("flat-cli-below-rooms", "portal/cli.py", "portal.archive.cli"),
    ("flat-cli-below-rooms", "portal/repeat.py", "portal.access.cli"),
    ("access-alone", "portal/access/policy.py", "portal.reports.service"),
    ("access-alone", "portal/access/principal.py", "portal.sharing.sessions"),
    ("inbox-apart", "portal/archive/ingest.py", "portal.inbox.quarantine"),
    ("inbox-apart", "portal/access/policy.py", "portal.inbox.models"),
    ("inbox-below-faces", "portal/inbox/reconcile.py", "portal.admin.console"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path: Path, contract: str, module: str,
                                                forbidden: str) -> None:
    """A copy of the package with one import added: that contract (at least) is broken."""
    shutil.copytree(REPO / "portal", tmp_path / "portal",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / module).open("a") as source:
        source.write(f"\n\ndef _probe() -> None:\n    import {forbidden}  # noqa: F401\n")
    result = _lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{CONTRACT_NAMES[contract]} BROKEN" in result.stdout
    assert forbidden in result.stdout


@pytest.mark.parametrize(("module", "imported"), [
    ("portal/archive/external.py", "portal.archive.ingest"),  # copies -> external -> ingest
    ("portal/archive/store.py", "portal.archive.copies"),
])
def test_an_import_cycle_in_the_archive_breaks_its_contract(tmp_path: Path, module: str,
                                                            imported: str) -> None:
    """The cycle issue 14 item 5 removed (copies -> external -> ingest -> copies), or any
    other, is caught again."""
    shutil.copytree(REPO / "portal", tmp_path / "portal",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / module).open("a") as source:
        source.write(f"\n\ndef _probe() -> None:\n    import {imported}  # noqa: F401\n")
    result = _lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{CONTRACT_NAMES['archive-acyclic']} BROKEN" in result.stdout


def _cycles(package: str) -> list[list[str]]:
    """Groups of modules that import each other round (strongly connected components of
    the module import graph, imports under TYPE_CHECKING and inside functions included)."""
    import grimp

    graph = grimp.build_graph(package, include_external_packages=False)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_of_the_portal_imports_itself_back() -> None:
    """No import cycle between modules anywhere in portal/ (issue 14 item 5: the access,
    sharing and reports cycle, portal.cli <-> archive.cli, the archive's copies -> external
    -> ingest -> copies, sharing.service <-> sharing.sessions, archive.after <-> ingest)."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    assert _cycles("portal") == []
