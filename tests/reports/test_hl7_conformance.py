"""docs/conformance/hl7.md against the code: its message table is the handler's table
(``inbound.SUPPORTED``), and each listed message, sent with python-hl7's MLLP client, is
acknowledged AA, while one not listed is AR with code 200 and an unusable one AE."""

from __future__ import annotations

import re
from pathlib import Path

from pydicom.uid import generate_uid

from portal.reports import inbound
from tests.reports.test_hl7 import Ris, msa, orm, oru, ris, send, siu, store_study

__all__ = ["ris"]  # the MLLP listener fixture of test_hl7, used here too

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance" / "hl7.md"


def _table(heading: str) -> list[list[str]]:
    """The rows (cells) of the first table after a ``## heading``."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_the_documented_messages_are_the_handlers_table() -> None:
    documented = {tuple(row[0].split("^")): row[1] for row in _table("Messages accepted")}
    assert documented == inbound.SUPPORTED
    codes = [row[0] for row in _table("Acknowledgements")]
    assert codes == ["AA", "AE", "AR"]


def test_every_documented_message_is_accepted_and_others_refused(ris: Ris) -> None:
    accession = "C" + generate_uid()[-8:]
    store_study(ris.app, accession)
    provider = "1999999999^Foreman^Eric^^^^^^NPI^^^^NPI"
    examples = {
        ("ORM", "O01"): orm(accession, "NW", "", provider),
        ("OMI", "O23"): orm(accession, "XO", "SC", provider, "202603051030")
        .replace("ORM^O01", "OMI^O23"),
        ("SIU", "S12"): siu(accession, "S12", "202603051030"),
        ("SIU", "S13"): siu(accession, "S13", "202603061030"),
        ("SIU", "S14"): siu(accession, "S14", "202603061100"),
        ("SIU", "S15"): siu(accession, "S15", "202603061100"),
        ("ORU", "R01"): oru(accession, "F", "IMP:Normal."),
    }
    assert set(examples) == set(inbound.SUPPORTED)
    acks = send(ris.port, *examples.values())
    for kind, ack in zip(examples, acks, strict=True):
        assert msa(ack)[0] == "AA", (kind, ack)
        assert f"ACK^{kind[1]}^ACK" in ack
    other = oru(accession, "F", "IMP:x").replace("ORU^R01", "ADT^A01")
    no_patient = re.sub(r"PID\|\|\|[^|]*", "PID|||", oru("N" + accession, "F", "IMP:x"))
    refused, unusable = send(ris.port, other, no_patient)
    assert msa(refused)[0] == "AR" and "|200^" in refused
    assert msa(unusable)[0] == "AE" and "PID-3" in msa(unusable)[1]
