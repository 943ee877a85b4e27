"""docs/security.md 52: the end of the audit trail cannot be cut unseen. Someone with write access
to the database deletes the newest records and rewrites ``audit_head`` so the chain still
verifies; ``flask --app app audit verify`` must fail anyway, from the checkpoints signed with a
key the database does not hold and from the hashes the audit repository received."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import text

from portal import audit
from portal.config import ConfigError
from tests.access.test_audit_forward import SyslogReceiver, forward_cli, record
from tests.conftest import close_app, free_port, make_app

KEY = "a-checkpoint-key-that-only-the-configuration-holds"


def verify(app: Flask, *args: str) -> tuple[int, str]:
    result = app.test_cli_runner().invoke(args=["audit", "verify", *args])
    return result.exit_code, result.output


def cut_tail(app: Flask, keep: int) -> None:
    """The attack: delete every record after the first ``keep`` and rewrite the head so the
    shortened chain looks complete (plain SQL, as an intruder in the database would)."""
    with app.extensions["db"].engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_event WHERE id > :keep"), {"keep": keep})
        last = conn.execute(text("SELECT record_hash FROM audit_event WHERE id = :keep"),
                            {"keep": keep}).scalar_one()
        conn.execute(text("UPDATE audit_head SET last_hash = :last, count = :keep"),
                     {"last": last, "keep": keep})


@pytest.fixture
def signed(tmp_path: Path, database_url: str) -> Iterator[Flask]:
    app = make_app(tmp_path / "instance", database_url, AUDIT_CHECKPOINT_KEY=KEY,
                   AUDIT_CHECKPOINT_EVERY=5)
    yield app
    close_app(app)


def test_a_cut_tail_with_a_rewritten_head_fails_verify_from_the_automatic_checkpoint(
        signed: Flask) -> None:
    record(signed, 12)  # checkpoints after records 5 and 10
    assert verify(signed)[0] == 0
    cut_tail(signed, keep=8)
    code, output = verify(signed)
    assert code == 1, output
    assert "audit trail BROKEN" in output
    assert "covers 10 records but the database holds 8: records were cut from the end" in output
    # The trail growing again past the cut (new rows, maybe the same ids) does not hide it.
    record(signed, 6, start=100)
    code, output = verify(signed)
    assert code == 1 and "record(s) named by signed checkpoints" in output, output


def test_the_checkpoint_command_anchors_the_newest_records(signed: Flask) -> None:
    record(signed, 7)  # the automatic checkpoint covers 5 records only
    runner = signed.test_cli_runner()
    result = runner.invoke(args=["audit", "checkpoint"])
    assert result.exit_code == 0 and "checkpoint: 7 records, newest 7" in result.output
    code, output = verify(signed)
    assert code == 0 and "audit trail intact: 7 records" in output, output
    cut_tail(signed, keep=6)
    code, output = verify(signed)
    assert code == 1 and "covers 7 records but the database holds 6" in output, output
    # A checkpoint is not signed over a trail that lost what the last one recorded.
    refused = runner.invoke(args=["audit", "checkpoint"])
    assert refused.exit_code == 1 and "run audit verify" in refused.output


def test_an_edited_or_removed_checkpoint_file_is_reported(signed: Flask) -> None:
    record(signed, 10)
    path = Path(signed.instance_path) / "audit-checkpoints.log"
    cut_tail(signed, keep=7)
    # Lowering the checkpoints to match the cut needs the key: without it the MAC fails.
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[-1].update(count=7, id=7)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, output = verify(signed)
    assert code == 1 and "checkpoint file line(s) 2 do not verify" in output, output
    # Removing the file is no way out either once the trail has records to anchor.
    path.unlink()
    code, output = verify(signed)
    assert code == 1 and "no signed checkpoint" in output and "was removed" in output, output


def test_the_repository_log_shows_records_cut_from_the_database(tmp_path: Path) -> None:
    port = free_port()
    app = make_app(tmp_path / "instance", AUDIT_SYSLOG_URL=f"tcp://127.0.0.1:{port}")
    log = tmp_path / "repository.log"
    receiver = SyslogReceiver(port, log=log)
    try:
        record(app, 6)
        assert forward_cli(app)[0] == 0
        receiver.wait_for(6)
        code, output = verify(app, "--repository", str(log))
        assert code == 0 and "intact: 6 records" in output, output
        cut_tail(app, keep=4)
        code, output = verify(app, "--repository", str(log))
        assert code == 1, output
        assert ("2 record(s) the audit repository received are not in the database "
                "(ids 5 to 6): the trail was cut") in output
        # New records that take the freed ids differ from what the repository holds.
        record(app, 2, start=10)
        code, output = verify(app, "--repository", str(log))
        assert code == 1 and "2 record(s) differ from what the audit repository" in output
    finally:
        receiver.close()
        close_app(app)


def test_a_rolled_back_record_is_never_checkpointed(signed: Flask) -> None:
    record(signed, 4)
    database = signed.extensions["db"]
    with pytest.raises(RuntimeError), database.write_transaction() as session:
        audit.append(session, audit.QUERY, action="E", outcome=0, who="user:x")
        raise RuntimeError("the caller's transaction fails after the 5th record")
    assert not (Path(signed.instance_path) / "audit-checkpoints.log").exists()
    record(signed, 1)
    assert verify(signed)[0] == 0


def test_a_short_checkpoint_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="AUDIT_CHECKPOINT_KEY: at least 32"):
        make_app(tmp_path / "instance", AUDIT_CHECKPOINT_KEY="short")
