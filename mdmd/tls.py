"""TLS contexts for the enrollment (server-authenticated) and management
(mutually authenticated) listeners.

Both listen on a plain Twisted endpoint (``tcp:...``, ``systemd:...``) wrapped
here in TLS, because an ``ssl:`` endpoint string cannot require client
certificates (its ``caCertsDir`` only configures a client's trust).  The
options sit in a :class:`ReloadableTLS`, so that ``systemctl reload``
(SIGHUP) swaps in a renewed certificate for new connections while
established ones carry on with theirs.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL.crypto import X509
from OpenSSL.SSL import Connection
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
from twisted.web.http import Request
from zope.interface import implementer

__all__ = [
    "ReloadableTLS",
    "TLSServerEndpoint",
    "mutual_tls_options",
    "peer_certificate",
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
    transport = request.channel.transport if request.channel is not None else None
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    cert = get()
    if cert is None:
        return None
    return cert.to_cryptography()  # type: ignore[no-any-return]


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTLS:
    """Server TLS options that can be replaced while the listener serves:
    each new connection takes the options current when it arrives."""

    def __init__(self, options: CertificateOptions) -> None:
        self.options = options

    def replace(self, options: CertificateOptions) -> None:
        options.getContext()  # a certificate OpenSSL refuses fails here, not in a handshake
        self.options = options

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> Connection:
        return self.options.serverConnectionForTLS(tlsProtocol)


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """An ``IStreamServerEndpoint`` that speaks TLS over another endpoint."""

    def __init__(self, wrapped: IStreamServerEndpoint, options: CertificateOptions | ReloadableTLS) -> None:
        self._wrapped = wrapped
        self._options = options

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._wrapped.listen(tls_server_factory(self._options, factory))


def tls_server_factory(
    options: CertificateOptions | ReloadableTLS, factory: IProtocolFactory
) -> TLSMemoryBIOFactory:
    """*factory* behind TLS with *options*, server side."""
    tls = TLSMemoryBIOFactory(options, False, factory)
    tls.noisy = False  # mdmd logs its own line per listener
    return tls
