"""Names in other scripts wherever a person or a FHIR client reads them (issue 21): pydicom's
character-set samples chrH31 (Japanese, ISO 2022 IR 87), chrX2 (Chinese, GB18030) and chrI2
(Korean, ISO 2022 IR 149) stored in the archive, then the console's and the share form's pages
mark each name with its language, the report PDF shows the name's glyphs (text extracted with
pypdf), and FHIR Patient.name holds one HumanName per PN component group, each marked with its
representation (iso21090-EN-representation), valid R4 for fhir.resources (docs/i18n.md,
"Person names").
"""

from __future__ import annotations

import base64
import ctypes
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.patient import Patient as FhirPatient
from flask import Flask
from pypdf import PdfReader
from sqlalchemy import select

from portal.access.grants import create_grant
from portal.archive import current_archive
from portal.fhir.resources import REPRESENTATION
from portal.index.models import Patient, Study
from portal.reports.models import Report
from portal.reports.pdf import report_pdf
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    add_person,
    close_app,
    make_app,
    make_client,
    signed_in,
)
from tests.i18n.test_charsets import ADMIN, WRITTEN, _granted, decoded, sent_bytes

SAMPLES = {"chrH31.dcm": "ja", "chrX2.dcm": "zh", "chrI2.dcm": "ko"}


@pytest.fixture
def app(tmp_path: Path, idp: IdentityProvider) -> Iterator[Flask]:
    application = make_app(tmp_path / "instance", OIDC_ISSUER=idp.issuer, **OIDC_SETTINGS)
    yield application
    close_app(application)


def _patient(app: Flask, sample: str) -> Patient:
    patient_id = decoded(sent_bytes(sample)).PatientID
    with app.extensions["db"].new_session() as session:
        return session.scalars(select(Patient).where(Patient.patient_id == patient_id)).one()


def _granted_in_practice(app: Flask, idp: IdentityProvider, sub: str) -> dict[str, str]:
    """The samples stored and granted to a physician of the practice "Clinic" (whose office
    manager then sees them); sample -> Study Instance UID."""
    out = {}
    with app.app_context():
        for sample in SAMPLES:
            data = sent_bytes(sample)
            current_archive().ingest(data, who="test")
            out[sample] = decoded(data).StudyInstanceUID
    doctor = add_person(app, idp, sub, ["physician"], "Clinic")
    with app.extensions["db"].write_transaction() as session:
        for study in out.values():
            create_grant(session, ADMIN, user_id=doctor, study_uid=study)
    return out


def test_console_and_share_pages_mark_each_name_with_its_language(app: Flask,
                                                                 idp: IdentityProvider) -> None:
    studies = _granted_in_practice(app, idp, "names-doc")
    doctor = signed_in(app, idp, "names-doc")
    add_person(app, idp, "names-manager", ["office_manager"], "Clinic")
    manager = signed_in(app, idp, "names-manager")
    grants = manager.get("/admin/grants").get_data(as_text=True)
    for sample, lang in SAMPLES.items():
        written = WRITTEN[sample]
        study = studies[sample]
        page = doctor.get(f"/studies/{study}/share")
        assert page.status_code == 200
        assert f'<strong lang="{lang}">{written}</strong>' in page.get_data(as_text=True)
        record = _patient(app, sample)
        page = manager.get(f"/admin/patients/{record.id}")
        assert f'<h1 lang="{lang}">{written}</h1>' in page.get_data(as_text=True), sample
        # The grants list: the name inside the line, its own element marked.
        assert f'<span lang="{lang}">{written}</span>' in grants, sample
    found = manager.get("/admin/?q=山田").get_data(as_text=True)
    assert f'class="who" lang="ja">{WRITTEN["chrH31.dcm"]}<' in found
    # Who saw the patient's studies: the doctor opened the share forms above.
    audit = manager.get(f"/admin/audit?patient={_patient(app, 'chrX2.dcm').id}")
    assert audit.status_code == 200
    assert f'<span lang="zh">{WRITTEN["chrX2.dcm"]}</span>' in audit.get_data(as_text=True)


@pytest.mark.parametrize("sample", list(SAMPLES))
def test_the_report_pdf_shows_the_names_glyphs(app: Flask, idp: IdentityProvider,
                                               sample: str) -> None:
    """The generated PDF embeds fonts with the name's letters: the text pypdf extracts is the
    name as written, not '?' (the PDF core fonts' Latin-1 before)."""
    studies = _granted(app, idp, f"pdf-{sample}", [sample])
    study_uid, _series = studies[sample]
    with app.test_request_context(), app.extensions["db"].new_session() as session:
        study = session.scalars(select(Study).where(
            Study.study_instance_uid == study_uid)).one()
        body = report_pdf(Report(title="胸部 CT", status="final", version=1,
                                 findings="異常なし。", author="Sato^Hanako=佐藤^花子"), study)
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(body)).pages)
    assert f"{WRITTEN[sample]} ({study.patient.patient_id})" in text
    assert "佐藤花子 (Sato Hanako)" in text and "異常なし。" in text and "胸部 CT" in text
    assert "?" not in text


def _seen_lines(body: bytes) -> list[list[tuple[float, str]]]:
    """The first page's lines as a reader sees them (PDFium): each letter's origin and the
    letter, from left to right, lines from the top. Spaces are left out: with shaping, most
    are a gap between glyphs, not a character."""
    import pypdfium2
    import pypdfium2.raw as pdfium

    document = pypdfium2.PdfDocument(body)
    page = document[0].get_textpage()
    lines: dict[float, list[tuple[float, str]]] = {}
    x, y = ctypes.c_double(), ctypes.c_double()
    for index in range(page.count_chars()):
        if pdfium.FPDFText_IsGenerated(page.raw, index):  # line breaks PDFium adds
            continue
        letter = page.get_text_range(index, 1)
        if letter.isspace():
            continue
        pdfium.FPDFText_GetCharOrigin(page.raw, index, x, y)
        lines.setdefault(round(y.value, 1), []).append((x.value, letter))
    page.close()
    document.close()
    return [sorted(letters) for _, letters in sorted(lines.items(), reverse=True)]


def test_the_report_pdf_writes_hebrew_and_arabic_right_to_left_and_joined(
        app: Flask, idp: IdentityProvider) -> None:
    """Hebrew and Arabic in the report PDF run right to left (the Unicode bidirectional
    algorithm, through fpdf2's HarfBuzz shaping): read from the left, a line shows their
    words backwards; a name keeps its own direction inside a line (an isolate, as <bdi>
    does), so the patient ID after it stays where the line's direction puts it; Arabic
    letters join, lam and alef in their one obligatory ligature; a paragraph that starts in
    those letters is set against the right margin. Before, every such word stood left to
    right in logical order: it read backwards."""
    studies = _granted(app, idp, "pdf-rtl", ["chrHbrw.dcm"])
    with app.test_request_context(), app.extensions["db"].new_session() as session:
        study = session.scalars(select(Study).where(
            Study.study_instance_uid == studies["chrHbrw.dcm"][0])).one()
        body = report_pdf(Report(title="CT", status="final", version=1,
                                 findings="لا توجد كسور.\nNo fracture.",
                                 author="Cohen^Dvora"), study)
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(body)).pages)
    assert "Reported by: Dvora Cohen" in text  # a left-to-right name needs no isolate
    lines = _seen_lines(body)
    seen = ["".join(letter for _, letter in line) for line in lines]
    name = WRITTEN["chrHbrw.dcm"].replace(" ", "")  # "דבורה שרון": given name, on the right
    assert f"Patient:{name[::-1]}({study.patient.patient_id})" in seen, seen
    [arabic] = [line for line in lines if "ت" in "".join(letter for _, letter in line)]
    assert "".join(letter for _, letter in arabic) == ".روسكدجوتال"  # "لا توجد كسور."
    lam, alef = [x for x, letter in arabic if letter in "لا"]
    assert lam == alef  # one glyph for both (U+FEFB), not two letters side by side
    [english] = [line for line in lines
                 if "".join(letter for _, letter in line) == "Nofracture."]
    assert arabic[0][0] > 300 > english[0][0]  # the right margin, and the left


def test_a_report_in_latin_letters_embeds_the_base_font_only(app: Flask) -> None:
    """The fallback fonts (Japanese, Chinese, Korean: megabytes to read and subset) are
    embedded only when the text has letters the base font lacks."""
    from types import SimpleNamespace

    def fonts(name: str) -> set[str]:
        study = SimpleNamespace(study_description="CT", study_date="20240102",
                                accession_number="A1",
                                patient=SimpleNamespace(patient_name=name, patient_id="7"))
        with app.test_request_context():
            body = report_pdf(Report(title="CT", status="final", version=1,
                                     findings="No fracture.", author="House^Gregory"),
                              study)  # type: ignore[arg-type]
        resources = PdfReader(io.BytesIO(body)).pages[0]["/Resources"]["/Font"]
        return {str(font.get_object()["/BaseFont"]).split("+")[-1]
                for font in resources.values()}

    assert fonts("Doe^Jane") == {"DejaVuSansBook", "DejaVuSansBold"}
    assert len(fonts("Yamada^Tarou=山田^太郎")) > 2


def _fhir_get(app: Flask, auth: tuple[str, str], url: str) -> dict[str, object]:
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    answer = app.test_client().get(url, headers={"Authorization": f"Basic {token}"})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    body: dict[str, object] = answer.get_json()
    return body


def test_fhir_patient_name_has_one_human_name_per_group(app: Flask,
                                                        idp: IdentityProvider) -> None:
    studies = _granted(app, idp, "fhir-names", list(SAMPLES))
    auth = make_client(app, "fhir-names-reader", can_read=True)
    record = _patient(app, "chrH31.dcm")
    patient = FhirPatient.model_validate(_fhir_get(app, auth, f"/fhir/Patient/{record.id}"))
    names = patient.name or []
    assert [(n.extension[0].url, n.extension[0].valueCode) for n in names if n.extension] == [
        (REPRESENTATION, "ABC"), (REPRESENTATION, "IDE"), (REPRESENTATION, "SYL")]
    assert [(n.use, n.family, n.given, n.text) for n in names] == [
        ("official", "Yamada", ["Tarou"], "Yamada Tarou"),
        ("official", "山田", ["太郎"], "山田 太郎"),
        ("official", "やまだ", ["たろう"], "やまだ たろう")]

    # Chinese (GB18030): no space between family and given name; Korean: Hanja and Hangul.
    bundle = Bundle.model_validate(_fhir_get(
        app, auth, f"/fhir/Patient?identifier={_patient(app, 'chrX2.dcm').patient_id}"))
    [entry] = bundle.entry or []
    chinese = FhirPatient.model_validate(entry.resource.model_dump())
    assert [(n.extension[0].valueCode, n.text) for n in chinese.name or [] if n.extension] == [
        ("ABC", "Wang XiaoDong"), ("IDE", "王小东")]
    korean = FhirPatient.model_validate(
        _fhir_get(app, auth, f"/fhir/Patient/{_patient(app, 'chrI2.dcm').id}"))
    assert [(n.extension[0].valueCode, n.text) for n in korean.name or [] if n.extension] == [
        ("ABC", "Hong Gildong"), ("IDE", "洪吉洞"), ("SYL", "홍길동")]

    # A reference's display is the name as people write it, every script in it.
    study_uid, _series = studies["chrH31.dcm"]
    imaging = ImagingStudy.model_validate(_fhir_get(app, auth, f"/fhir/ImagingStudy/{study_uid}"))
    assert imaging.subject.display == WRITTEN["chrH31.dcm"]
