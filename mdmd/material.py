"""Certificates, keys and secrets: created on first start when
``bootstrap`` is on, then loaded and cross-checked once, before the reactor
runs.  A problem stops start-up with a :class:`~mdmd.config.ConfigError`
naming the file, section and key."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from twisted.logger import Logger

from mdmd import pki
from mdmd.config import ConfigError, MdmdConfig

__all__ = ["Material", "TLSMaterial", "bootstrap_plan", "load_material", "load_tls", "prepare"]

log = Logger(namespace=__name__)


@dataclass(frozen=True, slots=True)
class Material:
    """Certificates, keys and secrets, loaded once at start-up."""

    enrollment_chain: Sequence[x509.Certificate]
    enrollment_key: PrivateKeyTypes
    management_chain: Sequence[x509.Certificate]
    management_key: PrivateKeyTypes
    identity_cert: x509.Certificate
    identity_key: rsa.RSAPrivateKey
    enroll_secret: str
    admin_token: str


@dataclass(frozen=True, slots=True)
class TLSMaterial:
    """The listeners' server certificates and keys (reloaded on SIGHUP)."""

    enrollment_chain: Sequence[x509.Certificate]
    enrollment_key: PrivateKeyTypes
    management_chain: Sequence[x509.Certificate]
    management_key: PrivateKeyTypes


def bootstrap_plan(config: MdmdConfig) -> pki.BootstrapPlan:
    hosts: list[str] = []
    for url in (config.enrollment.url, config.management.url):
        host = urlsplit(url).hostname
        if host and host not in hosts:
            hosts.append(host)
    own_tls = config.management.tls_cert == config.enrollment.tls_cert
    return pki.BootstrapPlan(
        identity_cert=config.wstep.identity_cert,
        identity_key=config.wstep.identity_key,
        tls_cert=config.enrollment.tls_cert,
        tls_key=config.enrollment.tls_key,
        tls_root_cert=config.tls_root_cert,
        tls_root_key=config.tls_root_key,
        tls_hosts=hosts if own_tls else hosts[:1],
        enroll_secret_file=config.enrollment.enroll_secret_file,
        admin_token_file=config.admin.token_file,
    )


def _read(path: str, section: str, key: str, config: MdmdConfig) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        hint = "" if config.bootstrap else " (set [mdmd] bootstrap = yes, or run mdmctl init)"
        raise ConfigError(config.path, section, key, f"{path}: {e.strerror}{hint}") from None


def _chain(config: MdmdConfig, section: str, key: str, path: str) -> list[x509.Certificate]:
    try:
        return pki.load_pem_certificates(_read(path, section, key, config), path)
    except ValueError as e:
        raise ConfigError(config.path, section, key, str(e)) from None


def _key(config: MdmdConfig, section: str, key: str, path: str, cert: x509.Certificate) -> PrivateKeyTypes:
    try:
        private = pki.load_pem_private_key(_read(path, section, key, config), path)
    except ValueError as e:
        raise ConfigError(config.path, section, key, str(e)) from None
    if not pki.key_matches_certificate(private, cert):
        raise ConfigError(config.path, section, key, f"{path}: key does not match its certificate")
    return private


def _secret(config: MdmdConfig, section: str, key: str, path: str) -> str:
    raw = _read(path, section, key, config)
    try:
        value = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(config.path, section, key, f"{path}: not UTF-8 text") from None
    if len(value) < 16:
        raise ConfigError(config.path, section, key, f"{path}: secret is shorter than 16 characters")
    return value


def load_tls(config: MdmdConfig) -> TLSMaterial:
    """The listeners' certificate chains and keys, each key matching its certificate."""
    e, m = config.enrollment, config.management
    enrollment_chain = _chain(config, "enrollment", "tls_cert", e.tls_cert)
    enrollment_key = _key(config, "enrollment", "tls_key", e.tls_key, enrollment_chain[0])
    if (m.tls_cert, m.tls_key) == (e.tls_cert, e.tls_key):
        management_chain, management_key = enrollment_chain, enrollment_key
    else:
        management_chain = _chain(config, "management", "tls_cert", m.tls_cert)
        management_key = _key(config, "management", "tls_key", m.tls_key, management_chain[0])
    return TLSMaterial(enrollment_chain, enrollment_key, management_chain, management_key)


def load_material(config: MdmdConfig) -> Material:
    """Load and cross-check every file the daemon needs; ConfigError on the first problem."""
    e, w = config.enrollment, config.wstep
    tls = load_tls(config)
    identity = _chain(config, "wstep", "identity_cert", w.identity_cert)
    if len(identity) != 1:
        raise ConfigError(
            config.path, "wstep", "identity_cert", f"{w.identity_cert}: expected exactly one certificate"
        )
    identity_key = _key(config, "wstep", "identity_key", w.identity_key, identity[0])
    if not isinstance(identity_key, rsa.RSAPrivateKey) or identity_key.key_size < 2048:
        raise ConfigError(
            config.path, "wstep", "identity_key", f"{w.identity_key}: must be an RSA key of 2048 bits or more"
        )
    try:
        constraints = identity[0].extensions.get_extension_for_class(x509.BasicConstraints).value
        ca = constraints.ca
    except x509.ExtensionNotFound:
        ca = False
    if not ca:
        raise ConfigError(
            config.path,
            "wstep",
            "identity_cert",
            f"{w.identity_cert}: not a CA certificate (CA:true required)",
        )
    return Material(
        enrollment_chain=tls.enrollment_chain,
        enrollment_key=tls.enrollment_key,
        management_chain=tls.management_chain,
        management_key=tls.management_key,
        identity_cert=identity[0],
        identity_key=identity_key,
        enroll_secret=_secret(config, "enrollment", "enroll_secret_file", e.enroll_secret_file),
        admin_token=_secret(config, "admin", "token_file", config.admin.token_file),
    )


def prepare(config: MdmdConfig) -> Material:
    """Bootstrap missing material if configured, then load it (before the reactor runs)."""
    if config.bootstrap:
        try:
            os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
            created = pki.bootstrap(bootstrap_plan(config), now=datetime.now(UTC))
        except (OSError, pki.BootstrapError) as e:
            raise ConfigError(config.path, "mdmd", "bootstrap", str(e)) from None
        for path in created:
            log.info("bootstrap created {path}", path=path)
    return load_material(config)
