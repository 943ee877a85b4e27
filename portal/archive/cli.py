"""``flask --app app archive ...`` and ``flask --app app dimse serve``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click
from flask import current_app
from flask.cli import with_appcontext

from portal.archive import current_archive
from portal.archive.copies import RemoteCopies
from portal.archive.importer import ImportSummary, expand, import_sources
from portal.archive.validate import Rejected
from portal.migrate import upgrade_database


def import_paths(paths: list[Path], *, who: str) -> ImportSummary:
    """Import files, folders and zips with a progress bar; used by the CLI and the demo."""
    archive = current_archive()
    settings = current_app.config["PORTAL"]
    sources, problems = expand(paths, max_entries=settings["MAX_ZIP_ENTRIES"],
                               max_ratio=settings["MAX_ZIP_RATIO"],
                               max_entry_bytes=settings["MAX_INSTANCE_BYTES"])
    summary = ImportSummary()
    try:
        with click.progressbar(length=len(sources), label="Importing", show_pos=True,
                               show_percent=True, file=sys.stderr) as bar:
            import_sources(archive, sources, who, progress=bar.update, summary=summary)
    finally:  # also for what was stored before the archive became unavailable
        if summary.new_series and settings["REDIS_URL"]:  # rendered images shared: warm them
            click.echo(f"pre-rendering {len(summary.new_series)} new series", err=True)
        # Reports from SR and PDF files, pre-rendering: as for STOW-RS (each file's 110107
        # record was committed with its index row).
        archive.after_ingest(summary.stored, via="import", who=who, source_address="cli",
                             wait=True)
    # Zips refused whole are audited too; entry names (which may name a patient) are not.
    archive.record_rejections([(Rejected(re.sub(r"'[^']*'|\"[^\"]*\"", "(an entry)", reason)),
                                None) for _label, reason in problems
                               if not reason.startswith(("no such file", "cannot read"))],
                              who=who, source_address="cli")
    summary.rejected[:0] = problems
    return summary


@click.group("archive", help="The embedded archive.")
def archive_cli() -> None:
    """Archive commands."""


@archive_cli.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@with_appcontext
def import_command(paths: tuple[Path, ...]) -> None:
    """Import DICOM files, folders (recursively) and zip files; exit 1 if any was rejected."""
    upgrade_database(current_app)
    summary = import_paths(list(paths), who="cli:import")
    click.echo(summary.describe())
    if summary.rejected:
        sys.exit(1)


@archive_cli.command("reap")
@click.option("--older-than", default=300.0, show_default=True,
              help="Only remove leftovers older than this many seconds.")
@with_appcontext
def reap_command(older_than: float) -> None:
    """Remove temp files and unreferenced files left by a crash."""
    temps, orphans = current_archive().reap(older_than)
    click.echo(f"removed {temps} temp file(s) and {orphans} unreferenced file(s)")


@archive_cli.command("verify")
@with_appcontext
def verify_command() -> None:
    """Check every stored file against its SHA-256; exit 1 if any differs or is missing."""
    bad: list[tuple[str, str]] = []
    with click.progressbar(current_archive().verify(), label="Verifying",
                           file=sys.stderr) as results:
        for uid, problem in results:
            if problem is not None:
                bad.append((uid, problem))
    for uid, problem in bad:
        click.echo(f"{problem}: instance {uid}")
    click.echo(f"{len(bad)} problem(s) found")
    if bad:
        sys.exit(1)


def _remote() -> RemoteCopies:
    remote = current_archive().remote
    if remote is None:
        raise click.ClickException("PORTAL_ARCHIVE_URL is not set: there is no external archive")
    return remote


@archive_cli.command("sync")
@click.option("--full", is_flag=True, help="Walk every study, not only recent study dates.")
@click.option("--watch", is_flag=True,
              help="Keep running: sync every ARCHIVE_SYNC_INTERVAL_SECONDS until interrupted.")
@with_appcontext
def sync_command(full: bool, watch: bool) -> None:
    """Bring the index in step with the external archive (QIDO-RS, WADO-RS metadata)."""
    from portal.archive.external import ExternalUnavailable
    from portal.archive.sync import sync_index
    from portal.jobs import once_per_cluster
    from portal.repeat import run_repeatedly

    upgrade_database(current_app)
    remote = _remote()
    settings = current_app.config["PORTAL"]
    runs = 0

    def step() -> None:
        nonlocal runs
        # Study dates only catch new studies; a full walk (cheap: QIDO pages and instance
        # counts) now and then catches new images in old studies.
        full_walk = full or (watch and runs % settings["ARCHIVE_SYNC_FULL_EVERY"] == 0)
        # One sync per cluster at a time (the job archive-sync takes the same lock).
        with once_per_cluster("archive-sync") as mine:
            if not mine:
                click.echo("another sync is running (another node or a job); this run is "
                           "skipped", err=True)
                return
            runs += 1
            report = sync_index(
                current_archive(), remote.client, full=full_walk,
                page_size=settings["ARCHIVE_SYNC_PAGE_SIZE"],
                lookback_days=settings["ARCHIVE_SYNC_LOOKBACK_DAYS"],
                progress=lambda r: click.echo(f"  {r.describe()}", err=True))
        click.echo(report.describe())

    run_repeatedly(step, ExternalUnavailable, watch=watch,
                   every_seconds=settings["ARCHIVE_SYNC_INTERVAL_SECONDS"],
                   failure="sync interrupted: {}; the next run resumes")


@archive_cli.command("cache")
@click.option("--evict", is_flag=True, help="Evict least recently used copies down to the "
              "configured size now.")
@with_appcontext
def cache_command(evict: bool) -> None:
    """Show (and trim) the local copies of external instances."""
    remote = _remote()
    if evict:
        click.echo(f"evicted {remote.evict()} cached copies")
    count, size = remote.usage()
    click.echo(f"{count} cached copies, {size / 1048576:.1f} MiB of "
               f"{remote.cache_bytes / 1048576:.0f} MiB")


@archive_cli.command("compress")
@click.option("--older-than-days", type=click.IntRange(min=0), default=None,
              help="Re-encode images stored more than this many days ago (default: "
                   "ARCHIVE_COMPRESS_AFTER_DAYS).")
@click.option("--syntax", type=click.Choice(["jpeg-ls", "jpeg2000"]), default=None,
              help="Lossless encoding (default: ARCHIVE_COMPRESS_SYNTAX).")
@click.option("--limit", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="At most this many instances in this run.")
@with_appcontext
def compress_command(older_than_days: int | None, syntax: str | None, limit: int) -> None:
    """Re-encode older embedded images losslessly (pixels checked bit for bit first)."""
    from portal.archive.compress import compress_stored

    settings = current_app.config["PORTAL"]
    days = settings["ARCHIVE_COMPRESS_AFTER_DAYS"] if older_than_days is None \
        else older_than_days
    if older_than_days is None and not days:
        raise click.ClickException("ARCHIVE_COMPRESS_AFTER_DAYS is 0 (off): give "
                                   "--older-than-days to compress anyway")
    archive = current_archive()
    result = compress_stored(archive.store, archive.database, older_than_days=days,
                             syntax=syntax or settings["ARCHIVE_COMPRESS_SYNTAX"], limit=limit)
    reasons: dict[str, int] = {}
    for reason in result.skipped.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    share = f" ({100 * result.saved / result.before:.1f}%)" if result.before else ""
    click.echo(f"{result.done} instances re-encoded: {result.before / 1048576:.1f} MiB -> "
               f"{result.after / 1048576:.1f} MiB, {result.saved / 1048576:.1f} MiB saved"
               f"{share}")
    for reason, count in sorted(reasons.items()):
        click.echo(f"{count} kept as they are: {reason}")


@click.group("dimse", help="DICOM network services.")
def dimse_cli() -> None:
    """DIMSE commands."""


@dimse_cli.command("serve")
@with_appcontext
def serve_command() -> None:
    """Run the DIMSE SCP (C-STORE, C-ECHO and the services create_app registered: C-FIND,
    C-MOVE, C-GET, Storage Commitment) on the configured address until interrupted."""
    from portal.archive.dimse import serve

    upgrade_database(current_app)
    settings = current_app.config["PORTAL"]
    if not settings["DIMSE_ALLOWED_PEERS"]:
        click.echo("warning: DIMSE_ALLOWED_PEERS is empty; every association will be "
                   "rejected", err=True)
    secure = " (TLS 1.2+)" if settings["DIMSE_TLS_CERT"] else ""
    click.echo(f"C-STORE SCP {settings['DIMSE_AE_TITLE']} listening on "
               f"{settings['DIMSE_HOST']}:{settings['DIMSE_PORT']}{secure}", err=True)
    serve(current_archive(), settings, services=current_app.extensions["dimse_services"])


@dimse_cli.command("find")
@click.option("--level", type=click.Choice(["STUDY", "SERIES", "IMAGE"]), default="STUDY",
              show_default=True)
@click.argument("keys", nargs=-1)
@with_appcontext
def find_command(level: str, keys: tuple[str, ...]) -> None:
    """C-FIND at the DIMSE archive (ARCHIVE_DIMSE_PEER), e.g. ``PatientID=123``."""
    from portal.archive.dimse_pull import RETURN_KEYS, find

    query = dict(key.split("=", 1) for key in keys if "=" in key)
    for match in find(current_app.config["PORTAL"], level, query):  # type: ignore[arg-type]
        click.echo("\t".join(str(match.get(k, "")) for k in RETURN_KEYS[level]))


@dimse_cli.command("pull")
@click.argument("study_uids", nargs=-1, required=True)
@click.option("--with-scp", is_flag=True,
              help="Run our C-STORE SCP in this process while pulling (else `dimse serve` "
              "must be running).")
@with_appcontext
def pull_command(study_uids: tuple[str, ...], with_scp: bool) -> None:
    """C-MOVE studies from the DIMSE archive to our SCP; exit 1 if any sub-operation failed."""
    from portal.archive.dimse import serve
    from portal.archive.dimse_pull import move

    upgrade_database(current_app)
    settings = current_app.config["PORTAL"]
    server = serve(current_archive(), settings, block=False) if with_scp else None
    failed = 0
    try:
        for uid in study_uids:
            result = move(settings, uid)
            failed += result.failed + (0 if result.ok else 1)
            click.echo(f"{uid}: {result.completed} received, {result.failed} failed")
    finally:
        if server is not None:
            server.shutdown()
            after = current_archive().after
            if after is not None:  # what the received series wait for, before this exits
                after.finish()
    if failed:
        sys.exit(1)
