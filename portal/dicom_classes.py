"""SOP classes the portal treats specially, as plain constants every room may import.

Report objects (Structured Reports, PS3.3 A.35, and Encapsulated PDF, PS3.3 A.45.1) become
reports (``portal.reports.dicom``) and reach patients and share-link visitors only as reports,
under the release rules (``portal.access.policy.instance_filter``, docs/architecture.md
"What may import what").
"""

from __future__ import annotations

SR_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.35",  # Extensible SR
})
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
REPORT_CLASSES = SR_CLASSES | {ENCAPSULATED_PDF}
