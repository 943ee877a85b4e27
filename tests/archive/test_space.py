"""space.Budget: a batch's view of the free space (one look per 32 MiB or 0.25 s, not one per
file), in whole blocks, seeing other writers at its next look and never counting its own files
as free again."""

from __future__ import annotations

import pytest

from portal.archive.space import Budget, DiskSpace

MB = 1 << 20


@pytest.fixture(autouse=True)
def _no_timed_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Looks by bytes only here: a stalled machine must not add one."""
    monkeypatch.setattr(Budget, "REFRESH_SECONDS", 3600.0)


def _looks(*free: int) -> tuple[list[int], Budget]:
    """A Budget over a file system whose successive looks say ``free``; the count of looks."""
    asked = [0]
    frees = iter(free)

    def look() -> DiskSpace:
        asked[0] += 1
        return DiskSpace(next(frees), 100 * MB, 10 * MB, 20 * MB, 4096)

    return asked, Budget(look)


def test_files_take_whole_blocks_from_one_look_until_the_minimum() -> None:
    asked, budget = _looks(15 * MB)
    taken = 0
    while budget.take(MB + 1) is None:  # one byte over a MiB: one more block each
        taken += 1
    assert taken == (5 * MB) // (MB + 4096)
    assert asked == [1]
    assert budget.take(4096) is None  # what is left above the minimum still fits
    refused = budget.take(MB)
    assert refused is not None and refused.free == 15 * MB - taken * (MB + 4096) - 4096
    assert "uploads are refused below 10.0 MB" in refused.describe()


def test_the_next_look_sees_other_writers_but_not_its_own_files_as_free() -> None:
    # Looks: 100 MB free; 100 MB again (the batch's files are still being written, so the
    # disk does not show them yet); 30 MB (another upload wrote meanwhile).
    asked, budget = _looks(100 * MB, 100 * MB, 30 * MB)
    assert budget.take(Budget.REFRESH_BYTES) is None  # 32 MiB in flight
    assert budget.take(MB) is None  # a second look: 100 MB, but the batch keeps its 67
    assert asked == [2]
    refused = budget.take(58 * MB)
    assert refused is not None and refused.free == 67 * MB
    assert budget.take(Budget.REFRESH_BYTES - MB) is None  # 36 MB left in the view
    assert budget.take(MB) is None  # a third look: 30 MB, less than the view: it counts
    assert asked == [3]
    refused = budget.take(20 * MB)
    assert refused is not None and refused.free == 29 * MB
