"""DICOM names in other character sets (issue 21 items 4 and 5), end to end with pydicom's
character-set sample files: STOW-RS (the files' own bytes, through requests) and C-STORE (DCMTK
storescu) store them; the index keeps the decoded names (every component group); WADO-RS gives
the same bytes back; QIDO-RS answers PN as {"Alphabetic", "Ideographic", "Phonetic"} and finds
them by any group, ignoring case, accents, width and kana; the study list search finds them in
any word order; the pages write them as people do (docs/i18n.md, "Person names" and
"Character sets"). On SQLite and PostgreSQL.
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from flask import Flask
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from portal.access.grants import create_grant
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.index.models import Instance, Patient, Series, Study
from portal.index.names import person_name
from portal.studies.service import StudySearch, search_studies
from tests.archive.test_dimse import CALLED, PEERS, output, storescu
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    LiveServer,
    PostgresCluster,
    add_person,
    close_app,
    free_port,
    make_app,
    make_client,
    signed_in,
)
from tests.dicomweb.test_conformance_clients import parts_of
from tests.factories import make_instance

NAMELESS = generate_uid()
READER = Principal("machine", 1, "reader", can_read_all=True)
ADMIN = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t", subject="t")

# Every sample with a patient, and how people write its name. chrSQEncoding*.dcm are not
# images (no SOP Class, only a sequence's encoding) and stay out.
WRITTEN = {
    "chrArab.dcm": "لنزار قباني",  # ISO_IR 127; right to left, given name first
    "chrFren.dcm": "Jérôme Buc",  # ISO_IR 100
    "chrFrenMulti.dcm": "Jérôme Buc",
    "chrGerm.dcm": "Rüdiger Äneas",
    "chrGreek.dcm": "Διονυσιος",  # ISO_IR 126
    "chrH31.dcm": "山田 太郎 (Yamada Tarou)",  # ISO 2022 IR 87
    "chrH32.dcm": "山田 太郎",  # ISO 2022 IR 13 (half-width katakana) and IR 87
    "chrHbrw.dcm": "דבורה שרון",  # ISO_IR 138
    "chrI2.dcm": "홍길동 (Hong Gildong)",  # ISO 2022 IR 149: Hangul, not the Hanja group
    "chrJapMulti.dcm": "やまだ たろう",
    "chrJapMultiExplicitIR6.dcm": "やまだ たろう",
    "chrKoreanMulti.dcm": "김희중",
    # ISO_IR 144; the sample itself mixes Latin c, e, y, p into the Cyrillic.
    "chrRuss.dcm": "Люкceмбypг",  # noqa: RUF001 (the sample's own letters)
    "chrX1.dcm": "王小東 (Wang XiaoDong)",  # ISO_IR 192 (UTF-8)
    "chrX2.dcm": "王小东 (Wang XiaoDong)",  # GB18030
}
SAMPLES = tuple(WRITTEN)
LANGUAGE = {"chrH31.dcm": "ja", "chrH32.dcm": "ja", "chrJapMulti.dcm": "ja",
            "chrI2.dcm": "ko", "chrKoreanMulti.dcm": "ko", "chrX1.dcm": "zh", "chrX2.dcm": "zh"}
# Samples that repeat another's UIDs and Patient ID: stored beside it under new ones.
_AGAIN = {"chrFrenMulti.dcm", "chrJapMultiExplicitIR6.dcm"}

JAPANESE = {"chrH31.dcm", "chrH32.dcm", "chrJapMulti.dcm", "chrJapMultiExplicitIR6.dcm"}
# QIDO-RS PatientName values and exactly the samples each finds.
QIDO = [
    ("Yamada*", {"chrH31.dcm"}),  # alphabetic
    ("山田*", {"chrH31.dcm", "chrH32.dcm"}),  # ideographic
    ("やまだ*", JAPANESE),  # phonetic, and kana written in the first group
    ("ヤマダ^タロウ", JAPANESE),  # katakana finds hiragana
    ("ﾔﾏﾀﾞ*", JAPANESE),  # half width too
    ("やまた*", set()),  # the voicing mark counts: た is not だ
    ("YAMADA^TAROU", {"chrH31.dcm"}),
    ("=山田^太郎", {"chrH31.dcm", "chrH32.dcm"}),  # groups named in order
    # The first group, the others empty or missing: any.
    ("やまだ^たろう==", {"chrH32.dcm", "chrJapMulti.dcm", "chrJapMultiExplicitIR6.dcm"}),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", {"chrH31.dcm"}),
    ("Yamada*山田", set()),  # a wildcard never crosses into the next group
    ("buc^jerome", {"chrFren.dcm", "chrFrenMulti.dcm"}),  # accents do not count
    ("BUC^JÉRÔME", {"chrFren.dcm", "chrFrenMulti.dcm"}),
    ("äneas^rüdiger", {"chrGerm.dcm"}),
    ("ΔΙΟΝΥΣΙΟΣ", {"chrGreek.dcm"}),  # Greek capitals, final sigma
    ("διον*", {"chrGreek.dcm"}),
    ("ЛЮК*", {"chrRuss.dcm"}),  # Cyrillic capitals
    ("قباني*", {"chrArab.dcm"}),
    ("שרון^דבורה", {"chrHbrw.dcm"}),
    ("hong*", {"chrI2.dcm"}), ("洪^吉洞", {"chrI2.dcm"}), ("홍*", {"chrI2.dcm"}),
    ("김희중", {"chrKoreanMulti.dcm"}),
    ("wang^xiaodong", {"chrX1.dcm", "chrX2.dcm"}),
    ("王^小東", {"chrX1.dcm"}), ("王^小东", {"chrX2.dcm"}), ("王*", {"chrX1.dcm", "chrX2.dcm"}),
]
# The study list's search (words in any order, each the start of a word) and what it finds.
LIST = [
    ("山田", {"chrH31.dcm", "chrH32.dcm"}),
    ("山田太郎", {"chrH31.dcm", "chrH32.dcm"}),  # typed without a space
    ("太郎 山田", {"chrH31.dcm", "chrH32.dcm"}),
    ("やまだ", JAPANESE),
    ("ヤマダ", JAPANESE),
    ("tarou yamada", {"chrH31.dcm"}),
    ("buc jerome", {"chrFren.dcm", "chrFrenMulti.dcm"}),
    ("Jérôme BUC", {"chrFren.dcm", "chrFrenMulti.dcm"}),
    ("ruediger aneas", {"chrGerm.dcm"}),
    ("ΔΙΟΝ", {"chrGreek.dcm"}),
    ("люк", {"chrRuss.dcm"}),
    ("홍길동", {"chrI2.dcm"}), ("gildong hong", {"chrI2.dcm"}),
    ("王小东", {"chrX2.dcm"}), ("xiaodong", {"chrX1.dcm", "chrX2.dcm"}),
    ("דבורה", {"chrHbrw.dcm"}),
]


def _path(name: str) -> Path:
    [path] = get_charset_files(name)
    return Path(path)


def sent_bytes(name: str) -> bytes:
    """What the test sends for a sample: its own bytes, unless the archive must refuse them
    (the File Meta naming another SOP Instance UID) or another sample has its UIDs."""
    raw = _path(name).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(raw))
    changed = False
    if ds.file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        changed = True
    if name in _AGAIN:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientID = f"{ds.PatientID}-2"
        changed = True
    if not changed:
        return raw
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def decoded(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def data_set_bytes(part10: bytes) -> bytes:
    """The encoded data set after the preamble, "DICM" and the File Meta group."""
    assert part10[128:132] == b"DICM"
    group_length = int(decoded(part10).file_meta.FileMetaInformationGroupLength)
    return part10[132 + 12 + group_length:]


@dataclass
class Site:
    """A portal on one database with every sample stored through STOW-RS."""

    app: Flask
    server: LiveServer
    web: DICOMwebClient
    auth: tuple[str, str]
    sent: dict[str, bytes]  # sample -> the bytes stored
    study_of: dict[str, str]  # sample -> Study Instance UID


@pytest.fixture(scope="module",
                params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def site(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp(f"charsets-{request.param}")
    url = None
    if request.param == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("postgres")
        url = cluster.new_database()
    app = make_app(folder / "instance", url)
    auth = make_client(app, "charsets")
    sent = {name: sent_bytes(name) for name in SAMPLES}
    try:
        with LiveServer(app) as server:
            session = requests.Session()
            session.auth = auth
            for name, data in sent.items():
                boundary = "charset-sample-boundary"
                body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                        + data + f"\r\n--{boundary}--\r\n".encode())
                answer = session.post(
                    f"{server.url}/dicomweb/studies", data=body, timeout=60,
                    headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                             f"boundary={boundary}",
                             "Accept": "application/dicom+json"})
                assert answer.status_code == 200, (name, answer.text)
            with app.app_context():  # a patient without a name, for "*"
                current_archive().ingest(make_instance(study=NAMELESS, patient_id="NO-NAME",
                                                       patient_name=""), who="test")
            web = DICOMwebClient(url=f"{server.url}/dicomweb", session=session)
            yield Site(app, server, web, auth, sent,
                       {name: decoded(data).StudyInstanceUID for name, data in sent.items()})
    finally:
        close_app(app)


def _index_row(app: Flask, sop: str) -> tuple[Patient, Study, Series]:
    with app.extensions["db"].new_session() as session:
        row = session.execute(
            select(Patient, Study, Series).join(Study, Study.patient_fk == Patient.id)
            .join(Series, Series.study_fk == Study.id)
            .join(Instance, Instance.series_fk == Series.id)
            .where(Instance.sop_instance_uid == sop)).one()
        return row[0], row[1], row[2]


@pytest.mark.parametrize("name", SAMPLES)
def test_stored_decoded_and_returned_as_sent(site: Site, name: str) -> None:
    sent = site.sent[name]
    original = decoded(sent)
    patient, study, series = _index_row(site.app, original.SOPInstanceUID)
    # The index holds the name decoded from its Specific Character Set, every group.
    assert patient.patient_name == str(original.PatientName)
    assert "\ufffd" not in patient.patient_name
    assert person_name(patient.patient_name) == WRITTEN[name]

    # WADO-RS gives back the very bytes stored, in their own character set.
    answer = requests.get(
        f"{site.server.url}/dicomweb/studies/{study.study_instance_uid}/series/"
        f"{series.series_instance_uid}/instances/{original.SOPInstanceUID}",
        auth=site.auth, timeout=60,
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert answer.status_code == 200, answer.text
    [(_kind, payload)] = parts_of(answer)
    assert payload == sent

    # QIDO-RS and the metadata: PN as its groups (PS3.18 F.2.2), the Unicode of the file.
    wanted = original.to_json_dict()["00100010"]["Value"]
    [found] = site.web.search_for_studies(
        search_filters={"StudyInstanceUID": study.study_instance_uid})
    assert found["00100010"]["Value"] == wanted
    [metadata] = site.web.retrieve_series_metadata(study.study_instance_uid,
                                                   series.series_instance_uid)
    assert metadata["00100010"]["Value"] == wanted


@pytest.mark.parametrize(("query", "expected"), QIDO, ids=[q for q, _ in QIDO])
def test_qido_finds_names_by_any_group(site: Site, query: str, expected: set[str]) -> None:
    found = site.web.search_for_studies(search_filters={"PatientName": query})
    samples = {name for name, uid in site.study_of.items()
               if uid in {s["0020000D"]["Value"][0] for s in found}}
    assert samples == expected


def test_a_lone_star_matches_every_name_and_none(site: Site) -> None:
    found = {s["0020000D"]["Value"][0]
             for s in site.web.search_for_studies(search_filters={"PatientName": "*"})}
    assert found == {*site.study_of.values(), NAMELESS}


def test_qido_fuzzy_matching_takes_words_in_any_order(site: Site) -> None:
    def found(query: str) -> set[str]:
        answer = site.web.search_for_studies(search_filters={"PatientName": query},
                                             fuzzymatching=True)
        uids = {s["0020000D"]["Value"][0] for s in answer}
        return {name for name, uid in site.study_of.items() if uid in uids}

    assert found("jerome buc") == {"chrFren.dcm", "chrFrenMulti.dcm"}
    assert found("太郎 山田") == {"chrH31.dcm", "chrH32.dcm"}
    assert found("たろう") == JAPANESE


@pytest.mark.parametrize(("query", "expected"), LIST, ids=[q for q, _ in LIST])
def test_the_study_list_search_finds_them(site: Site, query: str, expected: set[str]) -> None:
    with site.app.app_context(), site.app.extensions["db"].new_session() as session:
        rows, _more = search_studies(session, READER, StudySearch(text=query))
        uids = {study.study_instance_uid for study, _patient in rows}
    assert {name for name, uid in site.study_of.items() if uid in uids} == expected


# -- C-STORE -------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "query"), [("chrH31.dcm", "やまだ*"), ("chrX2.dcm", "王^小东"),
                                            ("chrI2.dcm", "洪*")])
def test_dcmtk_storescu_stores_and_findscu_finds_them(tmp_path: Path, name: str,
                                                      query: str) -> None:
    """C-STORE keeps the data set byte for byte; C-FIND (ISO_IR 192 query) finds the name
    by any group and answers it decoded."""
    from portal.archive.dimse import serve
    from tests.archive.test_dimse_qr import FINDSCU, TIMEOUTS

    port = free_port()
    app = make_app(tmp_path / "instance", DIMSE_HOST="127.0.0.1", DIMSE_PORT=port,
                   DIMSE_AE_TITLE=CALLED, DIMSE_ALLOWED_PEERS=[*PEERS, "FINDSCU@127.0.0.1"],
                   DIMSE_QUERY_CLIENTS=["FINDSCU=reader"])
    make_client(app, "reader", can_read=True)
    with app.app_context():
        archive = current_archive()
    server = serve(archive, app.config["PORTAL"], block=False,
                   services=app.extensions["dimse_services"])
    assert server is not None
    try:
        done = storescu(port, [_path(name)])
        assert done.returncode == 0, output(done)
        original = decoded(_path(name).read_bytes())
        # The SCP writes its own File Meta; the data set is kept byte for byte, names in
        # their own character set.
        assert data_set_bytes(archive.read(original.SOPInstanceUID)) == \
            data_set_bytes(_path(name).read_bytes())
        patient, _study, _series = _index_row(app, original.SOPInstanceUID)
        assert patient.patient_name == str(original.PatientName)
        assert person_name(patient.patient_name) == WRITTEN[name]

        out = tmp_path / "found"
        out.mkdir()
        found = subprocess.run(
            [FINDSCU, "-v", "-aet", "FINDSCU", "-aec", CALLED, *TIMEOUTS, "-S", "-X",
             "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
             "-k", "SpecificCharacterSet=ISO_IR 192", "-k", f"PatientName={query}",
             "-k", "StudyInstanceUID", "127.0.0.1", str(port)],
            capture_output=True, text=True, timeout=60, check=False)
        assert found.returncode == 0, output(found)
        answers = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
        assert [str(a.PatientName) for a in answers] == [str(original.PatientName)]
    finally:
        server.shutdown()
        close_app(app)


# -- the pages -----------------------------------------------------------------------------

def _granted(app: Flask, idp: IdentityProvider, sub: str,
             names: list[str]) -> dict[str, tuple[str, str]]:
    """Store the samples, let a physician see them; sample -> (study, series)."""
    out = {}
    with app.app_context():
        for name in names:
            data = sent_bytes(name)
            current_archive().ingest(data, who="test")
            ds = decoded(data)
            out[name] = (ds.StudyInstanceUID, ds.SeriesInstanceUID)
    doctor = add_person(app, idp, sub, ["physician"])
    with app.extensions["db"].write_transaction() as session:
        for study, _series in out.values():
            create_grant(session, ADMIN, user_id=doctor, study_uid=study)
    return out


@pytest.fixture
def page_app(tmp_path: Path, idp: IdentityProvider) -> Iterator[Flask]:
    application = make_app(tmp_path / "instance", OIDC_ISSUER=idp.issuer, **OIDC_SETTINGS)
    yield application
    close_app(application)


def test_the_list_study_page_and_viewer_write_each_name(page_app: Flask,
                                                         idp: IdentityProvider) -> None:
    names = [n for n in SAMPLES if n not in _AGAIN]
    studies = _granted(page_app, idp, "charset-doc", names)
    client = signed_in(page_app, idp, "charset-doc")
    listing = client.get("/studies").get_data(as_text=True)
    for name, (study, series) in studies.items():
        written = WRITTEN[name]
        # Japanese, Korean and Chinese names carry their language (glyphs, voice).
        lang = {"ja": ' lang="ja"', "ko": ' lang="ko"', "zh": ' lang="zh"'}.get(
            LANGUAGE.get(name, ""), "")
        assert f'class="who"{lang}>{written}' in listing, name
        page = client.get(f"/studies/{study}").get_data(as_text=True)
        assert f'<h1 id="patient-name"{lang}>{written}</h1>' in page, name
        viewer = client.get(f"/studies/{study}/view/{series}").get_data(as_text=True)
        assert f'<span class="who"{lang}>{written}</span>' in viewer, name


@pytest.mark.parametrize("scheme", ("light", "dark"))
def test_a_japanese_name_on_a_360_px_iphone(page_app: Flask, idp: IdentityProvider,
                                            scheme: str) -> None:
    """The study list with Japanese names on an iPhone 13 at 360 px: written family name
    first in Kanji, found by typing the name in Kanji or kana, nothing wider than the screen,
    axe finds nothing serious."""
    from axe_playwright_python.sync_playwright import Axe

    from tests.browser import chromium, loopback_only, phone
    from tests.studies.support import shot, sign_in_browser

    _granted(page_app, idp, "charset-phone", ["chrH31.dcm", "chrH32.dcm", "chrFren.dcm"])
    with LiveServer(page_app) as server, chromium() as (playwright, browser):
        context = browser.new_context(**{**phone(playwright, "iPhone 13"),
                                         "viewport": {"width": 360, "height": 780}},
                                      color_scheme=scheme)
        loopback_only(context)
        page = context.new_page()
        sign_in_browser(page, server.url, sub="charset-phone")
        text = page.locator("main").inner_text()
        assert "山田 太郎 (Yamada Tarou)" in text and "Jérôme Buc" in text
        for typed, shown in (("山田太郎", 2), ("やまだ", 2), ("jerome", 1)):
            page.fill("input[name=q]", typed)
            page.locator("input[name=q]").press("Enter")
            page.wait_for_function(
                "(n) => document.querySelectorAll('main .who').length === n", arg=shown)
            assert page.evaluate("document.documentElement.scrollWidth") <= 360, typed
        page.fill("input[name=q]", "山田")
        page.locator("input[name=q]").press("Enter")
        page.wait_for_function("() => document.querySelectorAll('main .who').length === 2")
        results = Axe().run(page, options={"runOnly": {"type": "tag", "values": [
            "wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}})
        assert [(v["id"], [n["target"] for n in v["nodes"]][:3])
                for v in results.response["violations"]
                if v["impact"] in ("serious", "critical")] == []
        shot(page, f"charsets-list-{scheme}")
        context.close()
