"""Configuration: defaults -> config.toml -> PORTAL_* -> overrides, validated at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from portal.config import ConfigError, database_url, load_config

REPO = Path(__file__).resolve().parent.parent


def test_sources_override_in_order(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        'redis_url = "redis://from-toml"\n[dimse]\nport = 104\nallowed_peers = ["CT1@10.0.0.2"]\n')
    settings = load_config({"INSTANCE_PATH": str(tmp_path)},
                           environ={"PORTAL_REDIS_URL": "redis://from-env"})
    assert settings["REDIS_URL"] == "redis://from-env"
    assert settings["DIMSE_PORT"] == 104
    assert settings["DIMSE_ALLOWED_PEERS"] == ["CT1@10.0.0.2"]
    overridden = load_config({"INSTANCE_PATH": str(tmp_path), "DIMSE_PORT": 11113}, environ={})
    assert overridden["DIMSE_PORT"] == 11113


def test_default_database_is_sqlite_in_the_instance(tmp_path: Path) -> None:
    settings = load_config({"INSTANCE_PATH": str(tmp_path)}, environ={})
    assert database_url(settings) == f"sqlite:///{tmp_path.resolve() / 'portal.db'}"
    pg = load_config({"INSTANCE_PATH": str(tmp_path)},
                     environ={"PORTAL_DATABASE_URL": "postgresql://u@h/db"})
    assert database_url(pg) == "postgresql+psycopg://u@h/db"


@pytest.mark.parametrize(("environ", "named"), [
    ({"PORTAL_DIMSE_PORT": "many"}, "PORTAL_DIMSE_PORT"),
    ({"PORTAL_DIMSE_PORT": "70000"}, "DIMSE_PORT"),
    ({"PORTAL_ENV": "production"}, "SECRET_KEY"),
    ({"PORTAL_ENV": "staging"}, "ENV"),
    ({"PORTAL_ARCHIVE_URL": "ftp://pacs"}, "ARCHIVE_URL"),
    ({"PORTAL_DIMSE_ALLOWED_PEERS": "no-at-sign"}, "DIMSE_ALLOWED_PEERS"),
    ({"PORTAL_MAX_REQUEST_BYTES": "-1"}, "MAX_REQUEST_BYTES"),
    ({"PORTAL_TRUSTED_PROXY_ADDRESSES": "10.0.0.1,proxy.local"}, "TRUSTED_PROXY_ADDRESSES"),
])
def test_bad_settings_name_themselves(tmp_path: Path, environ: dict[str, str],
                                      named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"INSTANCE_PATH": str(tmp_path)}, environ=environ)
    assert str(info.value).startswith(named)


def test_unknown_setting_in_the_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("secret_kee = 'typo'\n")
    with pytest.raises(ConfigError, match="SECRET_KEE"):
        load_config({"INSTANCE_PATH": str(tmp_path)}, environ={})


def test_start_up_stops_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_")}
    env.update(PORTAL_INSTANCE_PATH=str(tmp_path), PORTAL_ENV="production")
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "routes"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "configuration error: SECRET_KEY: required in production (at least 32 characters)")
    assert "Traceback" not in done.stderr


KEY = "k" * 40


@pytest.mark.parametrize(("environ", "named"), [
    ({"PORTAL_OIDC_ISSUER": "http://idp.hospital.example", "PORTAL_OIDC_CLIENT_ID": "c",
      "PORTAL_OIDC_CLIENT_SECRET": "s"}, "OIDC_ISSUER"),
    ({"PORTAL_ARCHIVE_URL": "http://pacs.hospital.example/dicom-web"}, "ARCHIVE_URL"),
    ({"PORTAL_REDIS_URL": "redis://cache.hospital.example:6379/0"}, "REDIS_URL"),
    ({"PORTAL_REDIS_URL": "rediss://cache.hospital.example:6380/0"}, "REDIS_URL"),
    ({"PORTAL_DATABASE_URL": "postgresql+psycopg://portal@db.hospital.example/portal"},
     "DATABASE_URL"),
    ({"PORTAL_AUDIT_SYSLOG_URL": "tcp://siem.hospital.example:6514"}, "AUDIT_SYSLOG_URL"),
    ({"PORTAL_SMTP_URL": "smtps://mail.hospital.example"}, "PUBLIC_URL"),
])
def test_production_refuses_plain_back_channels(tmp_path: Path, environ: dict[str, str],
                                                named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"INSTANCE_PATH": str(tmp_path)},
                    environ={"PORTAL_ENV": "production", "PORTAL_SECRET_KEY": KEY, **environ})
    assert str(info.value).startswith(named)


def test_production_accepts_tls_back_channels_and_loopback(tmp_path: Path) -> None:
    config = load_config({"INSTANCE_PATH": str(tmp_path)}, environ={
        "PORTAL_ENV": "production", "PORTAL_SECRET_KEY": KEY,
        "PORTAL_OIDC_ISSUER": "https://idp.hospital.example", "PORTAL_OIDC_CLIENT_ID": "c",
        "PORTAL_OIDC_CLIENT_SECRET": "s",
        "PORTAL_REDIS_URL": "rediss://:secret@cache.hospital.example:6380/0",
        "PORTAL_DATABASE_URL":
            "postgresql+psycopg://portal@db.hospital.example/portal?sslmode=verify-full",
        "PORTAL_ARCHIVE_URL": "http://127.0.0.1:8042/dicom-web",
        "PORTAL_AUDIT_SYSLOG_URL": "tls://siem.hospital.example:6514"})
    assert config["REDIS_URL"].startswith("rediss://")
