"""Window presets follow modality and body part, each value and each name offered once."""

from __future__ import annotations

from typing import Any

import pytest

from portal.imaging.presets import presets_for


def _named(presets: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    return [(p["name"], p["center"], p["width"]) for p in presets]


def test_a_body_ct_offers_each_window_once_in_plain_words() -> None:
    # The demo CT's file windows beside the portal's own (issue 13 item 4).
    file = [{"name": "SOFT TISSUE", "center": 40, "width": 400},
            {"name": "LUNG", "center": -600, "width": 1500},
            {"name": "BONE", "center": 400, "width": 1800}]
    assert _named(presets_for("CT", "CHESTABDPELVIS", file)) == [
        ("Soft tissue", 40, 400), ("Lung", -600, 1500), ("Bone", 400, 1800),
        ("Liver", 60, 160)]


@pytest.mark.parametrize(("part", "names"), [
    ("CHEST", ["Soft tissue", "Lung", "Bone"]),
    ("ABDOMEN", ["Soft tissue", "Liver", "Bone"]),
    ("HEAD", ["Brain", "Subdural", "Bone"]),
    ("brain", ["Brain", "Subdural", "Bone"]),
    ("LSPINE", ["Soft tissue", "Bone"]),
    ("", ["Soft tissue", "Lung", "Bone"])])
def test_ct_presets_follow_the_body_part(part: str, names: list[str]) -> None:
    assert [p["name"] for p in presets_for("CT", part, [])] == names


def test_a_chest_ct_gets_no_brain_window_and_one_bone_window() -> None:
    file = [{"name": "Bone", "center": 300, "width": 1500}]
    presets = _named(presets_for("CT", "CHEST", file))
    assert presets == [("Bone", 300, 1500), ("Soft tissue", 40, 400), ("Lung", -600, 1500)]
    assert "Brain" not in [name for name, _c, _w in presets]


def test_near_equal_values_count_once_and_unnamed_windows_take_the_usual_name() -> None:
    file = [{"name": "File 1", "center": 41, "width": 398},
            {"name": "WINDOW2", "center": 40, "width": 400},
            {"name": "File 3", "center": 1234, "width": 77}]
    assert _named(presets_for("CT", "CHEST", file)) == [
        ("Soft tissue", 41, 398), ("Scanner's window 3", 1234, 77), ("Lung", -600, 1500),
        ("Bone", 400, 1800)]


def test_other_modalities_get_only_their_files_windows() -> None:
    file = [{"name": "T2 FLAIR", "center": 600, "width": 1200},
            {"name": "t2 flair copy", "center": 601, "width": 1190}]
    assert _named(presets_for("MR", "BRAIN", file)) == [("T2 flair", 600, 1200)]
    assert presets_for("CR", "CHEST", []) == []
