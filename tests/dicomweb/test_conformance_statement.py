"""docs/conformance/dicomweb.md says what the code does: its lists are read back and compared
with the matching keys, query parameters, transfer syntaxes and media types of the code."""

from __future__ import annotations

import re
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

from portal.archive.validate import ACCEPTED_SOP_CLASSES, ACCEPTED_TRANSFER_SYNTAXES
from portal.dicomweb import frames, qido
from portal.imaging import rendition

STATEMENT = Path(__file__).resolve().parents[2] / "docs" / "conformance" / "dicomweb.md"


def _block(name: str) -> str:
    text = STATEMENT.read_text(encoding="utf-8")
    found = re.search(rf"<!-- {re.escape(name)} -->(.*?)<!-- /{re.escape(name)} -->", text,
                      re.DOTALL)
    assert found is not None, f"no {name} block in {STATEMENT.name}"
    return found.group(1)


def _rows(name: str) -> list[list[str]]:
    """The cells of a block's table rows (header and rule left out)."""
    rows = [[c.strip().strip("`") for c in line.strip().strip("|").split("|")]
            for line in _block(name).splitlines() if line.startswith("|")]
    return rows[2:]


def test_the_matching_keys_of_each_level_are_those_of_the_code() -> None:
    levels = {"study": (*qido.STUDY_KEYS, *qido.MATCH_ONLY_KEYS), "series": qido.SERIES_KEYS,
              "instance": qido.INSTANCE_KEYS}
    for level, keys in levels.items():
        documented = {(tag.replace(",", ""), vr) for tag, _keyword, vr, _how in
                      _rows(f"keys:{level}")}
        assert documented == {(k.tag, k.vr) for k in keys}, level
    # Each level searches its own keys and those above it (PS3.18 Table 10.6.1-5).
    assert {k.tag for k in qido.LEVEL_KEYS["instance"]} == {
        k.tag for keys in levels.values() for k in keys}


def test_the_query_parameters_are_those_the_parser_knows() -> None:
    documented = set(re.findall(r"^- `([a-z]+)`", _block("query-parameters"), re.MULTILINE))
    assert documented == set(qido._CONTROL_PARAMS)


def test_the_transfer_syntaxes_and_media_types_are_those_of_the_code() -> None:
    assert {uid for _name, uid in _rows("stored-syntaxes")} == set(ACCEPTED_TRANSFER_SYNTAXES)
    media = {row[0]: set(re.findall(r"`?([0-9.]+)`?", row[1])) for row in
             _rows("frame-media-types") if row[0] != frames.OCTET}
    expected: dict[str, set[str]] = {}
    for syntax, media_type in frames._MEDIA_BY_SYNTAX.items():
        expected.setdefault(media_type, set()).add(syntax)
    assert media == expected
    assert ExplicitVRLittleEndian in _block("retrieve-syntaxes")
    text = STATEMENT.read_text(encoding="utf-8")
    assert f"({len(ACCEPTED_SOP_CLASSES)} today)" in text


def test_the_rendering_parameters_are_those_of_the_parser() -> None:
    block = _block("rendered-parameters")
    assert set(re.findall(r"^- `([a-z]+)", block, re.MULTILINE)) == {
        "viewport", "window", "quality", "width", "preset"}
    functions = {f.replace("-", "_") for f in re.findall(r"`([a-z-]+)`",
                                                         block.split("functions")[1]
                                                         .split("(")[0])}
    assert functions == set(rendition.VOI_FUNCTIONS)
    assert ", ".join(map(str, rendition.WIDTHS[:-1])) in " ".join(block.split())
