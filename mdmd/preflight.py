"""Start-up checks, run before the daemon serves and by
``twistd mdmd --config FILE --check`` (or ``mdmctl check-config``).

Each refusal is one :class:`~mdmd.config.ConfigError` naming the file, the
section and the key:

- a public URL whose host the listener's TLS certificate does not cover;
- a private key (or secret) readable by group or others;
- an admin listener that is not on loopback or a unix socket (the admin API
  is plain HTTP) unless ``[admin] allow_remote = yes``, which makes it a
  warning;
- a ``state_dir`` another mdmd process holds (``state_dir/mdmd.lock``, held
  with flock(2) by the running main process);
- for ``--check``, a database mdmd cannot use and a listener that cannot
  bind (at start-up the listeners say so themselves, see
  :class:`~mdmd.listeners.ListenerService`).

Configuration syntax (a URL that does not parse, an unknown key) is
:func:`mdmd.config.load_config`'s; bad key material is
:func:`mdmd.material.load_material`'s.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import socket
import sqlite3
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from cryptography import x509
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address

from mdmd.config import ConfigError, MdmdConfig
from mdmd.material import TLSMaterial

__all__ = [
    "EX_CANTLISTEN",
    "EX_CONFIG",
    "EX_TEMPFAIL",
    "StateLock",
    "admin_listener_warning",
    "check_certificates_cover_urls",
    "check_database",
    "check_listeners_bind",
    "check_private_files",
    "listen_address",
]

#: sysexits(3) EX_CONFIG: a bad configuration; systemd does not restart on it.
EX_CONFIG: Final = 78
#: sysexits(3) EX_UNAVAILABLE, for a listener that cannot listen (the port
#: is taken): restarting every few seconds would not free it.
EX_CANTLISTEN: Final = 69
#: sysexits(3) EX_TEMPFAIL, for a PostgreSQL database that does not answer
#: at start-up: systemd restarts the daemon (Restart=on-failure) until it
#: does.
EX_TEMPFAIL: Final = 75


# --------------------------------------------------------------------------
# TLS certificates and the URLs they serve
# --------------------------------------------------------------------------


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        *san.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
    ]


def _covers(cert: x509.Certificate, host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        is_ip = True
    except ValueError:
        is_ip = False
    try:
        if is_ip:
            verify_certificate_ip_address(cert, host)
        else:
            verify_certificate_hostname(cert, host)
    except (VerificationError, CertificateError):
        return False
    return True


def check_certificates_cover_urls(config: MdmdConfig, tls: TLSMaterial) -> None:
    """Each listener's certificate names its public URL's host (RFC 6125,
    as Windows checks it)."""
    for section, url, chain, path in (
        ("enrollment", config.enrollment.url, tls.enrollment_chain, config.enrollment.tls_cert),
        ("management", config.management.url, tls.management_chain, config.management.tls_cert),
    ):
        host = urlsplit(url).hostname or ""
        if not _covers(chain[0], host):
            names = ", ".join(_names(chain[0])) or "no subjectAltName"
            raise ConfigError(
                config.path,
                section,
                "url",
                f"host {host} is not covered by the TLS certificate {path} (it names {names}): "
                f"devices would refuse it",
            )


# --------------------------------------------------------------------------
# Private files
# --------------------------------------------------------------------------


def _private_files(config: MdmdConfig) -> list[tuple[str, str, str]]:
    """(section, key, path) of every file that must be private to mdmd."""
    return [
        ("enrollment", "tls_key", config.enrollment.tls_key),
        ("management", "tls_key", config.management.tls_key),
        ("wstep", "identity_key", config.wstep.identity_key),
        ("mdmd", "tls_root_key", config.tls_root_key),
        ("enrollment", "enroll_secret_file", config.enrollment.enroll_secret_file),
        ("admin", "token_file", config.admin.token_file),
        *([("admin", "tls_key", config.admin.tls_key)] if config.admin.tls_key else []),
    ]


def check_private_files(config: MdmdConfig) -> None:
    """No private key or secret that exists is readable by group or others."""
    for section, key, path in _private_files(config):
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            continue  # required ones are reported missing by load_material
        except OSError as e:
            raise ConfigError(config.path, section, key, f"{path}: {e.strerror}") from None
        if mode & 0o077:
            raise ConfigError(
                config.path,
                section,
                key,
                f"{path} is readable by group or others (mode {mode:04o}): chmod 600 {path}",
            )


# --------------------------------------------------------------------------
# The admin listener
# --------------------------------------------------------------------------


def _fields(endpoint: str) -> list[str]:
    """A Twisted endpoint string's colon-separated fields (``\\:`` escapes)."""
    fields, current, escaped = [], "", False
    for ch in endpoint:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            fields.append(current)
            current = ""
        else:
            current += ch
    return [*fields, current]


def _passed_socket(fields: Sequence[str]) -> socket.socket | None:
    """The socket systemd passed for a ``systemd:`` endpoint (a duplicate),
    when this process was given it (sd_listen_fds(3))."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    options = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    if "index" in options and options["index"].isdigit():
        index = int(options["index"])
    elif options.get("name") in names:
        index = names.index(options["name"])
    else:
        return None
    if not 0 <= index < count:
        return None
    with contextlib.suppress(OSError):
        return socket.socket(fileno=os.dup(3 + index))
    return None


def listen_address(endpoint: str) -> str | None:
    """The IP address an endpoint listens on ("0.0.0.0" for every
    interface), "unix" for a unix socket, None when it cannot be told."""
    fields = _fields(endpoint)
    kind = fields[0]
    if kind in ("tcp", "tcp6"):
        options = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
        return options.get("interface") or ("0.0.0.0" if kind == "tcp" else "::")
    if kind == "unix":
        return "unix"
    if kind == "systemd":
        sock = _passed_socket(fields)
        if sock is None:
            return None
        with sock:
            if sock.family == socket.AF_UNIX:
                return "unix"
            return str(sock.getsockname()[0])
    return None


def _local(address: str) -> bool:
    if address == "unix":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def admin_listener_warning(config: MdmdConfig) -> str | None:
    """Refuse a remote admin listener (plain HTTP, bearer tokens in the
    clear) unless ``[admin] allow_remote``; then return a warning."""
    address = listen_address(config.admin.listen)
    if address is None or _local(address) or config.admin.tls_cert is not None:
        # With [admin] tls_cert the API and the console are served over TLS.
        return None
    where = "every interface" if address in ("0.0.0.0", "::") else address
    if not config.admin.allow_remote:
        raise ConfigError(
            config.path,
            "admin",
            "listen",
            f"the admin API (plain HTTP, bearer tokens) would listen on {where}: keep it on loopback or a "
            f"unix socket (behind a TLS proxy for remote use), or set [admin] allow_remote = yes",
        )
    return (
        f"{config.path}: [admin] listen: the admin API listens on {where} over plain HTTP "
        f"(allow_remote = yes): put TLS in front of it"
    )


# --------------------------------------------------------------------------
# One mdmd per state_dir
# --------------------------------------------------------------------------


@dataclass
class StateLock:
    """flock(2) on ``state_dir/mdmd.lock``, held while the main process runs."""

    path: str
    fd: int

    @classmethod
    def acquire(cls, config: MdmdConfig) -> StateLock:
        path = config.lock_file
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise ConfigError(config.path, "mdmd", "state_dir", f"{path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise ConfigError(config.path, "mdmd", "state_dir", f"{path}: {e.strerror}") from None
            raise ConfigError(
                config.path,
                "mdmd",
                "state_dir",
                f"{config.state_dir} is in use by another mdmd process (pid {holder}): "
                f"stop it, or give this one a state_dir of its own",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor drops the lock
            self.fd = -1


# --------------------------------------------------------------------------
# For --check only: what start-up would find when it goes further
# --------------------------------------------------------------------------


def check_database(config: MdmdConfig) -> str | None:
    """The database is one this mdmd can open (read only: nothing is
    migrated); a note when start-up would migrate it."""
    if config.store.backend == "postgresql":
        return _check_postgresql(config)
    from mdmd.store.sqlite_schema import SCHEMA_VERSION

    path = config.database
    if not os.path.exists(path):
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise ConfigError(config.path, "mdmd", "state_dir", f"{path}: {e}") from None
    if result != "ok":
        raise ConfigError(config.path, "mdmd", "state_dir", f"{path}: integrity check failed: {result}")
    if version > SCHEMA_VERSION:
        raise ConfigError(
            config.path,
            "mdmd",
            "state_dir",
            f"{path} has schema version {version}, newer than this mdmd understands ({SCHEMA_VERSION})",
        )
    if version < SCHEMA_VERSION:
        return (
            f"the database will be migrated from schema version {version} to {SCHEMA_VERSION}, after a backup"
        )
    return None


def _check_postgresql(config: MdmdConfig) -> str | None:
    """The PostgreSQL database answers, with our credentials, and has a
    schema version this mdmd understands (read only)."""
    from mdmd.config import read_password_file
    from mdmd.store.postgresql import connect, schema_version
    from mdmd.store.postgresql_schema import SCHEMA_VERSION
    from mdmd.store.records import StoreUnavailable

    assert config.store.dsn is not None
    try:
        conn = connect(config.store.dsn, read_password_file(config))
    except StoreUnavailable as e:
        raise ConfigError(config.path, "store", "dsn", f"cannot use the database: {e}") from None
    try:
        version = schema_version(conn)
    finally:
        conn.close()
    if version > SCHEMA_VERSION:
        raise ConfigError(
            config.path,
            "store",
            "dsn",
            f"the database has schema version {version}, newer than this mdmd understands ({SCHEMA_VERSION})",
        )
    if version < SCHEMA_VERSION:
        return f"the database will be migrated from schema version {version} to {SCHEMA_VERSION}"
    return None


def check_listeners_bind(config: MdmdConfig) -> None:
    """Each ``tcp:``/``tcp6:`` listener's address can be bound now."""
    for section, endpoint in (
        ("enrollment", config.enrollment.listen),
        ("management", config.management.listen),
        ("admin", config.admin.listen),
    ):
        fields = _fields(endpoint)
        if fields[0] not in ("tcp", "tcp6") or len(fields) < 2:
            continue
        port_text = fields[1].removeprefix("port=")
        address = listen_address(endpoint) or ""
        family = socket.AF_INET6 if fields[0] == "tcp6" else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((address, int(port_text)))
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(
                config.path, section, "listen", f"cannot listen on {endpoint}: {reason}"
            ) from None


# --------------------------------------------------------------------------
# All of it
# --------------------------------------------------------------------------


def start_up_checks(config: MdmdConfig, tls: TLSMaterial) -> list[str]:
    """What start-up checks once key material is loaded (and bootstrapped):
    raises the first refusal, returns warnings."""
    check_private_files(config)
    check_certificates_cover_urls(config, tls)
    warning = admin_listener_warning(config)
    return [warning] if warning is not None else []


def _material_files(config: MdmdConfig) -> list[str]:
    return [
        config.wstep.identity_cert,
        config.wstep.identity_key,
        config.enrollment.tls_cert,
        config.enrollment.tls_key,
        config.management.tls_cert,
        config.management.tls_key,
        config.enrollment.enroll_secret_file,
        config.admin.token_file,
        *(
            [config.admin.tls_cert, config.admin.tls_key]
            if config.admin.tls_cert and config.admin.tls_key
            else []
        ),
    ]


def run_check(config: MdmdConfig) -> tuple[int, str]:
    """Every start-up check without starting (nothing is created, migrated
    or kept): the exit status (0 or :data:`EX_CONFIG`) and one line."""
    from mdmd import __version__
    from mdmd.material import load_material

    notes: list[str] = []
    try:
        missing = [path for path in _material_files(config) if not os.path.exists(path)]
        if missing and config.bootstrap:
            notes.append(f"bootstrap = yes will create {len(missing)} missing key material file(s)")
            check_private_files(config)
            warning = admin_listener_warning(config)
            notes += [warning] if warning else []
        else:
            material = load_material(config)
            tls = TLSMaterial(
                material.enrollment_chain,
                material.enrollment_key,
                material.management_chain,
                material.management_key,
            )
            notes += start_up_checks(config, tls)
        if os.path.isdir(config.state_dir):
            StateLock.acquire(config).release()
            note = check_database(config)
            notes += [note] if note else []
        check_listeners_bind(config)
    except ConfigError as e:
        return EX_CONFIG, f"mdmd: {e}"
    line = f"mdmd {__version__}: {config.path}: OK"
    if notes:
        line += " (" + "; ".join(notes) + ")"
    return 0, line
