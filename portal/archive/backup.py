"""``flask --app app backup DIR`` and ``flask --app app restore DIR``: a consistent copy of the
database and the archive's files, and bringing it back on a fresh machine.

Consistency: the database snapshot is taken first (SQLite: the online backup API; PostgreSQL:
``pg_dump`` of a repeatable-read snapshot exported by a transaction that also reads which
files the snapshot names). Only those files are copied, each checked against the SHA-256 its
index row records. Stored files never change once written (their name is their SHA-256), so
files written after the snapshot are simply not in the backup, and everything the snapshot
names is. Local copies of an external archive's instances are left out: their index rows are
in the snapshot, their images live in the PACS and are fetched again on first use.

The upload inbox's quarantine (``instance/inbox/``, docs/inbox.md) travels too: the files its
``inbox_instance`` rows in the snapshot name, each checked against the SHA-256 that names it,
go to ``inbox/kept/..``. Part files of uploads still arriving are left out (the manifest
counts them; such an upload resumes from its first byte after a restore). The archive never
imports ``portal.inbox`` (docs/architecture.md, contract ``inbox-apart``): the rows are read
with SQL, the quarantine's folder comes from the app (``app.extensions["inbox"]``).

The backup folder holds ``manifest.json`` (written last: a folder without it is not a
backup), the database (``portal.db`` or ``database.dump``), ``archive/objects/..`` and the
audit checkpoint file when there is one. Restore checks everything before it writes anything,
and removes what it added when a step fails, so nothing is ever half-restored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import click
from alembic.script import ScriptDirectory
from flask import Flask, current_app
from flask.cli import with_appcontext
from sqlalchemy import Connection, Engine, create_engine, inspect

from portal import audit
from portal.archive import current_archive
from portal.archive.store import EmbeddedStore
from portal.config import database_url
from portal.migrate import alembic_config, upgrade_database

FORMAT = "portal-backup/1"
MANIFEST = "manifest.json"
SQLITE_FILE = "portal.db"
DUMP_FILE = "database.dump"
CHECKPOINTS = "audit-checkpoints.log"
# Rows counted into the manifest and compared after a restore.
COUNTED = ("patient", "study", "series", "instance", "stored_object", "external_instance",
           "audit_event", "portal_user")
# A database holding a row in any of these is not empty: restore needs --force.
NOT_EMPTY_IF_ROWS = ("patient", "study", "stored_object", "audit_event", "portal_user",
                     "inbox_study")
INBOX_FOLDER = "inbox"
_CHUNK = 1 << 20
_HEX = frozenset("0123456789abcdef")


class Quarantine(Protocol):
    """What backup needs of the upload inbox's quarantine (``portal.inbox.quarantine``)."""

    root: Path

    def kept_path(self, sha256: str) -> Path:
        """Where a quarantined file named by its SHA-256 is kept."""


class BackupRefused(click.ClickException):
    """A backup or restore that cannot go on; the message says why (exit status 1)."""


@dataclass
class Snapshot:
    """What one database snapshot holds: its schema revision, row counts, the audit chain's
    sealed end, and the files it names (storage key, SHA-256, size)."""

    revision: str
    counts: dict[str, int]
    audit_head: dict[str, Any] | None
    files: list[tuple[str, str, int]] = field(default_factory=list)
    external_copies_left_out: int = 0
    # The upload inbox: SHA-256 of every quarantined file the rows name, waiting studies,
    # uploads still arriving (their part files are not backed up).
    inbox_files: list[str] = field(default_factory=list)
    inbox_waiting: int = 0
    inbox_unfinished: int = 0


def _read_snapshot(conn: Connection) -> Snapshot:
    """Read everything the manifest needs inside the snapshot's own transaction."""
    def scalar(sql: str) -> Any:
        return conn.exec_driver_sql(sql).scalar()

    counts = {table: int(scalar(f"SELECT count(*) FROM {table}") or 0)  # noqa: S608 (constants)
              for table in COUNTED}
    head = conn.exec_driver_sql("SELECT count, last_hash FROM audit_head WHERE id = 1").first()
    files = [(key, sha, int(size)) for key, sha, size in conn.exec_driver_sql(
        "SELECT storage_key, sha256, size FROM stored_object WHERE sop_instance_uid NOT IN "
        "(SELECT sop_instance_uid FROM cached_copy) ORDER BY storage_key")]
    # Stored objects counted as backed up: without the external archive's local copies.
    counts["stored_object"] = len(files)
    inbox: list[str] = []
    waiting = unfinished = 0
    if inspect(conn).has_table("inbox_instance"):  # a backup older than the inbox has none
        inbox = [str(sha) for (sha,) in conn.exec_driver_sql(
            "SELECT DISTINCT sha256 FROM inbox_instance ORDER BY sha256")]
        waiting = int(scalar("SELECT count(*) FROM inbox_study WHERE state = 'waiting'") or 0)
        unfinished = int(scalar("SELECT count(*) FROM inbox_file WHERE state = 'receiving'")
                         or 0)
    return Snapshot(revision=str(scalar("SELECT version_num FROM alembic_version")),
                    counts=counts,
                    audit_head=None if head is None else {"count": int(head[0]),
                                                          "last_hash": head[1]},
                    files=files,
                    external_copies_left_out=int(scalar("SELECT count(*) FROM cached_copy")
                                                 or 0),
                    inbox_files=inbox, inbox_waiting=waiting, inbox_unfinished=unfinished)


def _quarantine(app: Flask) -> Quarantine | None:
    q: Quarantine | None = app.extensions.get("inbox")
    return q


def _valid_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _inbox_key(sha256: str) -> str:
    """A quarantined file's place in the backup folder, below ``inbox/``."""
    return f"kept/{sha256[:2]}/{sha256}.dcm"


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_checked(source: Path, target: Path, sha256: str, *, link: bool,
                  temp_folder: Path | None = None) -> None:
    """Copy (or hard-link) one file and check its bytes have ``sha256``; a mismatch raises
    BackupRefused and leaves no target behind. The temp file is made in ``temp_folder`` (the
    same file system as the target), else beside the target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = (temp_folder or target.parent) / f"{target.name}.part"
    try:
        linked = False
        if link:
            with contextlib.suppress(OSError):  # another file system: copy instead
                os.link(source, temp)
                linked = True
        digest = hashlib.sha256()
        if linked:
            with temp.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        else:
            with source.open("rb") as src, temp.open("wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        if digest.hexdigest() != sha256:
            raise BackupRefused(f"{source.name} does not match the SHA-256 the index records "
                                "(run archive verify)")
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _progress(items: list[Any], label: str) -> Any:
    return click.progressbar(items, label=label, show_pos=True, file=sys.stderr)


def _portal_version() -> str:
    try:
        return metadata.version("referrer-portal")
    except metadata.PackageNotFoundError:
        return "unknown"


def _engine(app: Flask) -> Engine:
    engine: Engine | None = app.extensions["db"].engine
    if engine is None:
        raise BackupRefused("no database is configured")
    return engine


def _pg_command(engine: Engine) -> tuple[str, dict[str, str]]:
    """The libpq connection URI of the engine (without its password) and the environment
    that carries the password, so that it never shows in a process list."""
    url = engine.url
    env = dict(os.environ)
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    plain = url.set(drivername="postgresql", password=None)
    return plain.render_as_string(hide_password=False), env


def _run(argv: list[str], env: dict[str, str] | None = None) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    except FileNotFoundError as exc:
        raise BackupRefused(f"{argv[0]} is not installed (the postgresql-client package)"
                            ) from exc
    if done.returncode:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise BackupRefused(f"{argv[0]} failed: {message[-1] if message else done.returncode}")


# -- backup -----------------------------------------------------------------------------------


def make_backup(app: Flask, folder: Path, *, link: bool = False) -> dict[str, Any]:
    """Write a backup into ``folder`` (absent or empty); return its manifest."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise BackupRefused(f"{folder} is not empty: back up into a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    engine = _engine(app)
    database = app.extensions["db"]
    audit.seal(database, wait=True)  # the chain's end as of now goes into the snapshot
    click.echo("taking the database snapshot", err=True)
    if engine.dialect.name == "sqlite":
        db_name = SQLITE_FILE
        snapshot = _sqlite_snapshot(engine, folder / SQLITE_FILE)
    elif engine.dialect.name == "postgresql":
        db_name = DUMP_FILE
        snapshot = _postgres_snapshot(engine, folder / DUMP_FILE)
    else:
        raise BackupRefused(f"backups of {engine.dialect.name} databases are not supported")
    store = current_archive().store
    files: dict[str, str] = {}
    with _progress(snapshot.files, "Copying archive files") as bar:
        for key, sha, _size in bar:
            source = store.path_of(key)
            if not source.is_file():
                raise BackupRefused(f"stored file {key} is missing (run archive verify)")
            _copy_checked(source, folder / "archive" / "objects" / key, sha, link=link)
            files[key] = sha
    quarantine = _quarantine(app)
    if snapshot.inbox_files and quarantine is None:
        raise BackupRefused("the database names quarantined uploads but the inbox is not set up")
    with _progress(snapshot.inbox_files, "Copying the inbox's quarantined files") as bar:
        for sha in bar:
            assert quarantine is not None  # checked above
            source = quarantine.kept_path(sha)
            if not source.is_file():
                raise BackupRefused(f"quarantined file {sha} is missing (accepted or rejected "
                                    "while the backup ran?): run the backup again")
            _copy_checked(source, folder / INBOX_FOLDER / _inbox_key(sha), sha, link=link)
    checkpoints = audit.checkpoints_from(app.config["PORTAL"], app.instance_path)
    checkpoint_sha = None
    if checkpoints is not None and checkpoints.path.is_file():
        shutil.copyfile(checkpoints.path, folder / CHECKPOINTS)
        checkpoint_sha = _sha256_of(folder / CHECKPOINTS)
    manifest: dict[str, Any] = {
        "format": FORMAT, "portal_version": _portal_version(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "database": {"dialect": engine.dialect.name, "file": db_name,
                     "sha256": _sha256_of(folder / db_name)},
        "migration_head": snapshot.revision, "counts": snapshot.counts,
        "audit_chain_head": snapshot.audit_head, "audit_checkpoints_sha256": checkpoint_sha,
        "external_copies_left_out": snapshot.external_copies_left_out,
        "files": files,
        "inbox": {"files": snapshot.inbox_files, "waiting_studies": snapshot.inbox_waiting,
                  "unfinished_uploads_left_out": snapshot.inbox_unfinished},
    }
    temp = folder / (MANIFEST + ".part")
    temp.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    _fsync_file(temp)
    os.replace(temp, folder / MANIFEST)
    _fsync_dir(folder)
    audit.record(database, audit.EXPORT, action="R", outcome=audit.OUTCOME_SUCCESS,
                 who="cli:backup", source_address="cli",
                 details={"type": "backup", "instances": snapshot.counts["instance"],
                          "files": len(files)})
    return manifest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sqlite_snapshot(engine: Engine, target: Path) -> Snapshot:
    """The online backup API in one step: a consistent copy while writers go on (WAL)."""
    source = engine.url.database
    if not source or source == ":memory:":
        raise BackupRefused("an in-memory SQLite database cannot be backed up")
    with contextlib.closing(sqlite3.connect(source)) as src, \
            contextlib.closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
    copy = create_engine(f"sqlite:///{target}")
    try:
        with copy.connect() as conn:
            return _read_snapshot(conn)
    finally:
        copy.dispose()


def _postgres_snapshot(engine: Engine, target: Path) -> Snapshot:
    """A repeatable-read transaction exports its snapshot; pg_dump dumps exactly that
    snapshot while the transaction (which read the file list from it) stays open."""
    uri, env = _pg_command(engine)
    with engine.connect() as raw:
        conn = raw.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            snapshot_id = conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar()
            snapshot = _read_snapshot(conn)
            _run(["pg_dump", "--format=custom", f"--snapshot={snapshot_id}", "--no-owner",
                  "--no-privileges", f"--file={target}", f"--dbname={uri}"], env)
    return snapshot


@click.command("backup")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--link", is_flag=True,
              help="Hard-link the archive's files instead of copying them (same file system "
              "only; the backup then shares the disk with the archive).")
@with_appcontext
def backup_command(folder: Path, link: bool) -> None:
    """Write a consistent backup (database snapshot, the files it names, a manifest) into a
    new FOLDER."""
    manifest = make_backup(current_app._get_current_object(), folder,  # type: ignore[attr-defined]
                           link=link)
    counts = manifest["counts"]
    click.echo(f"backup written to {folder}: {counts['study']} studies, "
               f"{counts['instance']} instances, {len(manifest['files'])} files, "
               f"{counts['audit_event']} audit records")
    if manifest["external_copies_left_out"]:
        click.echo(f"{manifest['external_copies_left_out']} local copies of the external "
                   "archive's instances left out (fetched again on first use)")
    inbox = manifest["inbox"]
    click.echo(f"upload inbox: {inbox['waiting_studies']} waiting studies, "
               f"{len(inbox['files'])} quarantined files")
    if inbox["unfinished_uploads_left_out"]:
        click.echo(f"{inbox['unfinished_uploads_left_out']} uploads still arriving left out "
                   "(their senders resume them from the start)")


# -- restore ----------------------------------------------------------------------------------


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, checked to be one this portal can restore."""
    path = folder / MANIFEST
    if not path.is_file():
        raise BackupRefused(f"{folder} holds no {MANIFEST}: not a complete backup")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BackupRefused(f"{MANIFEST} is not readable JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        made = manifest if isinstance(manifest, dict) else {}
        raise BackupRefused(f"the backup is of format {made.get('format')!r} (portal version "
                            f"{made.get('portal_version', '?')}); this portal restores "
                            f"{FORMAT} only")
    shapes = {"database": dict, "migration_head": str, "counts": dict, "files": dict}
    for key, kind in shapes.items():
        if not isinstance(manifest.get(key), kind):
            raise BackupRefused(f"{MANIFEST} lacks {key!r}: not a backup of this portal")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in manifest["files"].items()):
        raise BackupRefused(f"{MANIFEST} lists its files wrongly: not a backup of this portal")
    # Backups made before the inbox was backed up have no "inbox": nothing to bring back.
    inbox = manifest.setdefault("inbox", {"files": [], "waiting_studies": 0,
                                          "unfinished_uploads_left_out": 0})
    if not isinstance(inbox, dict) or not isinstance(inbox.get("files"), list) \
            or not all(_valid_sha256(sha) for sha in inbox["files"]):
        raise BackupRefused(f"{MANIFEST} lists the inbox's files wrongly: not a backup of "
                            "this portal")
    return manifest


def _check_backup(folder: Path, manifest: dict[str, Any], engine: Engine, url: str) -> None:
    """Everything is checked before anything is written."""
    dialect = manifest["database"].get("dialect")
    if dialect != engine.dialect.name:
        raise BackupRefused(f"the backup holds a {dialect} database; this portal is configured "
                            f"for {engine.dialect.name}")
    revision = manifest["migration_head"]
    scripts = ScriptDirectory.from_config(alembic_config(url))
    try:
        known = scripts.get_revision(revision)
    except Exception:  # alembic raises several kinds for an unknown or malformed id
        known = None
    if known is None:
        raise BackupRefused(f"the backup's schema revision {revision!r} is unknown to this "
                            f"portal version ({_portal_version()}): restore it with the "
                            "version that made it")
    # Exactly the file restore reads for this kind of database, in the backup folder itself
    # (a manifest naming another path would have a file checked that restore never reads).
    db_name = SQLITE_FILE if engine.dialect.name == "sqlite" else DUMP_FILE
    if manifest["database"].get("file") != db_name:
        raise BackupRefused(f"the manifest names {str(manifest['database'].get('file'))[:80]!r} "
                            f"as the database; a {engine.dialect.name} backup holds {db_name}")
    db_file = folder / db_name
    if not db_file.is_file():
        raise BackupRefused(f"the database file {db_file.name} is missing from the backup")
    if _sha256_of(db_file) != manifest["database"].get("sha256"):
        raise BackupRefused(f"{db_file.name} does not match the manifest's SHA-256: the backup "
                            "was changed or damaged")
    files: dict[str, str] = manifest["files"]
    with _progress(sorted(files.items()), "Checking backup files") as bar:
        for key, sha in bar:
            try:
                if EmbeddedStore.key_for(sha) != key:
                    raise ValueError(key)
            except ValueError as exc:
                raise BackupRefused(f"the manifest names an invalid file {key!r}") from exc
            path = folder / "archive" / "objects" / key
            if not path.is_file():
                raise BackupRefused(f"archive file {key} is missing from the backup")
            if _sha256_of(path) != sha:
                raise BackupRefused(f"archive file {key} does not match its SHA-256: the "
                                    "backup was changed or damaged")
    with _progress(list(manifest["inbox"]["files"]), "Checking the inbox's files") as bar:
        for sha in bar:
            path = folder / INBOX_FOLDER / _inbox_key(sha)
            if not path.is_file():
                raise BackupRefused(f"quarantined file {sha} is missing from the backup")
            if _sha256_of(path) != sha:
                raise BackupRefused(f"quarantined file {sha} does not match its SHA-256: the "
                                    "backup was changed or damaged")
    expected = manifest.get("audit_checkpoints_sha256")
    if expected is not None:
        path = folder / CHECKPOINTS
        if not path.is_file() or _sha256_of(path) != expected:
            raise BackupRefused(f"{CHECKPOINTS} is missing or does not match the manifest")


def _database_in_use(engine: Engine) -> bool:
    tables = set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        for table in NOT_EMPTY_IF_ROWS:
            if table in tables and conn.exec_driver_sql(
                    f"SELECT 1 FROM {table} LIMIT 1").first() is not None:  # noqa: S608
                return True
    return False


def restore_backup(app: Flask, folder: Path, *, force: bool = False) -> dict[str, Any]:
    """Bring a backup back into this (empty, unless ``force``) instance; return its manifest.

    Order: check the backup whole; check the target is empty; add the archive files; put the
    database in place; on any failure remove the files added. Then the checks after: row
    counts and the audit chain's end as the manifest says."""
    manifest = read_manifest(folder)
    engine = _engine(app)
    url = database_url(app.config["PORTAL"])
    _check_backup(folder, manifest, engine, url)
    store = current_archive().store
    present = set(store.keys())
    quarantine = _quarantine(app)
    inbox_files: list[str] = manifest["inbox"]["files"]
    if inbox_files and quarantine is None:
        raise BackupRefused("the backup holds quarantined uploads but the inbox is not set up")
    kept_now = _kept_files(quarantine)
    checkpoints = audit.checkpoints_from(app.config["PORTAL"], app.instance_path)
    if not force:
        reasons = []
        if _database_in_use(engine):
            reasons.append("the database holds data")
        if present:
            reasons.append(f"the archive folder holds {len(present)} file(s)")
        if kept_now:
            reasons.append(f"the inbox's quarantine holds {len(kept_now)} file(s)")
        if checkpoints is not None and checkpoints.path.is_file() \
                and checkpoints.path.stat().st_size:
            reasons.append(f"{checkpoints.path.name} exists")
        if reasons:
            raise BackupRefused("will not overwrite: " + "; ".join(reasons) +
                                ". Restore into a fresh instance, or pass --force to replace "
                                "what is there")
    files: dict[str, str] = manifest["files"]
    added: list[str] = []
    inbox_added: list[Path] = []
    try:
        store.ensure()
        with _progress(sorted(files.items()), "Restoring archive files") as bar:
            for key, sha in bar:
                if key in present and _sha256_of(store.path_of(key)) == sha:
                    continue  # the same content is there already (--force)
                _copy_checked(folder / "archive" / "objects" / key, store.path_of(key), sha,
                              link=False, temp_folder=store.tmp)
                if key not in present:
                    added.append(key)
        store.sync_folders(added)
        with _progress(list(inbox_files), "Restoring the inbox's files") as bar:
            for sha in bar:
                assert quarantine is not None  # checked above
                target = quarantine.kept_path(sha)
                if target in kept_now and _sha256_of(target) == sha:
                    continue
                _copy_checked(folder / INBOX_FOLDER / _inbox_key(sha), target, sha,
                              link=False)
                if target not in kept_now:
                    inbox_added.append(target)
        for parent in {path.parent for path in inbox_added}:
            _fsync_dir(parent)
        click.echo("restoring the database", err=True)
        app.extensions["db"].dispose()
        if engine.dialect.name == "sqlite":
            _restore_sqlite(engine, folder / SQLITE_FILE)
        else:
            uri, env = _pg_command(engine)
            _run(["pg_restore", "--single-transaction", "--clean", "--if-exists",
                  "--no-owner", "--no-privileges", f"--dbname={uri}", str(folder / DUMP_FILE)],
                 env)
    except BaseException:
        for key in added:
            store.delete(key)
        for path in inbox_added:
            path.unlink(missing_ok=True)
        raise
    _after_restore(app, engine, manifest)
    if checkpoints is not None and manifest.get("audit_checkpoints_sha256"):
        checkpoints.path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / CHECKPOINTS, checkpoints.path)
    if force:
        for key in present - set(files):
            store.delete(key)
        if quarantine is not None:  # quarantined files no restored row names
            for path in kept_now - {quarantine.kept_path(sha) for sha in inbox_files}:
                path.unlink(missing_ok=True)
    upgrade_database(app)  # a backup of an older schema revision: bring it to this version's
    audit.record(app.extensions["db"], audit.APPLICATION_ACTIVITY, action="E",
                 outcome=audit.OUTCOME_SUCCESS, who="cli:restore", source_address="cli",
                 details={"type": "restore", "backup_created_at": manifest.get("created_at"),
                          "files": len(files)})
    # Chained now (PostgreSQL seals in the background): `audit verify` next finds it sealed.
    audit.seal(app.extensions["db"], wait=True)
    return manifest


def _kept_files(quarantine: Quarantine | None) -> set[Path]:
    """The quarantined files there are now (part files of arriving uploads aside)."""
    if quarantine is None:
        return set()
    return set((quarantine.root / "kept").glob("??/*.dcm"))


def _restore_sqlite(engine: Engine, source: Path) -> None:
    """Put the database file in place atomically; leftovers of an old write-ahead log would
    be replayed into the new file, so they go first."""
    target = Path(str(engine.url.database))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".restore-",
                                     delete=False) as temp:
        temp_path = Path(temp.name)
    try:
        shutil.copyfile(source, temp_path)
        _fsync_file(temp_path)
        for suffix in ("-wal", "-shm", "-journal"):
            Path(str(target) + suffix).unlink(missing_ok=True)
        os.replace(temp_path, target)
        _fsync_dir(target.parent)
    finally:
        temp_path.unlink(missing_ok=True)


def _after_restore(app: Flask, engine: Engine, manifest: dict[str, Any]) -> None:
    """Drop the index rows of external copies whose files were left out, then compare the
    restored rows and the audit chain's end with the manifest."""
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM stored_object WHERE sop_instance_uid IN "
                             "(SELECT sop_instance_uid FROM cached_copy)")
        conn.exec_driver_sql("DELETE FROM cached_copy")
        restored = _read_snapshot(conn)
    if restored.counts != manifest["counts"]:
        raise BackupRefused(f"the restored database holds {restored.counts}, the manifest "
                            f"says {manifest['counts']}")
    if restored.audit_head != manifest.get("audit_chain_head"):
        raise BackupRefused("the restored audit chain ends elsewhere than the manifest says")
    if manifest["inbox"]["files"] and restored.inbox_files != manifest["inbox"]["files"]:
        raise BackupRefused("the restored inbox names other quarantined files than the "
                            "manifest says")


@click.command("restore")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--force", is_flag=True,
              help="Replace the database and archive files that are there (stop the portal "
              "first).")
@with_appcontext
def restore_command(folder: Path, force: bool) -> None:
    """Restore a backup FOLDER into an empty instance folder and database."""
    manifest = restore_backup(current_app._get_current_object(),  # type: ignore[attr-defined]
                              folder, force=force)
    counts = manifest["counts"]
    click.echo(f"restored {counts['study']} studies, {counts['instance']} instances, "
               f"{len(manifest['files'])} files, "
               f"{len(manifest['inbox']['files'])} quarantined inbox files, "
               f"{counts['audit_event']} audit records "
               f"(backup of {manifest.get('created_at')}); now run archive verify and "
               "audit verify")


def iter_commands() -> Iterator[click.Command | click.Group]:
    """The commands to register with the app."""
    yield backup_command
    yield restore_command
