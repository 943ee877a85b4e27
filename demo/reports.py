"""Demo reports: ORU^R01 messages for some demo studies, through the same HL7 code path as
the MLLP listener (so the demo shows final, preliminary and amended reports)."""

from __future__ import annotations

from sqlalchemy import select

from portal.db import Database
from portal.index.models import Patient, Study
from portal.reports import inbound

# The demo's own RIS: seed_reports sends as it, and `flask --app app demo` lists it in
# HL7_ALLOWED_SENDERS (instance/config.toml) so the listener `make demo` starts accepts it.
DEMO_SENDER = "DEMO-RIS@127.0.0.1"

# accession -> result status and lines (IMP: marks the impression).
DEMO_REPORTS: dict[str, list[tuple[str, list[str]]]] = {
    "DEMO24CT0117": [("F", [
        "Lungs: no consolidation, no pleural effusion. A 4 mm nodule in the right lower lobe.",
        "Abdomen: liver, spleen, pancreas and kidneys unremarkable. No free fluid.",
        "IMP:No acute abnormality. 4 mm right lower lobe nodule; no follow-up needed in a "
        "low-risk patient (Fleischner 2017)."])],
    "DEMO25DX0042": [("P", ["Heart size normal. Lungs clear.", "IMP:No acute disease."])],
    "DEMO23MR0388": [
        ("F", ["No restricted diffusion. Ventricles normal in size.",
               "IMP:Normal MRI of the brain."]),
        ("C", ["No restricted diffusion. Ventricles normal in size. Small developmental "
               "venous anomaly in the left frontal lobe.",
               "IMP:No acute finding. Incidental developmental venous anomaly."])],
}


def oru(accession: str, patient_id: str, status: str, lines: list[str], number: int) -> bytes:
    """One ORU^R01 message for a demo report."""
    segments = [
        f"MSH|^~\\&|DEMO-RIS|DEMO|PORTAL|DEMO|20250101120000||ORU^R01|DEMO{number:04d}|P|2.5.1",
        f"PID|||{patient_id}^^^DEMO",
        f"OBR|1||{accession}|RAD^Radiology report|||20250101110000|||||||||||{accession}|||"
        f"20250101120000||||{status}|||||||RAD1^Radiologist^Demo"]
    for index, line in enumerate(lines, start=1):
        kind = "&IMP" if line.startswith("IMP:") else "&GDT"
        segments.append(f"OBX|{index}|TX|{kind}||{line.removeprefix('IMP:')}||||||{status}")
    return ("\r".join(segments) + "\r").encode("utf-8")


def seed_reports(database: Database) -> int:
    """Send the demo reports (sending them again changes nothing); returns how many."""
    number = 0
    for accession, versions in DEMO_REPORTS.items():
        with database.new_session() as session:
            patient_id = session.scalars(
                select(Patient.patient_id).join(Study, Study.patient_fk == Patient.id)
                .where(Study.accession_number == accession)).first()
        if patient_id is None:
            continue  # that demo study was not imported
        for status, lines in versions:
            number += 1
            inbound.handle(oru(accession, patient_id, status, lines, number), database,
                           peer_address="127.0.0.1", allowed=inbound.parse_senders([DEMO_SENDER]),
                           max_bytes=1 << 20)
    return number
