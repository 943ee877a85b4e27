"""Normalised keys naming a referring physician, shared by the index and the access policy.

A study names its referrer by Referring Physician's Name (PS3.5 6.2 PN) and, where present,
by codes in Referring Physician Identification Sequence (PS3.3 C.7.2.1, 10.1: Person
Identification Code Sequence). Keys: ``npi:1234567893``, ``id:SCHEME:VALUE``,
``name:FAMILY^GIVEN``. Names are compared without case, titles, middle names or spaces.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

from portal.index.names import person_name

_SPACES = re.compile(r"\s+")


def name_key(person_name: str) -> str | None:
    """``name:FAMILY^GIVEN`` from a DICOM PN (alphabetic group), or None when empty."""
    alphabetic = person_name.split("=")[0]
    parts = [_SPACES.sub(" ", p).strip().upper() for p in alphabetic.split("^")]
    family = parts[0] if parts else ""
    given = parts[1] if len(parts) > 1 else ""
    if not family:
        return None
    given = given.split(" ")[0] if given else ""
    return f"name:{family}^{given}" if given else f"name:{family}"


def key_label(key: str) -> str:
    """A key as an office manager reads it: a name key as the name is written
    ("name:HOUSE^GREGORY" -> "GREGORY HOUSE"), other keys unchanged."""
    kind, sep, rest = key.partition(":")
    if sep and kind == "name":
        return person_name(rest) or key
    return key


def identifier_key(scheme: str, value: str) -> str | None:
    """``npi:...`` for NPI codes, ``id:SCHEME:VALUE`` for the others."""
    value = value.strip().upper()
    scheme = scheme.strip().upper()
    if not value:
        return None
    if scheme in ("NPI", "US-NPI", "2.16.840.1.113883.4.6"):
        return f"npi:{value}"
    return f"id:{scheme}:{value}" if scheme else f"id:{value}"


def parse_key(text: str) -> str:
    """A key typed by an office manager (``npi:123``, ``id:SCHEME:V``, ``name:Family^Given``
    or a bare name), normalised; ValueError when it names nothing."""
    kind, sep, rest = text.strip().partition(":")
    kind = kind.lower()
    key: str | None
    if sep and kind == "npi":
        key = identifier_key("NPI", rest)
    elif sep and kind == "id":
        scheme, sep2, value = rest.partition(":")
        key = identifier_key(scheme, value) if sep2 else identifier_key("", rest)
    elif sep and kind == "name":
        key = name_key(rest)
    else:
        key = name_key(text)
    if key is None:
        raise ValueError("an identifier needs a value")
    return key[:400]


def referrer_keys(ds: Dataset) -> list[str]:
    """Every key under which this data set names its referring physician."""
    keys: list[str] = []
    name = ds.get("ReferringPhysicianName")
    if name:
        key = name_key(str(name))
        if key:
            keys.append(key)
    for person in ds.get("ReferringPhysicianIdentificationSequence") or []:
        for code in person.get("PersonIdentificationCodeSequence") or []:
            key = identifier_key(str(code.get("CodingSchemeDesignator", "")),
                                 str(code.get("CodeValue", "")))
            if key:
                keys.append(key)
        person_name = person.get("PersonName")
        if person_name:
            key = name_key(str(person_name))
            if key:
                keys.append(key)
    return list(dict.fromkeys(k[:400] for k in keys))[:16]
