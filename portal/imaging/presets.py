"""The window presets a series is offered: the file's own windows, then the usual CT windows
for the part of the body it shows (a brain window on a head, a lung window on a chest), each
value once and each name once, named in plain words.

CT values are in Hounsfield units; other modalities have no fixed scale, so they are offered
only the windows their files carry. Body parts are the defined terms of Body Part Examined
(0018,0015; PS3.16 Annex L), matched loosely because modalities write them in many ways.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

# (name, centre, width) in HU.
SOFT_TISSUE = ("Soft tissue", 40.0, 400.0)
LUNG = ("Lung", -600.0, 1500.0)
BONE = ("Bone", 400.0, 1800.0)
LIVER = ("Liver", 60.0, 160.0)
BRAIN = ("Brain", 40.0, 80.0)
SUBDURAL = ("Subdural", 75.0, 215.0)
HEAD_BONE = ("Bone", 600.0, 2800.0)

# Body regions, first match wins (so a chest-abdomen-pelvis is not taken for a chest alone).
_REGIONS: tuple[tuple[str, tuple[tuple[str, float, float], ...]], ...] = (
    (r"HEAD|BRAIN|SKULL|IAC|ORBIT|SINUS|FACE|TEMPORAL", (BRAIN, SUBDURAL, HEAD_BONE)),
    (r"(CHEST|THORAX|LUNG).*(ABD|PELV)|TORSO|BODY|TRUNK|TAP",
     (SOFT_TISSUE, LUNG, LIVER, BONE)),
    (r"CHEST|THORAX|LUNG|HEART|MEDIASTIN|RIB|STERN", (SOFT_TISSUE, LUNG, BONE)),
    (r"ABD|PELV|LIVER|KIDNEY|PANCREA|BOWEL|COLON", (SOFT_TISSUE, LIVER, BONE)),
    (r"SPINE|NECK|ARM|LEG|KNEE|HIP|SHOULDER|ELBOW|WRIST|HAND|FOOT|ANKLE|EXTREMIT|JOINT",
     (SOFT_TISSUE, BONE)),
)
_ANYWHERE = (SOFT_TISSUE, LUNG, BONE)  # a CT that does not say what it shows
# Names modalities give windows that say nothing to a reader.
_GENERIC = re.compile(r"^(FILE|WINDOW|WL|W/L|VOI|DEFAULT|USER|PRESET)?[\s_#-]*\d*$", re.I)
MAX_PRESETS = 8


def ct_presets(body_part: str) -> tuple[tuple[str, float, float], ...]:
    """The usual CT windows for a Body Part Examined value."""
    part = re.sub(r"[^A-Z]", "", (body_part or "").upper())
    for pattern, presets in _REGIONS:
        if part and re.search(pattern, part):
            return presets
    return _ANYWHERE


def same_window(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Two windows a reader cannot tell apart: centres and widths within 5 % of the width."""
    tolerance = max(1.0, 0.05 * max(a[1], b[1]))
    return abs(a[0] - b[0]) <= tolerance and abs(a[1] - b[1]) <= tolerance


def plain_name(name: str) -> str:
    """"SOFT TISSUE" or "soft_tissue" as "Soft tissue"."""
    words = re.sub(r"[_\s]+", " ", name).strip()
    return words[:1].upper() + words[1:].lower() if words.isupper() or words.islower() \
        else words


def presets_for(modality: str, body_part: str,
                file_windows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The presets to offer, file windows first: ``{"name", "center", "width"}`` each.

    A window whose value is already offered (within ``same_window``) is left out, and so is a
    second one of the same name (the file's Bone, not also the portal's). A file window with
    a name that says nothing takes the name of the usual window of that value, if any.
    """
    usual = ct_presets(body_part) if modality == "CT" else ()
    known = (*usual, *(p for p in (SOFT_TISSUE, LUNG, BONE, LIVER, BRAIN, SUBDURAL)
                       if modality == "CT"))
    offered: list[dict[str, Any]] = []

    def offer(name: str, center: float, width: float) -> None:
        if width <= 0 or len(offered) >= MAX_PRESETS:
            return
        for kept in offered:
            if same_window((kept["center"], kept["width"]), (center, width)) or \
                    kept["name"].lower() == name.lower():
                return
        offered.append({"name": name, "center": center, "width": width})

    for number, window in enumerate(file_windows, start=1):
        center, width = float(window["center"]), float(window["width"])
        name = str(window.get("name") or "")
        if not name or _GENERIC.match(name):
            name = next((n for n, c, w in known if same_window((c, w), (center, width))),
                        "Scanner's window" + (f" {number}" if number > 1 else ""))
        offer(plain_name(name)[:32], center, width)
    for name, center, width in usual:
        offer(name, center, width)
    return offered
