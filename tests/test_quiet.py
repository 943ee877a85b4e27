"""The DICOM readers' warnings are silenced for the whole process, never by swapping the
filter list in a request thread (``warnings.catch_warnings`` is not thread-safe)."""

from __future__ import annotations

import threading
import warnings

from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from portal.archive.validate import Limits, validate_part10
from portal.index.service import header_json
from portal.quiet import silence_readers
from tests.factories import make_dataset, to_bytes


def _odd_file() -> bytes:
    """A file pydicom reads with a warning: an Instance Number (IS) of ``1A``."""
    ds = make_dataset()
    ds[0x00200013] = RawDataElement(Tag(0x00200013), "IS", 2, b"1A", 0, False, True)
    return to_bytes(ds)


def test_the_readers_warnings_are_silenced_and_others_are_not() -> None:
    data = _odd_file()
    with warnings.catch_warnings(record=True) as seen:  # this test's thread alone
        warnings.simplefilter("always")
        header_json(validate_part10(data, Limits()).dataset)
        assert any("1A" in str(w.message) for w in seen)  # pydicom does warn of it
        seen.clear()
        silence_readers()
        silence_readers()  # twice: still one filter
        assert sum(1 for f in warnings.filters
                   if str(getattr(f[3], "pattern", f[3])).startswith("(pydicom")) == 1
        header_json(validate_part10(data, Limits()).dataset)
        warnings.warn("not a reader's", UserWarning, stacklevel=1)
        assert [str(w.message) for w in seen] == ["not a reader's"]


def test_reading_in_many_threads_leaves_the_filter_list_alone() -> None:
    """While eight threads validate and index odd files, the process's list of warning
    filters stays the one object it was: ``catch_warnings`` in those threads put a copy in
    its place for the length of each block (and two overlapping blocks can leave one)."""
    data = _odd_file()
    before = warnings.filters
    copy = list(before)
    done = threading.Event()
    swapped: list[int] = []

    def watch() -> None:
        while not done.is_set():
            if warnings.filters is not before:
                swapped.append(1)

    def work() -> None:
        for _ in range(150):
            header_json(validate_part10(data, Limits()).dataset)

    watcher = threading.Thread(target=watch)
    watcher.start()
    workers = [threading.Thread(target=work) for _ in range(8)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    done.set()
    watcher.join()
    assert not swapped and warnings.filters is before and warnings.filters == copy
