"""A throwaway PostgreSQL cluster for the tests and the benchmark.

``initdb`` in a temporary folder, ``postgres`` listening on a unix socket
in that folder only (no TCP port, so nothing can race for one), stopped and
removed when the test session ends.  PostgreSQL refuses to run as root: as
root, the cluster runs as the ``postgres`` user that Debian's package
creates (``nobody`` if there is none), through ``runuser``.

The server binaries are found on PATH or in Debian's
``/usr/lib/postgresql/VERSION/bin``.  Without them the PostgreSQL tests are
skipped, unless ``MDMD_REQUIRE_POSTGRESQL=1`` (set by ``.ci/run``), which
makes a missing PostgreSQL a failure: CI never passes by skipping them.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Cluster", "find_bindir", "required", "shared_cluster"]

#: The superuser the tests connect as (initdb --username).
SUPERUSER = "postgres"
#: A role that must log in with a password (scram-sha-256), for the
#: password_file tests.
PASSWORD_ROLE = "mdmd_pw"
REQUIRE_VARIABLE = "MDMD_REQUIRE_POSTGRESQL"


def required() -> bool:
    return os.environ.get(REQUIRE_VARIABLE, "") not in ("", "0")


def find_bindir() -> Path | None:
    """The folder of initdb, pg_ctl and postgres, or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = []
    for candidate in Path("/usr/lib/postgresql").glob("*/bin/initdb"):
        match = re.fullmatch(r"\d+", candidate.parent.parent.name)
        if match:
            versions.append((int(candidate.parent.parent.name), candidate.parent))
    return max(versions)[1] if versions else None


def _run_as() -> list[str]:
    """The command prefix that runs the server as an unprivileged user."""
    if os.geteuid() != 0:
        return []
    for user in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            return ["runuser", "-u", user, "--"]
    raise RuntimeError("running as root and there is neither a postgres nor a nobody user")


@dataclass
class Cluster:
    """One running cluster: data in *directory*/data, socket in *directory*."""

    bindir: Path
    directory: Path
    prefix: list[str] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _count: int = 0
    _admin: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, bindir: Path, *, settings: dict[str, str] | None = None) -> Cluster:
        directory = Path(tempfile.mkdtemp(prefix="mdmd-pg-"))
        prefix = _run_as()
        if prefix:
            user = prefix[2]
            entry = pwd.getpwnam(user)
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        # Others may enter (root connects through the socket); nobody else
        # may list or read it.
        directory.chmod(0o711)
        cluster = cls(bindir, directory, prefix)
        data = directory / "data"
        subprocess.run(
            [*prefix, str(bindir / "initdb"), "-D", str(data), "--username", SUPERUSER, "--auth", "trust",
             "--encoding", "UTF8", "--locale", "C", "--no-sync"],
            check=True, capture_output=True,
        )  # fmt: skip
        conf = {
            "listen_addresses": "''",
            "unix_socket_directories": f"'{directory}'",
            "unix_socket_permissions": "0777",
            "max_connections": "200",
            "shared_buffers": "64MB",
            # A throwaway cluster: losing it to a power cut loses nothing.
            # Commits still wait for their WAL write (synchronous_commit on),
            # so what mdmd acknowledges is committed as in production.
            "fsync": "off",
            "full_page_writes": "off",
            "log_min_messages": "warning",
            **(settings or {}),
        }
        hba = f"local all {PASSWORD_ROLE} scram-sha-256\nlocal all all trust\n"
        as_owner = [*prefix, "sh", "-c"]
        subprocess.run(
            [*as_owner, 'cat >> "$0/postgresql.conf" && printf "%s" "$1" > "$0/pg_hba.conf"', str(data),
             hba],
            input="".join(f"{k} = {v}\n" for k, v in conf.items()).encode(),
            check=True,
        )  # fmt: skip
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(directory / "server.log"),
             "-w", "-t", "60", "start"],
            check=True, capture_output=True,
        )  # fmt: skip
        cluster.sql(f"CREATE ROLE {PASSWORD_ROLE} LOGIN SUPERUSER PASSWORD 'correct horse'")
        cluster.sql("CREATE DATABASE mdmd_tests")
        return cluster

    def pause(self) -> None:
        """Stop the server (fast: its clients are disconnected), keeping the data."""
        for conn in self._admin.values():
            conn.close()
        self._admin.clear()
        subprocess.run(
            [*self.prefix, str(self.bindir / "pg_ctl"), "-D", str(self.directory / "data"), "-m", "fast",
             "-w", "stop"],
            check=True, capture_output=True,
        )  # fmt: skip

    def resume(self) -> None:
        subprocess.run(
            [*self.prefix, str(self.bindir / "pg_ctl"), "-D", str(self.directory / "data"), "-l",
             str(self.directory / "server.log"), "-w", "-t", "60", "start"],
            check=True, capture_output=True,
        )  # fmt: skip

    def stop(self) -> None:
        for conn in self._admin.values():
            conn.close()
        self._admin.clear()
        data = self.directory / "data"
        if data.exists():
            subprocess.run(
                [*self.prefix, str(self.bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
            )
        shutil.rmtree(self.directory, ignore_errors=True)

    def dsn(self, dbname: str = "postgres", *, user: str = SUPERUSER) -> str:
        return f"host={self.directory} dbname={dbname} user={user}"

    def sql(self, sql: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run *sql* as the superuser (autocommit); the rows it returned."""
        import psycopg

        with self._lock:
            conn = self._admin.get(dbname)
            if conn is None or conn.closed:
                conn = self._admin[dbname] = psycopg.connect(self.dsn(dbname), autocommit=True)
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description else []

    def new_name(self, prefix: str) -> str:
        with self._lock:
            self._count += 1
            return f"{prefix}{os.getpid()}_{self._count}"

    def create_database(self, prefix: str = "mdmd_") -> str:
        """A new, empty database; its name."""
        name = self.new_name(prefix)
        self.sql(f"CREATE DATABASE {name}")
        return name


_SHARED: Cluster | None = None
_SHARED_LOCK = threading.Lock()


def shared_cluster() -> Cluster | None:
    """The session's cluster, started on first use (None when PostgreSQL is
    not installed and not required); stopped when the process ends."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            bindir = find_bindir()
            if bindir is None:
                if required():
                    raise RuntimeError(
                        f"{REQUIRE_VARIABLE} is set but no PostgreSQL server binaries (initdb, pg_ctl) "
                        "were found; install Debian's postgresql package"
                    )
                return None
            _SHARED = Cluster.start(bindir)
            atexit.register(_SHARED.stop)
        return _SHARED


def cluster_or_skip() -> Cluster:
    """The session's cluster; the calling test is skipped when PostgreSQL
    is not installed, and fails (:func:`shared_cluster` raises) when it is
    required, as in CI."""
    import pytest

    cluster = shared_cluster()
    if cluster is None:
        pytest.skip(f"PostgreSQL is not installed (set {REQUIRE_VARIABLE}=1 to fail instead)")
    return cluster
