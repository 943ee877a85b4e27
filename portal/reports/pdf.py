"""A plain PDF of a report's text, for reports that arrived without one (fpdf2)."""

from __future__ import annotations

from flask_babel import format_datetime
from flask_babel import gettext as _
from fpdf import FPDF

from portal.index.models import Study
from portal.index.names import person_name
from portal.reports.models import Report


def _latin(text: str) -> str:
    # The core PDF fonts cover Latin-1; anything else is shown as '?' rather than failing.
    return text.encode("latin-1", errors="replace").decode("latin-1")


def report_pdf(report: Report, study: Study) -> bytes:
    """An A4 page (or more) with the study, the status and the report text."""
    pdf = FPDF(format="A4")
    # Words in the reader's language; the signing time in the practice's zone
    # (PORTAL_TIMEZONE, docs/i18n.md).
    pdf.set_title(_latin(report.title or _("Radiology report")))
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 15)
    pdf.multi_cell(0, 8, _latin(report.title or study.study_description
                                or _("Radiology report")), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 10)
    status = _(report.status.capitalize())
    facts = [(_("Patient"), f"{person_name(study.patient.patient_name)} "
                            f"({study.patient.patient_id})"),
             (_("Study date"), study.study_date), (_("Accession"), study.accession_number),
             (_("Status"), status if report.version <= 1 else
              _("%(status)s, version %(num)d", status=status, num=report.version)),
             (_("Reported by"), person_name(report.author)),
             (_("Signed"), format_datetime(report.signed_at, "medium", rebase=True)
              if report.signed_at else "")]
    for label, value in facts:
        if value:
            pdf.multi_cell(0, 6, _latin(f"{label}: {value}"), new_x="LMARGIN", new_y="NEXT")
    for heading, text in ((_("Findings"), report.findings), (_("Impression"), report.impression)):
        if text:
            pdf.ln(3)
            pdf.set_font("Helvetica", "B", 12)
            pdf.cell(0, 7, heading, new_x="LMARGIN", new_y="NEXT")
            pdf.set_font("Helvetica", "", 11)
            pdf.multi_cell(0, 6, _latin(text), new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())
