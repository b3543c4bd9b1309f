"""INI configuration: the example works, and every mistake is one clear line."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from harness import EXAMPLE_CONFIG, edit_ini, run_twistd, write_config
from mdmd.config import ActionsConfig, ConfigError, load_config
from mdmd.poll import PollSchedule


def _write(tmp_path: Path, changes: dict[str, dict[str, str | None]], extra: str = "") -> Path:
    path = tmp_path / "mdmd.ini"
    path.write_text(edit_ini(EXAMPLE_CONFIG.read_text(), changes) + extra)
    return path


def test_example_config_loads_with_documented_defaults() -> None:
    config = load_config(str(EXAMPLE_CONFIG))
    assert config.state_dir == os.path.normpath(EXAMPLE_CONFIG.parent / "../state")
    assert config.bootstrap is True
    assert config.enrollment.url == "https://localhost:8443"
    assert config.enrollment.tls_cert == os.path.join(config.state_dir, "tls-server.pem")
    # Management defaults to the enrollment certificate.
    assert config.management.tls_cert == config.enrollment.tls_cert
    assert config.management.tls_key == config.enrollment.tls_key
    assert config.management.url.endswith("/api/mdm/microsoft/management")
    assert config.management.poll == PollSchedule(15, 5, 60, 10, 1440, 0, True)
    assert config.wstep.device_cert_days == 365
    assert (config.wstep.renew_period_days, config.wstep.renew_retry_days) == (42, 7)
    assert (config.wstep.renew_grace_days, config.wstep.keep_revoked_days) == (0, 90)
    assert config.admin.url == "http://127.0.0.1:8445"
    assert config.database == os.path.join(config.state_dir, "mdmd.sqlite3")
    assert config.actions == ActionsConfig(fanout_batch=200, fanout_pause=0.1, fanout_lease=30.0)


def test_every_example_key_is_documented() -> None:
    # Each key (or pair of keys that go together) sits right under a comment.
    lines = EXAMPLE_CONFIG.read_text().splitlines()
    keys = 0
    for i, line in enumerate(lines):
        if line and not line.startswith(("#", "[")) and "=" in line:
            keys += 1
            j = i - 1
            while j >= 0 and lines[j] and not lines[j].startswith(("#", "[")):
                j -= 1
            assert lines[j].startswith("#"), f"undocumented key: {line}"
    assert keys >= 20


@pytest.mark.parametrize(
    ("changes", "extra", "where", "what"),
    [
        ({}, "[bogus]\nx = 1\n", "[bogus]", "unknown section"),
        ({"enrollment": {"enroll_secert_file": "x"}}, "", "[enrollment] enroll_secert_file", "unknown key"),
        ({"enrollment": {"url": None}}, "", "[enrollment] url", "required key is missing"),
        ({"enrollment": {"url": "http://mdm.example.com"}}, "", "[enrollment] url", "https"),
        ({"enrollment": {"listen": "ssl:443"}}, "", "[enrollment] listen", "Twisted server endpoint"),
        ({"mdmd": {"bootstrap": "maybe"}}, "", "[mdmd] bootstrap", "yes or no"),
        ({"mdmd": {"workers": "0"}}, "", "[mdmd] workers", "between 1 and 64"),
        ({"mdmd": {"workers": "all"}}, "", "[mdmd] workers", "whole number"),
        ({"wstep": {"device_cert_days": "0"}}, "", "[wstep] device_cert_days", "between 1 and 3650"),
        ({"wstep": {"device_cert_days": "a year"}}, "", "[wstep] device_cert_days", "whole number"),
        ({"wstep": {"renew_period_days": "0"}}, "", "[wstep] renew_period_days", "between 1 and 1000"),
        ({"wstep": {"renew_period_days": "1001"}}, "", "[wstep] renew_period_days", "between 1 and 1000"),
        (
            {"wstep": {"device_cert_days": "30", "renew_period_days": "30"}},
            "",
            "[wstep] renew_period_days",
            "less than device_cert_days (30)",
        ),
        ({"wstep": {"renew_retry_days": "0"}}, "", "[wstep] renew_retry_days", "between 1 and 1000"),
        (
            {"wstep": {"renew_period_days": "10", "renew_retry_days": "11"}},
            "",
            "[wstep] renew_retry_days",
            "must not exceed renew_period_days (10)",
        ),
        ({"wstep": {"renew_grace_days": "-1"}}, "", "[wstep] renew_grace_days", "between 0 and 1000"),
        ({"wstep": {"keep_revoked_days": "0"}}, "", "[wstep] keep_revoked_days", "between 1 and 36500"),
        (
            {"management": {"poll_schedule": "15x0 60x10 1440x0"}},
            "",
            "[management] poll_schedule",
            "must not be 0",
        ),
        ({"management": {"poll_schedule": "15x5 60x10 60x0"}}, "", "[management] poll_schedule", "1440"),
        ({"management": {"poll_schedule": "15x5 60x10"}}, "", "[management] poll_schedule", "three"),
        ({"management": {"provider_id": "My MDM"}}, "", "[management] provider_id", "letters"),
        ({"management": {"url": "https://mdm.example.com"}}, "", "[management] url", "path"),
        ({"management": {"tls_cert": "a.pem"}}, "", "[management] tls_key", "go together"),
        ({"store": {"backend": "mysql"}}, "", "[store] backend", "expected sqlite or postgresql"),
        ({"store": {"dsn": "dbname=mdmd"}}, "", "[store] dsn", "only for backend = postgresql"),
        ({"store": {"pool_size": "8"}}, "", "[store] pool_size", "only for backend = postgresql"),
        ({"store": {"password_file": "pw"}}, "", "[store] password_file", "only for backend = postgresql"),
        ({"store": {"backend": "postgresql"}}, "", "[store] dsn", "required when backend = postgresql"),
        (
            {"store": {"backend": "postgresql", "dsn": "dbname=mdmd password=hunter2"}},
            "",
            "[store] dsn",
            "must not hold the password: put it in password_file",
        ),
        (
            {"store": {"backend": "postgresql", "dsn": "postgresql://mdmd:hunter2@db.example.com/mdmd"}},
            "",
            "[store] dsn",
            "must not hold the password",
        ),
        (
            {"store": {"backend": "postgresql", "dsn": "dbname='mdmd"}},
            "",
            "[store] dsn",
            "not a libpq connection string",
        ),
        (
            {"store": {"backend": "postgresql", "dsn": "dbname=mdmd", "pool_size": "0"}},
            "",
            "[store] pool_size",
            "between 1 and 100",
        ),
        ({"enrollment": {"url": "https://v m:9443"}}, "", "[enrollment] url", "not a valid URL"),
        ({"enrollment": {"url": "https://mdm_.example.com"}}, "", "[enrollment] url", "neither a DNS name"),
        ({"management": {"url": "https://x:99999/m"}}, "", "[management] url", "not a valid URL"),
        ({"admin": {"url": "http://a b:8445"}}, "", "[admin] url", "not a valid URL"),
        ({"mdmd": {"log_format": "xml"}}, "", "[mdmd] log_format", "text or json"),
        ({"admin": {"allow_remote": "sure"}}, "", "[admin] allow_remote", "yes or no"),
        ({"admin": {"metrics_cache_seconds": "-1"}}, "", "[admin] metrics_cache_seconds", "between"),
        ({"actions": {"fanout_pause": "soon"}}, "", "[actions] fanout_pause", "250ms, 1.5s or 30s"),
        ({"actions": {"fanout_pause": "-1s"}}, "", "[actions] fanout_pause", "between 0s and 60s"),
        ({"actions": {"fanout_pause": "nan"}}, "", "[actions] fanout_pause", "between"),
        ({"actions": {"fanout_lease": "1500ms"}}, "", "[actions] fanout_lease", "between 2s and 3600s"),
        ({"actions": {"fanout_batch": "0"}}, "", "[actions] fanout_batch", "between 1 and 10000"),
        ({"management": {"message_log": "1001"}}, "", "[management] message_log", "between 0 and 1000"),
        ({"admin": {"tls_cert": "admin.pem"}}, "", "[admin] tls_key", "go together"),
    ],
)
def test_config_errors_name_file_section_and_key(
    tmp_path: Path, changes: dict[str, dict[str, str | None]], extra: str, where: str, what: str
) -> None:
    path = _write(tmp_path, changes, extra)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: {where}")
    assert what in message
    assert "\n" not in message


def test_the_postgresql_store_settings(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "store": {
                "backend": "postgresql",
                "dsn": "host=db.example.com dbname=mdmd user=mdmd",
                "password_file": "db_password",
                "pool_size": "12",
            }
        },
    )
    config = load_config(str(path))
    assert config.store.backend == "postgresql"
    assert config.store.dsn == "host=db.example.com dbname=mdmd user=mdmd"
    assert config.store.password_file == os.path.join(config.state_dir, "db_password")
    assert config.store.pool_size == 12
    uri = _write(tmp_path, {"store": {"backend": "postgresql", "dsn": "postgresql://mdmd@db/mdmd"}})
    assert load_config(str(uri)).store.pool_size == 4


@pytest.mark.parametrize(
    ("content", "mode", "expected"),
    [
        (b"s3cret\n", 0o600, "s3cret"),
        (b"s3cret\r\n", 0o600, "s3cret"),
        (b"s3cret", 0o400, "s3cret"),
        (b"with spaces and = signs\n", 0o600, "with spaces and = signs"),
        (b"s3cret\n", 0o640, "must be readable by its owner only (mode 0600), is 0640"),
        (b"s3cret\n", 0o604, "is 0604"),
        (b"", 0o600, "is empty"),
        (b"\n", 0o600, "is empty"),
        (b"s3cret\nmore\n", 0o600, "must hold the password alone, on one line"),
        (b"s3cret\n\n", 0o600, "must hold the password alone"),
        (b"\xff\xfe\n", 0o600, "not UTF-8"),
        (None, 0o600, "cannot read it: No such file or directory"),
    ],
)
def test_the_password_file(tmp_path: Path, content: bytes | None, mode: int, expected: str) -> None:
    from mdmd.config import read_password_file

    path = _write(
        tmp_path,
        {
            "mdmd": {"state_dir": "state"},
            "store": {"backend": "postgresql", "dsn": "dbname=mdmd", "password_file": "db_password"},
        },
    )
    config = load_config(str(path))
    assert config.store.password_file is not None
    if content is not None:
        secret = Path(config.store.password_file)
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_bytes(content)
        secret.chmod(mode)
    if expected.startswith(("must", "is ", "cannot", "not ")):
        with pytest.raises(ConfigError) as info:
            read_password_file(config)
        message = str(info.value)
        assert message.startswith(f"{path}: [store] password_file: {config.store.password_file}: ")
        assert expected in message and "\n" not in message
    else:
        assert read_password_file(config) == expected


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        load_config(str(tmp_path / "absent.ini"))


def test_workers_auto_is_one_per_cpu(tmp_path: Path) -> None:
    path = _write(tmp_path, {"mdmd": {"workers": "auto"}})
    assert load_config(str(path)).workers == min(64, os.cpu_count() or 1)


def test_percent_in_values_is_literal(tmp_path: Path) -> None:
    path = _write(tmp_path, {"management": {"provider_name": "100% managed"}})
    assert load_config(str(path)).management.provider_name == "100% managed"


# --- through twistd: one line on stderr, non-zero exit, no traceback ---


def _assert_one_line_failure(result: object, *needles: str, status: int = 78) -> None:
    import subprocess

    assert isinstance(result, subprocess.CompletedProcess)
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("mdmd: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0]


def test_twistd_unknown_key_exits_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"admin": {"tokn_file": "x"}})
    _assert_one_line_failure(run_twistd(config), str(config), "[admin] tokn_file", "unknown key")


def test_twistd_unknown_section_exits_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"enrolment": {"url": "https://x"}})
    _assert_one_line_failure(run_twistd(config), "[enrolment]", "unknown section")


def test_twistd_missing_required_key_exits_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"management": {"url": None}})
    _assert_one_line_failure(run_twistd(config), "[management] url", "missing")


def test_twistd_bad_value_exits_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"enrollment": {"max_body_bytes": "lots"}})
    _assert_one_line_failure(run_twistd(config), "[enrollment] max_body_bytes")


def test_twistd_renewal_period_not_shorter_than_the_certificate_exits_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"wstep": {"device_cert_days": "40", "renew_period_days": "42"}})
    _assert_one_line_failure(run_twistd(config), "[wstep] renew_period_days", "less than device_cert_days")


def test_twistd_unreadable_config_exits_with_one_line(tmp_path: Path) -> None:
    _assert_one_line_failure(run_twistd(tmp_path / "nope.ini"), "cannot read")


def test_twistd_missing_material_without_bootstrap(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"mdmd": {"bootstrap": "no"}})
    (tmp_path / "state").mkdir()
    _assert_one_line_failure(run_twistd(config), "[enrollment] tls_cert", "No such file", "mdmctl init")


def test_twistd_key_not_matching_certificate(tmp_path: Path) -> None:
    from mdmd import pki

    config = write_config(tmp_path, {"mdmd": {"bootstrap": "no"}})
    state = tmp_path / "state"
    src = tmp_path / "made"
    pki.bootstrap(
        pki.BootstrapPlan(
            identity_cert=str(src / "wstep-identity.pem"),
            identity_key=str(src / "wstep-identity.key"),
            tls_cert=str(src / "tls-server.pem"),
            tls_key=str(src / "tls-server.key"),
            tls_root_cert=str(src / "tls-root.pem"),
            tls_root_key=str(src / "tls-root.key"),
            tls_hosts=["localhost"],
            enroll_secret_file=str(src / "enroll_secret"),
            admin_token_file=str(src / "admin_token"),
        ),
        now=__import__("datetime").datetime.now(__import__("datetime").timezone.utc),
    )
    shutil.copytree(src, state)
    # The identity key replaced by another key: start-up must refuse.
    shutil.copy(state / "tls-root.key", state / "wstep-identity.key")
    _assert_one_line_failure(run_twistd(config), "[wstep] identity_key", "does not match")


def test_twistd_password_file_open_to_others_exits_with_one_line(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {"store": {"backend": "postgresql", "dsn": "dbname=mdmd", "password_file": "db_password"}},
    )
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "db_password").write_text("s3cret\n")
    (tmp_path / "state" / "db_password").chmod(0o644)
    _assert_one_line_failure(run_twistd(config), "[store] password_file", "mode 0600")


def test_twistd_unreachable_database_exits_with_one_line_and_a_status_systemd_retries(tmp_path: Path) -> None:
    # A socket folder with no server in it: connection refused at once.
    config = write_config(
        tmp_path, {"store": {"backend": "postgresql", "dsn": f"host={tmp_path} dbname=mdmd user=mdmd"}}
    )
    result = run_twistd(config)
    # EX_TEMPFAIL: the unit's Restart=on-failure restarts it (it is not
    # among RestartPreventExitStatus), so the daemon comes up once the
    # database does.
    _assert_one_line_failure(result, "[store] dsn", "cannot use the database", str(tmp_path), status=75)
    unit = (Path(__file__).resolve().parents[1] / "systemd" / "mdmd.service").read_text()
    prevented = next(line for line in unit.splitlines() if line.startswith("RestartPreventExitStatus="))
    assert "Restart=on-failure" in unit and "75" not in prevented.split("=", 1)[1].split()
