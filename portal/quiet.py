"""The warnings of the DICOM readers, silenced once for the whole process.

pydicom (and the pixel decoders behind it) warn with a ``UserWarning`` of each odd value they
read leniently: a sender's quirks. The portal judges a file itself (``archive/validate.py``)
and says why it refuses one, so these warnings are noise. ``warnings.catch_warnings`` is not
the way to silence them in a web worker: it swaps the process's one list of filters, so two
request threads inside it at once can leave each other's filters in place for good (Python's
documentation calls it not thread-safe). One filter, set at start-up, serves every thread.
What pydicom warns of also goes to its logger (``pydicom``), which logging configures.

The render processes (``portal/imaging/isolation.py``) keep ``catch_warnings`` around their
decoders, whose warnings come from many modules: each of them runs one call at a time.
With ``PORTAL_RENDER_ISOLATION=false`` those calls run in the request threads instead,
one more reason to keep isolation on.
"""

from __future__ import annotations

import warnings

# The modules whose UserWarnings are about the files they read.
READERS = r"(pydicom|pylibjpeg|openjpeg|libjpeg|rle|jpeg_ls|PIL)(\.|$)"


def silence_readers() -> None:
    """Ignore the readers' UserWarnings in every thread (idempotent: ``filterwarnings``
    replaces an equal filter instead of adding a second)."""
    warnings.filterwarnings("ignore", category=UserWarning, module=READERS)
