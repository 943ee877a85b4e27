"""`flask --app app archive import`: files, folders and zips, with a summary and exit status."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from portal.archive.models import StoredObject
from tests.factories import make_instance


def stored(app: Flask) -> int:
    with app.extensions["db"].new_session() as session:
        return session.scalar(select(func.count()).select_from(StoredObject)) or 0


def test_import_a_folder_recursively(runner: Any, app: Flask, tmp_path: Path) -> None:
    folder = tmp_path / "in" / "nested"
    folder.mkdir(parents=True)
    study = generate_uid()
    for i in range(3):
        (folder / f"{i}.dcm").write_bytes(make_instance(study=study, value=i))
    result = runner.invoke(args=["archive", "import", str(tmp_path / "in")])
    assert result.exit_code == 0, result.output
    assert "stored: 3, already stored: 0, rejected: 0" in result.output
    again = runner.invoke(args=["archive", "import", str(tmp_path / "in")])
    assert "stored: 0, already stored: 3, rejected: 0" in again.output
    assert stored(app) == 3


def test_rejected_files_are_named_with_a_reason_and_exit_1(runner: Any, app: Flask,
                                                           tmp_path: Path) -> None:
    good = tmp_path / "good.dcm"
    good.write_bytes(make_instance())
    text = tmp_path / "notes.dcm"
    text.write_text("not an image")
    truncated = tmp_path / "cut.dcm"
    truncated.write_bytes(make_instance(rows=32, columns=32)[:900])
    result = runner.invoke(args=["archive", "import", str(good), str(text), str(truncated),
                                 str(tmp_path / "missing.dcm")])
    assert result.exit_code == 1
    assert "stored: 1" in result.output and "rejected: 3" in result.output
    assert "notes.dcm: not a DICOM Part 10 file" in result.output
    assert "cut.dcm: malformed DICOM" in result.output
    assert "missing.dcm: no such file or folder" in result.output
    assert stored(app) == 1


def test_import_a_zip(runner: Any, app: Flask, tmp_path: Path) -> None:
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(2):
            zf.writestr(f"DICOM/IMG{i}", make_instance(value=i))
    result = runner.invoke(args=["archive", "import", str(archive)])
    assert result.exit_code == 0, result.output
    assert stored(app) == 2


def test_a_zip_with_a_traversal_entry_is_refused_whole(runner: Any, app: Flask,
                                                       tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.dcm", make_instance())
        zf.writestr("../../escape.dcm", make_instance())
    before = {p for p in tmp_path.parent.rglob("*")}
    result = runner.invoke(args=["archive", "import", str(archive)])
    assert result.exit_code == 1
    assert "path traversal" in result.output
    assert stored(app) == 0
    created = {p for p in tmp_path.parent.rglob("*")} - before
    assert all("instance" in str(p) for p in created), created


def test_a_zip_bomb_is_refused(runner: Any, app: Flask, tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.dcm", bytes(50 << 20))
    result = runner.invoke(args=["archive", "import", str(archive)])
    assert result.exit_code == 1
    assert "zip bomb" in result.output
    assert stored(app) == 0


def test_clients_create_prints_the_secret_once(runner: Any, app: Flask) -> None:
    result = runner.invoke(args=["clients", "create", "ct-1", "--read"])
    assert result.exit_code == 0, result.output
    secret = next(line.split(": ", 1)[1] for line in result.output.splitlines()
                  if line.startswith("secret: "))
    listed = runner.invoke(args=["clients", "list"])
    assert "ct-1\tstore,read\tactive" in listed.output
    assert secret not in listed.output
    duplicate = runner.invoke(args=["clients", "create", "ct-1"])
    assert duplicate.exit_code != 0 and "already exists" in duplicate.output
    bad = runner.invoke(args=["clients", "create", "../x"])
    assert bad.exit_code != 0
    assert runner.invoke(args=["clients", "deactivate", "ct-1"]).exit_code == 0
