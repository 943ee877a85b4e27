"""The repository explains itself: docs/ lists every setting, every cited security requirement
exists, relative links and anchors resolve, and the README stays a short front door."""

from __future__ import annotations

import re
from pathlib import Path

from portal.config import SETTINGS

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SECURITY = DOCS / "security.md"
# Where requirements are cited: code, tests, templates, scripts and the documentation itself.
CITING = ("portal", "tests", "templates", "static", "benchmarks", "docs")
CITING_FILES = ("README.md", "Makefile", "app.py", "pyproject.toml")
SUFFIXES = {".py", ".md", ".html", ".js", ".toml", ".cfg", ""}
# "docs/security.md 28", "... 37-39", "... 12, 40", "... (b) 5", "... (c) 4", "... A".
CITATION = re.compile(
    r"docs/security\.md\s+(?:(\((?P<part>[abc])\))\s*)?"
    r"(?P<numbers>\d+(?:\s*[-\u2013]\s*\d+)?(?:\s*,\s*\d+(?:\s*[-\u2013]\s*\d+)?)*)")
SECTION_CITATION = re.compile(r"docs/security\.md\s+(?P<letter>[A-G])\b")


def _cited_files() -> list[Path]:
    """Every text file that may cite a requirement (dependencies and build output left out)."""
    files = [REPO / name for name in CITING_FILES if (REPO / name).is_file()]
    for folder in CITING:
        for path in sorted((REPO / folder).rglob("*")):
            parts = set(path.relative_to(REPO).parts)
            if path.is_file() and path.suffix in SUFFIXES and not parts & {
                    "node_modules", "__pycache__", ".build"}:
                files.append(path)
    return files


def _numbers(text: str) -> list[int]:
    """``"37-39, 41"`` as ``[37, 38, 39, 41]``."""
    found: list[int] = []
    for piece in text.split(","):
        low, _, high = re.sub("\u2013", "-", piece).partition("-")
        start = int(low)
        found.extend(range(start, int(high) + 1) if high.strip() else [start])
    return found


def _numbered() -> dict[str, set[int]]:
    """The numbers docs/security.md defines in (a), (b) and (c), and its section letters."""
    text = SECURITY.read_text(encoding="utf-8")
    body_a, _, rest = text.partition("\n## (b)")
    body_b, _, body_c = rest.partition("\n## (c)")
    return {
        "a": {int(n) for n in re.findall(r"^\*\*(\d+)\. ", body_a, re.MULTILINE)},
        "b": {int(n) for n in re.findall(r"^\| (\d+) \|", body_b, re.MULTILINE)},
        "c": {int(n) for n in re.findall(r"^\| (\d+) \|", body_c, re.MULTILINE)},
        "letters": set(re.findall(r"^### ([A-G])\. ", body_a, re.MULTILINE)),
    }


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", path.read_text(encoding="utf-8"),
                                         re.MULTILINE)}


def test_every_setting_is_documented_in_operations() -> None:
    text = (DOCS / "operations.md").read_text(encoding="utf-8")
    missing = [s for s in SETTINGS if f"`PORTAL_{s.key}`" not in text]
    rows = "\n".join(f"| `PORTAL_{s.key}` | `{s.default!r}` | {s.help} |" for s in missing)
    assert not missing, f"docs/operations.md lacks these settings; rows to start from:\n{rows}"


def test_security_requirements_keep_their_numbering() -> None:
    numbered = _numbered()
    assert numbered["a"] == set(range(1, 54))
    assert numbered["b"] == set(range(1, 26))
    assert numbered["c"] == set(range(1, 17))
    assert numbered["letters"] == set("ABCDEFG")


def test_every_cited_requirement_exists() -> None:
    numbered = _numbered()
    wrong = []
    for path in _cited_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        where = path.relative_to(REPO)
        for match in CITATION.finditer(text):
            part = match.group("part") or "a"
            wrong.extend(f"{where}: {match.group(0)!r}" for n in _numbers(match.group("numbers"))
                         if n not in numbered[part])
        wrong.extend(f"{where}: {m.group(0)!r}" for m in SECTION_CITATION.finditer(text)
                     if m.group("letter") not in numbered["letters"])
    assert not wrong, "citations of requirements docs/security.md does not have:\n" + \
        "\n".join(wrong)


def test_relative_links_and_anchors_resolve() -> None:
    broken = []
    for page in [REPO / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_is_a_short_front_door() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) < 8 * 1024
    for must in ("make demo", "make test", "## Security", "docs/security.md",
                 "docs/operations.md", "docs/architecture.md", "docs/features.md"):
        assert must in text, must


ROOM_TABLE = re.compile(r"^\| `(?P<room>[a-z_]+)` \| (?P<imports>.*) \|$", re.MULTILINE)


def _room_imports() -> dict[str, set[str]]:
    """Which rooms (sub-packages of portal) each room imports, from the source (grimp:
    top-level, function-level and TYPE_CHECKING imports alike; flat modules left out)."""
    import grimp

    graph = grimp.build_graph("portal", include_external_packages=False)
    rooms = {p.name for p in (REPO / "portal").iterdir()
             if p.is_dir() and (p / "__init__.py").exists() and p.name != "migrations"}
    found: dict[str, set[str]] = {room: set() for room in rooms}
    for module in graph.modules:
        parts = module.split(".")
        if len(parts) < 2 or parts[1] not in rooms:
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            other = imported.split(".")
            if len(other) > 1 and other[1] in rooms and other[1] != parts[1]:
                found[parts[1]].add(other[1])
    return found


def test_the_room_import_table_is_what_the_code_imports() -> None:
    """docs/architecture.md "What may import what" lists, per room, the rooms it imports:
    the table is checked against the source, so it cannot drift."""
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## What may import what", 1)[1].split("\n## ", 1)[0]
    table = section.split("| from | imports |", 1)[1].split("\n\n", 1)[0]
    documented = {m.group("room"): set(re.findall(r"`([a-z_]+)`", m.group("imports")))
                  for m in ROOM_TABLE.finditer(table)}
    assert documented == _room_imports()
