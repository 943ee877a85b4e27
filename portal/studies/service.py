"""Study list, study page and viewer queries for people (access is decided by ``access``)."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    exists,
    false,
    or_,
    select,
    tuple_,
    union_all,
)
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql import Subquery

from portal.access.policy import (
    instance_filter,
    keyed_access,
    series_filter,
    study_filter,
    visible_studies,
)
from portal.access.principal import Principal
from portal.index.models import KEEPS_STUDY_DATE, Instance, Patient, Series, Study
from portal.index.names import search_words
from portal.reports.service import unread_report_condition

PAGE_SIZE = 25
HISTORY_LIMIT = 50
# Modalities offered in the search form; any other code still works when typed in a URL.
MODALITIES = ("CT", "MR", "CR", "DX", "US", "MG", "PT", "NM", "XA", "RF", "OT")


# A study's place in the list: (study date, study time, id), the list's order.
SortKey = tuple[str, str, int]


def list_place(session: Session, principal: Principal, study_id: int) -> SortKey | None:
    """The place in the list of a study this principal may see (a pager link names the
    study by its row id only: its date is PHI and stays out of the URL, docs/security.md
    28); None when there is no such study or he may not see it (its date must not steer
    his list either)."""
    found = session.execute(select(Study.study_date, Study.study_time).where(
        Study.id == study_id, study_filter(principal))).one_or_none()
    return (found[0], found[1], study_id) if found else None


@dataclass(frozen=True)
class StudySearch:
    """What a person typed into the study search (``new_report``: only studies with a
    report this person has not read)."""

    text: str = ""
    date_from: str = ""
    date_to: str = ""
    modality: str = ""
    new_report: bool = False
    page: int = 1
    oldest_first: bool = False
    # Keyset paging (the study list's links): the sort key (date, time, id) of the last row
    # of the page before ("after") or the first row of the page after ("before"); ``page``
    # is then only the number shown. Without either, ``page`` is an offset (old links, the
    # console).
    after: SortKey | None = None
    before: SortKey | None = None

    @property
    def narrowed(self) -> bool:
        """True when anything beyond paging was asked."""
        return bool(self.text or self.date_from or self.date_to or self.modality
                    or self.new_report)


MAX_WORDS = 8


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _like(text: str) -> str:
    return f"%{_escape(text.lower())}%"


# A text search that matches at most this many studies (before access) looks them up by id;
# one that matches more finds its page sooner by walking the studies newest first.
FEW_MATCHES = 1000
# A person who may see at most this many studies has a text search that matches many
# tested on those studies only, by id (see list_page).
FEW_VISIBLE = 10_000
# The text match's own FROMs, never correlated with the outer query's study and patient.
_MATCH_PATIENT = aliased(Patient, name="match_patient")
_MATCH_STUDY = aliased(Study, name="match_study")


def _patient_matches(patient: Any, text: str, pattern: str) -> ColumnElement[bool]:
    """The patient's ID contains the text or his name's words begin with its words."""
    matches: list[ColumnElement[bool]] = [
        patient.patient_id.ilike(pattern, escape="\\")]
    words = search_words(text)[:MAX_WORDS]
    if words:
        matches.append(and_(*(patient.name_search.like(f"% {_escape(w)}%", escape="\\")
                              for w in words)))
    return or_(*matches)


def _matching_patients(text: str, pattern: str) -> Select[int]:
    """Patients whose ID contains the text or whose name's words begin with its words."""
    patient = _MATCH_PATIENT
    return select(patient.id).where(_patient_matches(patient, text, pattern))


def _few_visible(session: Session, principal: Principal) -> list[int] | None:
    """The ids of the studies a person may see, when they are at most FEW_VISIBLE (the
    access rules' index-only scans); None for a machine or more."""
    if principal.kind == "machine":
        return None
    visible = list(session.scalars(select(Study.id).where(study_filter(principal))
                                   .limit(FEW_VISIBLE + 1)))
    return visible if len(visible) <= FEW_VISIBLE else None


def _visible_text_matches(session: Session, visible: list[int], text: str) -> list[int]:
    """Which of these studies match the text (the same match as ``_text_condition``), each
    tested on its own row and its patient's, by id: no index scan of every matching
    patient ("smith jo": 9,375 of 300,000 at 1,000,000 studies) and no probe first."""
    if not visible:
        return []
    pattern = _like(text)
    # The patient's test as a correlated EXISTS beside the accession number's: one probe of
    # the patient's key per study. (A join let PostgreSQL read every patient and hash them.)
    patient = _MATCH_PATIENT
    own_patient = exists().where(patient.id == Study.patient_fk,
                                 _patient_matches(patient, text, pattern))
    return sorted(session.scalars(select(Study.id).where(
        Study.id.in_(visible),
        or_(Study.accession_number.ilike(pattern, escape="\\"), own_patient))))


def _text_condition(session: Session, text: str) -> tuple[ColumnElement[bool], bool]:
    """A name whose words each begin with one of the query's words, in any order, ignoring
    case and accents ("john doe", "Doe John", "muller" for "Doe^John", "Müller^Hans"); or a
    patient ID or accession number containing the text. Also: whether it matches many.
    """
    pattern = _like(text)
    patients = _matching_patients(text, pattern)
    # Which plan is fast depends on how many studies match, so ask first (through the
    # trigram indexes on PostgreSQL, a few milliseconds): a few are fetched by id and then
    # checked for access and sorted; many are tested on a person's visible studies, or
    # row by row while walking the date order for a machine (PostgreSQL tests the cheap
    # text match before the access rules). Both conditions select exactly the same studies.
    # The matching patients first, at most FEW_MATCHES + 1 of them: more patients than
    # that have more studies than that ("smith jo": 9,375 patients at 1,000,000 studies,
    # whose studies the probe used to look up one by one).
    found_patients = list(session.scalars(patients.limit(FEW_MATCHES + 1)))
    if len(found_patients) <= FEW_MATCHES:
        study = _MATCH_STUDY
        # Accession numbers first: when they match by the thousand ("1") the probe stops.
        probe = union_all(
            select(study.id).where(study.accession_number.ilike(pattern, escape="\\")),
            select(study.id).where(study.patient_fk.in_(found_patients)))
        found = set(session.scalars(select(probe.subquery().c.id).limit(FEW_MATCHES + 1)))
        if len(found) <= FEW_MATCHES:
            return (Study.id.in_(sorted(found)) if found else false()), False
    return or_(Study.patient_fk.in_(patients),
               Study.accession_number.ilike(pattern, escape="\\")), True


def search_studies(session: Session, principal: Principal,
                   search: StudySearch) -> tuple[list[Any], bool]:
    """One page of visible studies, newest first, and whether there is another page (an
    older one; after a ``before`` link, always)."""
    rows, older, _newer = list_page(session, principal, search)
    return rows, older


def list_page(session: Session, principal: Principal,
              search: StudySearch) -> tuple[list[Any], bool, bool]:
    """One page of visible studies, newest first (oldest first if asked), and whether there
    are pages after it and before it (``newer``: known only for a keyset page).

    The page's study ids are found first, from the study table alone (its (date, time, id)
    index), and only those rows are read with their patients (a "deferred join"). A page
    after or before a sort key starts right there (keyset paging): page 39 costs what page
    1 costs instead of sorting and skipping the 950 studies before it."""
    offset = (max(search.page, 1) - 1) * PAGE_SIZE
    # Walking back from a "before" key reads the list the other way round, then turns it.
    ascending = search.oldest_first != (search.before is not None)
    edge = search.before or search.after
    if edge is not None:
        offset = 0
    order = (Study.study_date.asc(), Study.study_time.asc(), Study.id.asc()) \
        if ascending else (Study.study_date.desc(), Study.study_time.desc(), Study.id.desc())
    text = search.text.strip()[:64]
    matches, many = _text_condition(session, text) if text else (None, False)
    page = None
    if not search.new_report and (many or not text):
        # A text that matches many is tested row by row while each key is walked.
        page = _keyed_page(session, principal, search, ascending=ascending, edge=edge,
                           offset=offset, text=text)
    if page is None:
        page = _filtered_page(session, principal, search, ascending=ascending, edge=edge,
                              offset=offset, text_match=(matches, many))
    rows = list(session.execute(
        select(Study, Patient).join(Patient, Study.patient_fk == Patient.id)
        .join(page, page.c.id == Study.id).order_by(*order)))
    further = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    if search.before is not None:
        return rows[::-1], True, further
    return rows, further, search.after is not None or search.page > 1


def _keyed_page(session: Session, principal: Principal, search: StudySearch, *,
                ascending: bool, edge: SortKey | None, offset: int,
                text: str = "") -> Subquery | None:
    """The page's study ids for a person's list (without an unread-report search; ``text``:
    one that matches many studies, tested on each row walked), straight off ordered
    indexes: each of his referrer keys keeps its studies' (date, time)
    in (key, date, time, study_fk) indexes (``StudyReferrer``, ``OrderStudy``), so each
    key gives its first rows of the page in order (after the keyset edge, in the date
    range, with a series of the modality), the other studies he may see (grants, patient
    records: few) are sorted from the study index, and the page is the first of these
    merged. At 1,000,000 studies a physician's first page read his 4,000 visible studies
    to sort them (benchmarks/README.md, "The index at 1,000,000 studies"). The same rows as
    ``_filtered_page``: every key part is taken to the page's end, and within one key a
    study comes once, so no row of the page can be missing from the merge. None when the
    search or the reader does not allow it."""
    if search.new_report:
        return None
    access = keyed_access(session, principal)
    if access is None:
        return None
    keys, others = access
    wanted = offset + PAGE_SIZE + 1
    modality = search.modality.upper()[:16]

    def part(study_fk: Any, date: Any, time: Any, *where: ColumnElement[bool]) -> Select[Any]:
        conditions = list(where)
        if search.date_from:
            conditions.append(date >= search.date_from.replace("-", ""))
        if search.date_to:
            conditions += [date <= search.date_to.replace("-", ""), date != ""]
        if modality:
            conditions.append(exists().where(Series.study_fk == study_fk,
                                             Series.modality == modality))
        if text:
            conditions.append(_study_matches(study_fk, text))
        if edge is not None:
            place = tuple_(date, time, study_fk)
            conditions.append(place > tuple_(*edge) if ascending else place < tuple_(*edge))
        order = (date.asc(), time.asc(), study_fk.asc()) if ascending \
            else (date.desc(), time.desc(), study_fk.desc())
        found = (select(study_fk.label("id"), date.label("study_date"),
                        time.label("study_time"))
                 .where(*conditions).distinct().order_by(*order).limit(wanted).subquery())
        return select(found.c.id, found.c.study_date, found.c.study_time)

    parts = [part(Study.id, Study.study_date, Study.study_time, Study.id.in_(others))]
    for key in keys:
        for table in KEEPS_STUDY_DATE:
            parts.append(part(table.study_fk, table.study_date, table.study_time,
                              table.key == key))
    merged = union_all(*parts).subquery("visible")
    order = (merged.c.study_date.asc(), merged.c.study_time.asc(), merged.c.id.asc()) \
        if ascending else (merged.c.study_date.desc(), merged.c.study_time.desc(),
                           merged.c.id.desc())
    return (select(merged.c.id, merged.c.study_date, merged.c.study_time).distinct()
            .order_by(*order).limit(PAGE_SIZE + 1).offset(offset).subquery("page"))


def _study_matches(study_fk: Any, text: str) -> ColumnElement[bool]:
    """The study of this id matches the text (as ``_text_condition``), tested on its row
    and its patient's, each by its key."""
    pattern = _like(text)
    study, patient = _MATCH_STUDY, _MATCH_PATIENT
    return exists().where(study.id == study_fk, or_(
        study.accession_number.ilike(pattern, escape="\\"),
        exists().where(patient.id == study.patient_fk,
                       _patient_matches(patient, text, pattern))))


def _filtered_page(session: Session, principal: Principal, search: StudySearch, *,
                   ascending: bool, edge: SortKey | None, offset: int,
                   text_match: tuple[ColumnElement[bool] | None, bool]) -> Subquery:
    """The page's study ids through the access rules as a filter of the study index
    (``text_match``: the text's condition and whether it matches many)."""
    stmt = select(Study.id).where(study_filter(principal))
    text = search.text.strip()[:64]
    matches, many = text_match
    visible = _few_visible(session, principal) if many else None
    if visible is not None:
        # A person's few thousand studies are found first, then a text that matches many
        # is tested on them alone; the page is taken from the ids that matched (all
        # visible), without the access rules again. Left to
        # itself, PostgreSQL cannot estimate how many studies a text keeps (an OR of a
        # hashed subquery and an ILIKE gets a default selectivity, far above the 3 % of
        # "smith jo"), so it walked the studies by date or scanned them all to find a page
        # of a person's matches: 1.0-1.5 s at 1,000,000 studies, or 0.1-0.2 s, depending
        # on the fill's statistics (benchmarks/README.md, the index at 1,000,000 studies).
        stmt = select(Study.id).where(Study.id.in_(
            _visible_text_matches(session, visible, text)))
    elif matches is not None:
        stmt = stmt.where(matches)
    if search.date_from:
        stmt = stmt.where(Study.study_date >= search.date_from.replace("-", ""))
    if search.date_to:
        stmt = stmt.where(Study.study_date <= search.date_to.replace("-", ""),
                          Study.study_date != "")
    if search.modality:
        stmt = stmt.where(Study.id.in_(select(Series.study_fk).where(
            Series.modality == search.modality.upper()[:16])))
    if search.new_report:
        stmt = stmt.where(unread_report_condition(principal))
    key = tuple_(Study.study_date, Study.study_time, Study.id)
    if edge is not None:
        stmt = stmt.where(key > tuple_(*edge) if ascending else key < tuple_(*edge))
    order = (Study.study_date.asc(), Study.study_time.asc(), Study.id.asc()) \
        if ascending else (Study.study_date.desc(), Study.study_time.desc(), Study.id.desc())
    return stmt.order_by(*order).limit(PAGE_SIZE + 1).offset(offset).subquery("page")


def study_series(session: Session, principal: Principal, study: Study) -> list[Series]:
    """The series of a study this principal may see, in series-number order."""
    return list(session.scalars(select(Series).where(Series.study_fk == study.id,
                                                     series_filter(principal))
                                .order_by(Series.series_number, Series.id)))


def patient_history(session: Session, principal: Principal, study: Study) -> list[Study]:
    """The patient's other studies that this principal may see, newest first."""
    return list(session.scalars(
        visible_studies(principal)
        .where(Study.patient_fk == study.patient_fk, Study.id != study.id)
        .order_by(Study.study_date.desc(), Study.study_time.desc(), Study.id.desc())
        .limit(HISTORY_LIMIT)))


def series_images(session: Session, series: Series) -> list[Instance]:
    """The image instances of a series in instance-number order (non-images left out)."""
    return list(session.scalars(
        select(Instance).where(Instance.series_fk == series.id, Instance.rows.is_not(None))
        .order_by(Instance.instance_number, Instance.id)))


def study_instances(session: Session, principal: Principal, study: Study) -> list[Instance]:
    """Every instance of a study this principal may have, series by series, in
    instance-number order (report objects only for those who read reports unreleased)."""
    return list(session.scalars(
        select(Instance).join(Series, Instance.series_fk == Series.id)
        .where(Series.study_fk == study.id, instance_filter(principal))
        .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)))


KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"  # PS3.3 A.35.4
MAX_KEY_IMAGES = 24


def _referenced_uids(ds: Dataset) -> list[str]:
    """SOP Instance UIDs a Key Object Selection document names (its evidence, PS3.3
    C.17.2.2, then any IMAGE content items), in document order."""
    found: list[str] = []
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
        for series in study.get("ReferencedSeriesSequence") or []:
            for item in series.get("ReferencedSOPSequence") or []:
                found.append(str(item.get("ReferencedSOPInstanceUID", "")))
    for item in ds.get("ContentSequence") or []:
        for ref in item.get("ReferencedSOPSequence") or []:
            found.append(str(ref.get("ReferencedSOPInstanceUID", "")))
    return list(dict.fromkeys(uid for uid in found if uid))


def key_images(session: Session, principal: Principal, study: Study,
               read: Callable[[str], bytes]) -> list[tuple[Instance, Series]]:
    """The images the study's Key Object Selection documents flag, as (instance, series),
    limited to images of this study the principal may see."""
    documents = list(session.scalars(
        select(Instance.sop_instance_uid).join(Series, Instance.series_fk == Series.id)
        .where(Series.study_fk == study.id,
               Instance.sop_class_uid == KEY_OBJECT_SELECTION)
        # Newest first: a document marked in the portal names the earlier flags too.
        .order_by(Instance.id.desc()).limit(5)))
    wanted: list[str] = []
    for uid in documents:
        try:
            wanted += _referenced_uids(dcmread(io.BytesIO(read(uid)), stop_before_pixels=True))
        except (OSError, KeyError, ValueError, AttributeError):
            continue  # an unreadable document hides its flags, never the study
    if not wanted:
        return []
    rows = session.execute(
        select(Instance, Series).join(Series, Instance.series_fk == Series.id)
        .where(Series.study_fk == study.id, Instance.sop_instance_uid.in_(wanted[:500]),
               Instance.rows.is_not(None), instance_filter(principal))).all()
    by_uid = {instance.sop_instance_uid: (instance, series) for instance, series in rows}
    return [by_uid[uid] for uid in dict.fromkeys(wanted) if uid in by_uid][:MAX_KEY_IMAGES]
