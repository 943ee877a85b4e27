"""How fast the importer reads a ZIP of many small instances (issue 19: it used to reopen
the archive for every entry, so a CD's worth of files took quadratic time).

Builds a ZIP of N small CT instances (16 x 16 pixels, about 1 KiB each, deflated) in a
temporary folder, then times ``portal.archive.importer.zip_sources`` (the whole-ZIP checks)
plus reading every entry, and the same with ``validate_part10`` on each entry (what the
upload inbox and the CLI import do before anything is kept). Prints seconds and entries per
second per size; nothing listens, nothing is stored.

    .venv/bin/python benchmarks/zip_import.py [--sizes 200,2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere: import tests.*, portal.*
    sys.path.insert(0, str(REPO_ROOT))

from pydicom.uid import generate_uid  # noqa: E402

from portal.archive.importer import zip_sources  # noqa: E402
from portal.archive.validate import Limits, validate_part10  # noqa: E402
from tests.factories import make_instance  # noqa: E402


def build_zip(path: Path, entries: int) -> None:
    """A ZIP like a CD's: one study, entries under DICOM/, in the order they are read."""
    study, series = generate_uid(), generate_uid()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for number in range(1, entries + 1):
            zf.writestr(f"DICOM/IM{number:05d}",
                        make_instance(study=study, series=series, InstanceNumber=number,
                                      value=number))


def read_all(path: Path, limits: Limits, validate: bool) -> int:
    """Check the ZIP as the inbox does, then read (and validate) every entry in order."""
    sources = zip_sources(path, max_entries=20_000, max_ratio=100,
                          max_entry_bytes=limits.max_instance_bytes)
    total = 0
    for source in sources:
        data = source.read()
        if validate:
            validate_part10(data, limits)
        total += 1
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200,2000",
                        help="entry counts, comma-separated (default 200,2000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (median shown)")
    args = parser.parse_args()
    limits = Limits()
    print(f"{'entries':>8} {'step':<16} {'seconds':>9} {'entries/s':>10}")
    with tempfile.TemporaryDirectory(prefix="zip-import-") as folder:
        for size in (int(s) for s in args.sizes.split(",")):
            path = Path(folder) / f"cd-{size}.zip"
            build_zip(path, size)
            for step, validate in (("read", False), ("read+validate", True)):
                times = []
                for _ in range(args.repeat):
                    started = time.perf_counter()
                    count = read_all(path, limits, validate)
                    times.append(time.perf_counter() - started)
                    assert count == size, (count, size)
                seconds = statistics.median(times)
                print(f"{size:>8} {step:<16} {seconds:>9.3f} {size / seconds:>10.0f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
