"""TLS contexts for the enrollment (server-authenticated) and management
(mutually authenticated) listeners.

Both listen on a plain Twisted endpoint (``tcp:...``, ``systemd:...``) wrapped
here in TLS, because an ``ssl:`` endpoint string cannot require client
certificates (its ``caCertsDir`` only configures a client's trust).  The
options sit in a :class:`ReloadableTLS`, so that ``systemctl reload``
(SIGHUP) swaps in a renewed certificate for new connections while
established ones carry on with theirs.

A handshake the management listener refuses (no certificate, one from
another issuer, an expired one) would otherwise leave no trace: the TLS
layer here records the certificate OpenSSL verified (a per-connection verify
callback) and reports the refusal to a :class:`~mdmd.refusals.RefusalLog`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    TLSVersion,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.http import Request
from zope.interface import implementer

from mdmd import pki
from mdmd.refusals import CertificateSummary, RefusalLog

__all__ = [
    "PeerIdentity",
    "ReloadableTLS",
    "TLSServerEndpoint",
    "handshake_refusal_reason",
    "mutual_tls_options",
    "peer_certificate",
    "peer_identity",
    "server_tls_options",
    "tls_server_factory",
]

# ECDHE only (forward secrecy) with AEAD ciphers; TLS 1.3 suites are
# configured by OpenSSL separately and are all acceptable.  Windows 10 and
# later negotiate ECDHE-RSA-AES-GCM.
_CIPHERS = AcceptableCiphers.fromOpenSSLCipherString("ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!SHA1")


def server_tls_options(chain: Sequence[x509.Certificate], key: PrivateKeyTypes) -> CertificateOptions:
    """Options for a listener that authenticates itself only."""
    return CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]  # pyOpenSSL takes cryptography keys
        certificate=chain[0],  # type: ignore[arg-type]
        extraCertChain=[X509.from_cryptography(c) for c in chain[1:]],
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=_CIPHERS,
    )


def mutual_tls_options(
    chain: Sequence[x509.Certificate],
    key: PrivateKeyTypes,
    client_cas: Sequence[x509.Certificate],
) -> CertificateOptions:
    """Options for a listener that requires a client certificate issued by one
    of *client_cas*: a client without one, or with one from another CA, fails
    the handshake (with TLS 1.3: its first read)."""
    return CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=chain[0],  # type: ignore[arg-type]
        extraCertChain=[X509.from_cryptography(c) for c in chain[1:]],
        trustRoot=trustRootFromCertificates([Certificate(X509.from_cryptography(ca)) for ca in client_cas]),
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=_CIPHERS,
        # Session tickets would let a resumed session skip any per-handshake
        # check; Twisted's default (off) is kept deliberately.
        enableSessionTickets=False,
    )


def peer_certificate(request: Request) -> x509.Certificate | None:
    """The client certificate OpenSSL verified for this connection, if any."""
    peer = peer_identity(request)
    return None if peer is None else peer.certificate


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """A connection's verified client certificate with the serial and
    thumbprint mdmd looks it up by."""

    certificate: x509.Certificate
    serial: str
    thumbprint: str


def peer_identity(request: Request) -> PeerIdentity | None:
    """The client certificate OpenSSL verified for this connection, if any,
    worked out once per connection: a kept-alive connection's later
    messages reuse it.  The connection cannot change its certificate
    afterwards (renegotiation is refused: :class:`ReloadableTLS`)."""
    transport = request.channel.transport if request.channel is not None else None
    known: PeerIdentity | None = getattr(transport, "_mdmd_peer_identity", None)
    if known is not None:
        return known
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    cert = get()
    if cert is None:
        return None
    certificate = cert.to_cryptography()
    peer = PeerIdentity(certificate, pki.serial_hex(certificate), pki.thumbprint(certificate))
    transport._mdmd_peer_identity = peer  # type: ignore[union-attr]
    return peer


def _no_renegotiation(options: CertificateOptions) -> CertificateOptions:
    # A TLS 1.2 renegotiation could change a connection's client
    # certificate after a request was judged by the first one; no Windows
    # client renegotiates (TLS 1.3 has no renegotiation at all).  OpenSSL 3
    # refuses a client's renegotiation by default; this says so whatever
    # OpenSSL the wheel was built with.
    options.getContext().set_options(SSL.OP_NO_RENEGOTIATION)
    return options


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTLS:
    """Server TLS options that can be replaced while the listener serves:
    each new connection takes the options current when it arrives."""

    def __init__(self, options: CertificateOptions) -> None:
        self.options = _no_renegotiation(options)

    def replace(self, options: CertificateOptions) -> None:
        # A certificate OpenSSL refuses fails here, not in a handshake.
        self.options = _no_renegotiation(options)

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return self.options.serverConnectionForTLS(tlsProtocol)


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """An ``IStreamServerEndpoint`` that speaks TLS over another endpoint."""

    def __init__(
        self,
        wrapped: IStreamServerEndpoint,
        options: CertificateOptions | ReloadableTLS,
        refusals: RefusalLog | None = None,
    ) -> None:
        self._wrapped = wrapped
        self._options = options
        self._refusals = refusals

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._wrapped.listen(tls_server_factory(self._options, factory, self._refusals))


def tls_server_factory(
    options: CertificateOptions | ReloadableTLS, factory: IProtocolFactory, refusals: RefusalLog | None = None
) -> TLSMemoryBIOFactory:
    """*factory* behind TLS with *options*, server side; handshakes the
    server refuses are reported to *refusals* when given."""
    tls: TLSMemoryBIOFactory = (
        TLSMemoryBIOFactory(options, False, factory)
        if refusals is None
        else _ReportingTLSFactory(options, factory, refusals)
    )
    tls.noisy = False  # mdmd logs its own line per listener
    return tls


# X509_V_ERR_* codes (OpenSSL's x509_vfy.h) that name why a client
# certificate was refused, in the words of the log line.
_UNKNOWN_ISSUER = "unknown issuer"
_VERIFY_REASONS = {
    2: _UNKNOWN_ISSUER,  # unable to get issuer certificate
    7: _UNKNOWN_ISSUER + " (signature does not verify with the identity CA)",
    9: "not yet valid",
    10: "expired",
    18: _UNKNOWN_ISSUER + " (self-signed)",
    19: _UNKNOWN_ISSUER + " (self-signed CA in chain)",
    20: _UNKNOWN_ISSUER,  # unable to get local issuer certificate
    21: _UNKNOWN_ISSUER,  # unable to verify the first certificate
    24: "invalid CA certificate in chain",
    26: "not a client certificate (purpose)",
}


def handshake_refusal_reason(error: BaseException, verify_errno: int | None, presented: bool) -> str:
    """Why a server-side handshake failed, in the log's words."""
    if verify_errno:
        return _VERIFY_REASONS.get(verify_errno, f"certificate refused (X509 verify error {verify_errno})")
    if not presented:
        # OpenSSL: "peer did not return a certificate" (TLS 1.2),
        # "certificate required" (TLS 1.3), or the client gave up first.
        text = str(error).lower()
        if "certificate" in text:
            return "no certificate"
    # pyOpenSSL: args[0] is OpenSSL's error queue, (library, function, reason) each.
    queue = error.args[0] if error.args and isinstance(error.args[0], list) else []
    details = ", ".join(str(entry[-1]) for entry in queue if isinstance(entry, tuple) and entry and entry[-1])
    return f"TLS error: {details or type(error).__name__}"


class _ReportingTLSProtocol(TLSMemoryBIOProtocol):
    """Server-side TLS that reports a refused handshake, once, with what
    OpenSSL saw of the client's certificate."""

    factory: _ReportingTLSFactory
    _leaf: X509 | None = None
    _verify_errno: int | None = None
    _reported = False

    def _verify(self, connection: SSL.Connection, cert: X509, errno: int, depth: int, ok: int) -> bool:
        # Called by OpenSSL for each certificate of the client's chain;
        # depth 0 is the client's own.  Its verdict is kept, not changed;
        # the certificate is read only if the handshake is refused.
        if depth == 0:
            self._leaf = cert
        if not ok and self._verify_errno is None:
            self._verify_errno = errno
        return bool(ok)

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        if (
            not self._handshakeDone
            and not self._reported
            and reason is not None
            and isinstance(reason.value, SSL.Error)
        ):
            self._reported = True
            peer = self.transport.getPeer() if self.transport is not None else None
            leaf: x509.Certificate | None = None
            if self._leaf is not None:
                try:
                    leaf = self._leaf.to_cryptography()
                except ValueError:
                    leaf = None
            self.factory.refusals.refused(
                str(getattr(peer, "host", peer)),
                "TLS handshake",
                handshake_refusal_reason(reason.value, self._verify_errno, self._leaf is not None),
                None if leaf is None else CertificateSummary.of(leaf),
            )
        super()._tlsShutdownFinished(reason)


class _ReportingTLSFactory(TLSMemoryBIOFactory):
    protocol = _ReportingTLSProtocol

    def __init__(
        self, options: CertificateOptions | ReloadableTLS, factory: IProtocolFactory, refusals: RefusalLog
    ) -> None:
        super().__init__(options, False, factory)
        self.refusals = refusals
        create = self._creatorCallable

        def connection_for(protocol: Any) -> SSL.Connection:
            connection: SSL.Connection = create(protocol)
            # The context's own verification (whichever options are current:
            # they can be reloaded), with a callback that lets this
            # connection see what was verified.
            connection.set_verify(connection.get_context().get_verify_mode(), protocol._verify)
            return connection

        self._creatorCallable = connection_for
