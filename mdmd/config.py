"""The INI configuration: one file, every key documented in ``etc/mdmd.ini``.

Loading is strict on purpose: an unknown section or key is far more often a
typo than an intention, and a daemon that silently ignores ``enroll_secert_file``
runs with a setting the operator did not choose.  Every problem is reported as
one :class:`ConfigError` naming the file, the section and the key.
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from mdmd.poll import PollSchedule

__all__ = [
    "ActionsConfig",
    "AdminConfig",
    "ConfigError",
    "EnrollmentConfig",
    "ManagementConfig",
    "MdmdConfig",
    "ProfilesConfig",
    "StoreConfig",
    "WstepConfig",
    "load_config",
]

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration problem, rendered as one line for the operator."""

    def __init__(self, path: str, section: str | None, key: str | None, message: str):
        self.path = path
        self.section = section
        self.key = key
        self.message = message
        where = path
        if section is not None:
            where += f": [{section}]"
            if key is not None:
                where += f" {key}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class EnrollmentConfig:
    listen: str
    url: str
    tls_cert: str
    tls_key: str
    enroll_secret_file: str
    windows_mdm: bool
    max_body_bytes: int
    # Connections come from a load balancer that sends the PROXY protocol
    # header (haproxy's send-proxy-v2) with the client's address.
    proxy_protocol: bool = False


@dataclass(frozen=True, slots=True)
class ManagementConfig:
    listen: str
    url: str
    tls_cert: str
    tls_key: str
    max_body_bytes: int
    max_msg_size: int
    provider_id: str
    provider_name: str
    poll: PollSchedule
    #: The latest messages in and out kept per device (0: none).
    message_log: int = 50
    proxy_protocol: bool = False


@dataclass(frozen=True, slots=True)
class WstepConfig:
    identity_cert: str
    identity_key: str
    device_cert_days: int
    # Certificate renewal (MS-MDE2 3.5): the device asks for a new
    # certificate renew_period_days before its certificate ends, and again
    # every renew_retry_days while that fails.
    renew_period_days: int
    renew_retry_days: int
    # How long after its end a certificate may still be renewed (0: never).
    renew_grace_days: int
    # Superseded and renewed certificates are deleted this long after they
    # were revoked.
    keep_revoked_days: int


@dataclass(frozen=True, slots=True)
class ProfilesConfig:
    verify_interval: float  # seconds
    max_retries: int


@dataclass(frozen=True, slots=True)
class StoreConfig:
    backend: str  # "sqlite" | "postgresql"
    # PostgreSQL: a libpq connection string without the password, the file
    # holding the password (None: libpq's own ways, PGPASSFILE and so on),
    # and connections per process.
    dsn: str | None = None
    password_file: str | None = None
    pool_size: int = 4  # DEFAULT_POOL_SIZE


#: [store] pool_size when unset.
DEFAULT_POOL_SIZE = 4


@dataclass(frozen=True, slots=True)
class ActionsConfig:
    """How group operations are fanned out to their members."""

    fanout_batch: int = 200  # devices given their command per transaction
    fanout_pause: float = 0.1  # seconds between two batches
    fanout_lease: float = 30.0  # seconds a process holds an operation without renewing


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: str
    url: str
    token_file: str
    allow_remote: bool = False
    metrics_cache_seconds: int = 10
    #: TLS for the admin listener (the API and the web console): both or
    #: neither, resolved against state_dir.
    tls_cert: str | None = None
    tls_key: str | None = None


@dataclass(frozen=True, slots=True)
class MdmdConfig:
    path: str
    state_dir: str
    bootstrap: bool
    workers: int
    tls_root_cert: str
    tls_root_key: str
    enrollment: EnrollmentConfig
    management: ManagementConfig
    wstep: WstepConfig
    admin: AdminConfig
    profiles: ProfilesConfig = ProfilesConfig(24 * 3600.0, 3)
    store: StoreConfig = StoreConfig("sqlite")
    log_format: str = "text"
    actions: ActionsConfig = ActionsConfig()

    @property
    def database(self) -> str:
        """The SQLite store's file."""
        return os.path.join(self.state_dir, "mdmd.sqlite3")

    @property
    def lock_file(self) -> str:
        """Held (flock) by the running main process: one mdmd per state_dir."""
        return os.path.join(self.state_dir, "mdmd.lock")


# --- value parsers: each raises ValueError with a message for the operator ---


def _boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("yes", "true", "on", "1"):
        return True
    if lowered in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"expected yes or no, got {value!r}")


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value.strip(), 10)
        except ValueError:
            raise ValueError(f"expected a whole number, got {value!r}") from None
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}, got {number}")
        return number

    return parse


def _workers(value: str) -> int:
    if value.strip().lower() == "auto":
        return max(1, min(_MAX_WORKERS, os.cpu_count() or 1))
    return _bounded_int(1, _MAX_WORKERS)(value)


_MAX_WORKERS = 64

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(low: float, high: float) -> Callable[[str], float]:
    """``90s``, ``30m``, ``24h``, ``7d`` (a bare number is seconds)."""

    def parse(value: str) -> float:
        text = value.strip().lower()
        unit = _DURATION_UNITS.get(text[-1:])
        number = text[:-1] if unit is not None else text
        try:
            seconds = float(int(number, 10) * (unit or 1))
        except ValueError:
            raise ValueError(f"expected a duration such as 90s, 30m, 24h or 7d, got {value!r}") from None
        if not low <= seconds <= high:
            raise ValueError(f"must be between {low:g}s and {high:g}s, got {seconds:g}s")
        return seconds

    return parse


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        value = value.strip()
        if value not in allowed:
            raise ValueError(f"expected {' or '.join(allowed)}, got {value!r}")
        return value

    return parse


def _seconds(low: float, high: float) -> Callable[[str], float]:
    """``250ms``, ``1.5s``, ``30s`` (a bare number is seconds)."""

    def parse(value: str) -> float:
        text = value.strip().lower()
        scale, number = (0.001, text[:-2]) if text.endswith("ms") else (1.0, text.removesuffix("s"))
        try:
            seconds = float(number) * scale
        except ValueError:
            raise ValueError(f"expected a time such as 250ms, 1.5s or 30s, got {value!r}") from None
        if not low <= seconds <= high:  # also refuses nan
            raise ValueError(f"must be between {low:g}s and {high:g}s, got {value.strip()}")
        return seconds

    return parse


def _text(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


_ENDPOINT_TYPES = ("tcp:", "tcp6:", "unix:", "systemd:")


def _endpoint(value: str) -> str:
    value = value.strip()
    if not value.startswith(_ENDPOINT_TYPES):
        raise ValueError(
            f"expected a Twisted server endpoint for a plain socket "
            f"({', '.join(t + '...' for t in _ENDPOINT_TYPES)}), got {value!r}; "
            f"mdmd adds TLS itself"
        )
    return value


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _host_problem(host: str) -> str | None:
    """Why *host* (a URL's, without brackets) is neither an IP address nor a
    DNS name, or None."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return f"host {host!r} is neither a DNS name nor an IP address"
    return None


def _url(*schemes: str, path_required: bool = False) -> Callable[[str], str]:
    def parse(value: str) -> str:
        value = value.strip()
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as e:
            raise ValueError(f"not a valid URL: {e}") from None
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"expected a {' or '.join(schemes)}:// URL with a host, got {value!r}")
        problem = _host_problem(parts.hostname)
        if problem is not None or any(ch.isspace() for ch in value):
            raise ValueError(f"not a valid URL: {problem or 'it contains white space'}: {value!r}")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query string or fragment")
        if path_required and parts.path in ("", "/"):
            raise ValueError("must include the path devices post to")
        return value.rstrip("/") if not path_required else value

    return parse


_PROVIDER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _provider_id(value: str) -> str:
    # The provider ID becomes a DMClient node name and part of LocURIs: keep it
    # free of anything that needs URI or XML escaping (MS-MDE2 2.2.9.5).
    value = value.strip()
    if not _PROVIDER_ID.match(value):
        raise ValueError(
            "must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


def _dsn(value: str) -> str:
    """A libpq connection string (key=value or URI), without the password."""
    from psycopg import conninfo

    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    try:
        params = conninfo.conninfo_to_dict(value)
    except Exception as e:  # psycopg.ProgrammingError, with libpq's message
        raise ValueError(f"not a libpq connection string: {' '.join(str(e).split())}") from None
    if "password" in params:
        raise ValueError("must not hold the password: put it in password_file")
    return value


def _poll_schedule(value: str) -> PollSchedule:
    parts = value.replace(",", " ").split()
    numbers: list[int] = []
    for part in parts:
        match = re.fullmatch(r"(\d{1,6})x(\d{1,6})", part)
        if not match:
            raise ValueError(f"{part!r} is not INTERVALxCOUNT (minutes x retries)")
        numbers += [int(match.group(1)), int(match.group(2))]
    if len(numbers) != 6:
        raise ValueError(
            "expected three INTERVALxCOUNT pairs (first, second, remaining), e.g. '15x5 60x10 1440x0'"
        )
    # PollSchedule enforces MS-MDE2 2.2.9.3 (first count not 0, remaining
    # interval 0 or at least a day, not all zero).
    first_i, first_n, second_i, second_n, rest_i, rest_n = numbers
    return PollSchedule(
        first_interval=first_i,
        first_retries=first_n,
        second_interval=second_i,
        second_retries=second_n,
        remaining_interval=rest_i,
        remaining_retries=rest_n,
    )


# --- the schema: section -> key -> (parser, default or REQUIRED) ---

_REQUIRED = object()
_Schema = Mapping[str, Mapping[str, tuple[Callable[[str], object], object]]]

_SCHEMA: _Schema = {
    "mdmd": {
        "state_dir": (_text, _REQUIRED),
        "bootstrap": (_boolean, False),
        "workers": (_workers, 1),
        "tls_root_cert": (_text, "tls-root.pem"),
        "tls_root_key": (_text, "tls-root.key"),
        "log_format": (_choice("text", "json"), "text"),
    },
    "enrollment": {
        "listen": (_endpoint, _REQUIRED),
        "url": (_url("https"), _REQUIRED),
        "tls_cert": (_text, "tls-server.pem"),
        "tls_key": (_text, "tls-server.key"),
        "enroll_secret_file": (_text, "enroll_secret"),
        "windows_mdm": (_boolean, True),
        "max_body_bytes": (_bounded_int(4096, 64 * 1024 * 1024), 1024 * 1024),
        "proxy_protocol": (_boolean, False),
    },
    "management": {
        "listen": (_endpoint, _REQUIRED),
        "url": (_url("https", path_required=True), _REQUIRED),
        "tls_cert": (_text, None),
        "tls_key": (_text, None),
        "max_body_bytes": (_bounded_int(4096, 64 * 1024 * 1024), 4 * 1024 * 1024),
        "max_msg_size": (_bounded_int(4096, 16 * 1024 * 1024), 512 * 1024),
        "provider_id": (_provider_id, "mdmd"),
        "provider_name": (_text, "mdmd"),
        "poll_schedule": (_poll_schedule, PollSchedule()),
        "poll_on_login": (_boolean, True),
        "message_log": (_bounded_int(0, 1000), 50),
        "proxy_protocol": (_boolean, False),
    },
    "wstep": {
        "identity_cert": (_text, "wstep-identity.pem"),
        "identity_key": (_text, "wstep-identity.key"),
        "device_cert_days": (_bounded_int(1, 3650), 365),
        # CertificateStore CSP limits: RenewPeriod and RetryInterval 1-1000.
        "renew_period_days": (_bounded_int(1, 1000), 42),
        "renew_retry_days": (_bounded_int(1, 1000), 7),
        "renew_grace_days": (_bounded_int(0, 1000), 0),
        "keep_revoked_days": (_bounded_int(1, 36500), 90),
    },
    "profiles": {
        "verify_interval": (_duration(60, 365 * 86400), 24 * 3600.0),
        "max_retries": (_bounded_int(0, 100), 3),
    },
    "store": {
        "backend": (_choice("sqlite", "postgresql"), "sqlite"),
        "dsn": (_dsn, None),
        "password_file": (_text, None),
        "pool_size": (_bounded_int(1, 100), None),
    },
    "actions": {
        "fanout_batch": (_bounded_int(1, 10_000), 200),
        "fanout_pause": (_seconds(0.0, 60.0), 0.1),
        "fanout_lease": (_seconds(2.0, 3600.0), 30.0),
    },
    "admin": {
        "listen": (_endpoint, "tcp:8445:interface=127.0.0.1"),
        "url": (_url("http", "https"), None),
        "token_file": (_text, "admin_token"),
        "allow_remote": (_boolean, False),
        "metrics_cache_seconds": (_bounded_int(0, 3600), 10),
        "tls_cert": (_text, None),
        "tls_key": (_text, None),
    },
}


def _admin_url_from_listen(listen: str, *, tls: bool = False) -> str | None:
    """Derive ``http://host:port`` (``https://`` with *tls*) from a ``tcp:``
    endpoint, for mdmctl."""
    fields = listen.split(":")
    if fields[0] not in ("tcp", "tcp6") or len(fields) < 2:
        return None
    port = fields[1].removeprefix("port=")
    host = "127.0.0.1" if fields[0] == "tcp" else "[::1]"
    for field in fields[2:]:
        if field.startswith("interface="):
            interface = field.split("=", 1)[1]
            if interface not in ("", "0.0.0.0", "::"):
                host = f"[{interface}]" if ":" in interface else interface
    return f"{'https' if tls else 'http'}://{host}:{port}"


def load_config(path: str) -> MdmdConfig:
    """Read and validate the INI file at *path*."""
    path = os.path.abspath(path)
    parser = configparser.ConfigParser(interpolation=None, empty_lines_in_values=False)
    # Keys are case-sensitive like the documentation shows them.
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(path, None, None, f"cannot read the configuration: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, None, "the configuration is not UTF-8 text") from None
    except configparser.Error as e:
        first_line = str(e).splitlines()[0]
        raise ConfigError(path, None, None, f"not a valid INI file: {first_line}") from None

    values: dict[str, dict[str, object]] = {}
    for section in parser.sections():
        if section not in _SCHEMA:
            raise ConfigError(path, section, None, f"unknown section (known: {', '.join(_SCHEMA)})")
        for key in parser[section]:
            if key not in _SCHEMA[section]:
                raise ConfigError(path, section, key, f"unknown key (known: {', '.join(_SCHEMA[section])})")
    for section, keys in _SCHEMA.items():
        values[section] = {}
        for key, (parse, default) in keys.items():
            raw = parser.get(section, key, fallback=None)
            if raw is None:
                if default is _REQUIRED:
                    raise ConfigError(path, section, key, "required key is missing")
                values[section][key] = default
                continue
            try:
                values[section][key] = parse(raw)
            except ValueError as e:
                raise ConfigError(path, section, key, str(e)) from None

    base = os.path.dirname(path)
    state_dir = os.path.normpath(os.path.join(base, str(values["mdmd"]["state_dir"])))

    def in_state(section: str, key: str) -> str:
        # Material files resolve against state_dir so that bootstrap can put
        # everything in one place; absolute paths are kept as they are.
        return os.path.normpath(os.path.join(state_dir, str(values[section][key])))

    def typed(kind: type[T], value: object) -> T:
        assert isinstance(value, kind)
        return value

    m = values["management"]
    en = values["enrollment"]
    a = values["admin"]
    if (m["tls_cert"] is None) != (m["tls_key"] is None):
        missing = "tls_key" if m["tls_key"] is None else "tls_cert"
        raise ConfigError(path, "management", missing, "tls_cert and tls_key go together")
    poll = typed(PollSchedule, m["poll_schedule"])
    w = values["wstep"]
    cert_days, renew_days, retry_days = (
        typed(int, w[k]) for k in ("device_cert_days", "renew_period_days", "renew_retry_days")
    )
    if renew_days >= cert_days:
        # A renewal period as long as the certificate would open the renewal
        # window at issuance: every device would renew at once, for ever.
        raise ConfigError(
            path,
            "wstep",
            "renew_period_days",
            f"must be less than device_cert_days ({cert_days}), got {renew_days}",
        )
    if retry_days > renew_days:
        # The CertificateStore CSP refuses RetryInterval > RenewPeriod.
        raise ConfigError(
            path,
            "wstep",
            "renew_retry_days",
            f"must not exceed renew_period_days ({renew_days}), got {retry_days}",
        )
    store = _store_config(path, values["store"], in_state)
    if (a["tls_cert"] is None) != (a["tls_key"] is None):
        missing = "tls_key" if a["tls_key"] is None else "tls_cert"
        raise ConfigError(path, "admin", missing, "tls_cert and tls_key go together")
    admin_tls = a["tls_cert"] is not None
    admin_url = a["url"] if a["url"] is not None else _admin_url_from_listen(str(a["listen"]), tls=admin_tls)
    if admin_url is None:
        raise ConfigError(path, "admin", "url", "required when admin listen is not a tcp: endpoint")

    return MdmdConfig(
        path=path,
        state_dir=state_dir,
        bootstrap=typed(bool, values["mdmd"]["bootstrap"]),
        workers=typed(int, values["mdmd"]["workers"]),
        tls_root_cert=in_state("mdmd", "tls_root_cert"),
        tls_root_key=in_state("mdmd", "tls_root_key"),
        enrollment=EnrollmentConfig(
            listen=typed(str, en["listen"]),
            url=typed(str, en["url"]),
            tls_cert=in_state("enrollment", "tls_cert"),
            tls_key=in_state("enrollment", "tls_key"),
            enroll_secret_file=in_state("enrollment", "enroll_secret_file"),
            windows_mdm=typed(bool, en["windows_mdm"]),
            max_body_bytes=typed(int, en["max_body_bytes"]),
            proxy_protocol=typed(bool, en["proxy_protocol"]),
        ),
        management=ManagementConfig(
            listen=typed(str, m["listen"]),
            url=typed(str, m["url"]),
            tls_cert=in_state("management", "tls_cert")
            if m["tls_cert"]
            else in_state("enrollment", "tls_cert"),
            tls_key=in_state("management", "tls_key") if m["tls_key"] else in_state("enrollment", "tls_key"),
            max_body_bytes=typed(int, m["max_body_bytes"]),
            max_msg_size=typed(int, m["max_msg_size"]),
            provider_id=typed(str, m["provider_id"]),
            provider_name=typed(str, m["provider_name"]),
            poll=dataclasses.replace(poll, poll_on_login=typed(bool, m["poll_on_login"])),
            message_log=typed(int, m["message_log"]),
            proxy_protocol=typed(bool, m["proxy_protocol"]),
        ),
        wstep=WstepConfig(
            identity_cert=in_state("wstep", "identity_cert"),
            identity_key=in_state("wstep", "identity_key"),
            device_cert_days=cert_days,
            renew_period_days=renew_days,
            renew_retry_days=retry_days,
            renew_grace_days=typed(int, w["renew_grace_days"]),
            keep_revoked_days=typed(int, w["keep_revoked_days"]),
        ),
        admin=AdminConfig(
            listen=typed(str, a["listen"]),
            url=typed(str, admin_url),
            token_file=in_state("admin", "token_file"),
            allow_remote=typed(bool, a["allow_remote"]),
            metrics_cache_seconds=typed(int, a["metrics_cache_seconds"]),
            tls_cert=in_state("admin", "tls_cert") if admin_tls else None,
            tls_key=in_state("admin", "tls_key") if admin_tls else None,
        ),
        profiles=ProfilesConfig(
            verify_interval=typed(float, values["profiles"]["verify_interval"]),
            max_retries=typed(int, values["profiles"]["max_retries"]),
        ),
        store=store,
        log_format=typed(str, values["mdmd"]["log_format"]),
        actions=ActionsConfig(
            fanout_batch=typed(int, values["actions"]["fanout_batch"]),
            fanout_pause=typed(float, values["actions"]["fanout_pause"]),
            fanout_lease=typed(float, values["actions"]["fanout_lease"]),
        ),
    )


def _store_config(
    path: str, values: Mapping[str, object], in_state: Callable[[str, str], str]
) -> StoreConfig:
    backend = str(values["backend"])
    if backend == "sqlite":
        for key in ("dsn", "password_file", "pool_size"):
            if values[key] is not None:
                raise ConfigError(path, "store", key, "only for backend = postgresql")
        return StoreConfig("sqlite")
    if values["dsn"] is None:
        raise ConfigError(path, "store", "dsn", "required when backend = postgresql")
    pool_size = values["pool_size"]
    return StoreConfig(
        backend,
        dsn=str(values["dsn"]),
        password_file=in_state("store", "password_file") if values["password_file"] is not None else None,
        pool_size=pool_size if isinstance(pool_size, int) else DEFAULT_POOL_SIZE,
    )


def read_password_file(config: MdmdConfig) -> str | None:
    """The database password from ``[store] password_file`` (None when
    unset); ConfigError naming the key when the file is not right
    (:func:`password_from_file`)."""
    path = config.store.password_file
    if path is None:
        return None
    try:
        return password_from_file(path)
    except ValueError as e:
        raise ConfigError(config.path, "store", "password_file", f"{path}: {e}") from None


def password_from_file(path: str) -> str:
    """A password file's password: the file must be its owner's only
    (0600) and hold the password alone; one trailing newline is not part of
    it.  ValueError saying what is wrong otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ValueError(f"cannot read it: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if mode & 0o077:
            raise ValueError(f"must be readable by its owner only (mode 0600), is {mode & 0o777:04o}")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(65537)
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise ValueError("is empty")
    if len(raw) > 65536 or "\n" in password or "\r" in password or "\0" in password:
        raise ValueError("must hold the password alone, on one line")
    return password
