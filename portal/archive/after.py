"""After ingest: the one list of steps that runs once new instances are committed, whichever
way they came in (STOW-RS, C-STORE, ``archive import``, the external archive's index sync).

The archive owns the list and its own steps (the audit record, the header warm-up); packages
above it add theirs at start-up (``create_app``: pre-rendering, reports from SR and PDF
objects with their notices), so the archive imports nothing above it. A step sees the
instances that are new (never the already stored ones) and runs in an application context,
also in a C-STORE handler thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from flask import Flask, current_app, has_app_context
from sqlalchemy import select

from portal import audit
from portal.index.models import Series
from portal.index.service import middle_image
from portal.log import carry

if TYPE_CHECKING:
    from portal.db import Database

log = logging.getLogger(__name__)

# How the instances came: "stow" (a web worker, which also serves the images), "dimse" (the
# C-STORE SCP), "import" (the CLI, from files), "sync" (index rows from the external archive,
# whose bytes stay there until first viewed).
Via = Literal["stow", "dimse", "import", "sync"]


@dataclass(frozen=True)
class Arrival:
    """New instances one way in has just committed, and who sent them."""

    instances: tuple[Stored, ...]
    via: Via
    who: str
    source_address: str
    # The caller ends soon after (the CLI): a step that queues work waits for it.
    wait: bool = False

    @property
    def series(self) -> list[str]:
        """The Series Instance UIDs that received instances, sorted."""
        return sorted({s.series_instance_uid for s in self.instances})

    def per_study(self) -> dict[str, int]:
        """How many instances each study received."""
        return dict(Counter(s.study_instance_uid for s in self.instances))


Step = Callable[[Arrival], None]


class AfterIngest:
    """The ordered list of after-ingest steps of one app's archive."""

    def __init__(self, app: Flask) -> None:
        """An empty list; ``add`` fills it at start-up."""
        self._app = app
        self._steps: list[tuple[str, Step, bool]] = []
        self._finishers: list[tuple[str, Callable[[], None]]] = []

    def add(self, name: str, step: Step, *, required: bool = False,
            finish: Callable[[], None] | None = None) -> None:
        """Append a step. A ``required`` step's failure reaches the caller (after every other
        step has run); any other step's failure is logged and disturbs nothing. ``finish``
        does at once what the step left for later (``finish``)."""
        if name in self.names:
            raise ValueError(f"after-ingest step {name!r} is already registered")
        self._steps.append((name, step, required))
        if finish is not None:
            self._finishers.append((name, finish))

    def finish(self) -> None:
        """Do now, and return when done, what the steps left for later: a command that
        stores and then exits (``flask dimse pull --with-scp``) calls this before it ends,
        else what waits to run later is lost with the process."""
        with self._app.app_context():
            for name, finish in self._finishers:
                try:
                    finish()
                except Exception:
                    log.exception("after-ingest step %r could not finish", name)

    @property
    def names(self) -> list[str]:
        """The steps in the order they run."""
        return [name for name, _step, _required in self._steps]

    def run(self, stored: Iterable[Stored], *, via: Via, who: str, source_address: str,
            wait: bool = False) -> Arrival | None:
        """Run every step for the newly stored ones among ``stored`` (None when none is new).

        Called after the instances' commit, once per request, association, import or synced
        study.
        """
        new = tuple(s for s in stored if s.outcome == "stored")
        if not new:
            return None
        arrival = Arrival(new, via, who, source_address, wait)
        if has_app_context() and current_app._get_current_object() is self._app:  # type: ignore[attr-defined]
            self._run(arrival)
        else:  # a C-STORE handler thread, or a caller holding only the archive
            with self._app.app_context():
                self._run(arrival)
        return arrival

    def _run(self, arrival: Arrival) -> None:
        failure: Exception | None = None
        for name, step, required in self._steps:
            try:
                step(arrival)
            except Exception as exc:
                if required:
                    failure = failure or exc
                log.exception("after-ingest step %r failed (%d new instances, via %s)",
                              name, len(arrival.instances), arrival.via)
        if failure is not None:
            raise failure


@dataclass(frozen=True)
class Stored:
    """The answer for one accepted instance (made by ``ingest.Archive``; defined here, below
    it, so the steps that receive it import nothing of the archive that runs them)."""

    outcome: Literal["stored", "already_stored"]
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str


def audit_step(database: Database) -> Step:
    """One 110104 DICOM Instances Transferred record per study a sync run added. Not for
    STOW-RS, C-STORE and the CLI import: their records (110104, 110104 and 110107 Import)
    are committed with their index rows (``Archive._record_arrival``), so a process killed
    before these steps, or an index insert that fails, leaves no kept instance unrecorded
    and no record of an instance that was not kept."""

    def record(arrival: Arrival) -> None:
        if arrival.via != "sync":
            return
        for study, count in arrival.per_study().items():
            audit.record(database, audit.INSTANCES_TRANSFERRED, action="C",
                         outcome=audit.OUTCOME_SUCCESS,
                         who=arrival.who, source_address=arrival.source_address,
                         study_instance_uid=study, details={"instances": count})

    return record


def header_step(database: Database, headers: Callable[[list[str]], object]) -> Step:
    """Make and keep the header of each new series' middle image, which the viewer reads
    first (the others are made on first use, as before): ``headers`` is the archive's.

    In the background, a second after the first arrival (one thread; the series arriving
    meanwhile join that run), so no sender waits for it: making a header costs a file read,
    a parse and a write, and a series arriving one instance a request (STOW-RS) moves its
    middle image with nearly every request. A caller that ``wait``s (the CLI) has it made
    before it returns."""

    def warm(series: list[str]) -> None:
        with database.new_session() as session:
            ids = session.scalars(select(Series.id).where(
                Series.series_instance_uid.in_(series))).all()
            middles = [uid for uid in (middle_image(session, i) for i in ids) if uid]
        if middles:
            headers(middles)

    later = _Coalescing(warm, delay=1.0)

    def step(arrival: Arrival) -> None:
        if arrival.wait:
            warm(arrival.series)
        else:
            later.submit(arrival.series)

    return step


class _Coalescing:
    """Runs ``work`` on one background thread, ``delay`` seconds after a submission, for the
    series submitted since its last run."""

    def __init__(self, work: Callable[[list[str]], None], *, delay: float) -> None:
        self._work = work
        self._delay = delay
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="header-warm")

    def submit(self, series: list[str]) -> None:
        with self._lock:
            new = set(series) - self._pending
            if not new:
                return
            self._pending |= new
        self._thread.submit(carry(self._run))

    def _run(self) -> None:
        time.sleep(self._delay)  # what arrives meanwhile joins this run
        with self._lock:
            series = sorted(self._pending)
            self._pending.clear()
        if not series:
            return
        try:
            self._work(series)
        except Exception:  # made on first use instead; nobody waits for this one
            log.exception("could not keep the header of %d series' middle image", len(series))
