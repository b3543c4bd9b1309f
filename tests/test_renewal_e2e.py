"""Certificate renewal end to end, over real sockets: the daemon as twistd
runs it, devices driven by the Windows emulator (mdmd.sim.device).

Time moves with the daemon's test-only clock offset (``MDMD_TEST_CLOCK_OFFSET``,
read at start-up): devices enroll with the daemon's clock 326 days in the
past, so that with the real clock their certificates (365 days) are inside
their renewal window (the last 42 days).  OpenSSL checks certificate dates
with the real clock, so the certificates stay valid for TLS throughout.

The tests of this module run in order on one daemon (restarted between
phases) and share its state:

1. enrollment, and a renewal before the window is refused;
2. inside the window: every refusal (revoked, unenrolled, unknown, not yet
   in its window, forged signature) changes nothing; a renewal whose answer
   is lost is made again; then the daemon is killed (kill -9) between issuing
   and the first session with the new certificate;
3. after the restart both certificates still work until the new one is used;
   then the old one is refused;
4. three months later: old certificates are pruned, one that ended without
   renewal is refused and shown as failed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from lxml import etree

from harness import (
    MANAGEMENT_PATH,
    SYNCML,
    Daemon,
    client_tls_context,
    db_rows,
    edit_ini,
    enroll_device,
    mdm_enroll,
    renewal_exchange,
    start_daemon,
    write_config,
)
from mdmd import pki
from mdmd.sim.device import EnrollmentResult, ManagementClient, WindowsDevice

DAY = 86400.0
ENROLLED_AT = -326 * DAY  # the daemon's clock while the devices enroll
S = "http://www.w3.org/2003/05/soap-envelope"
WSTEP = "http://schemas.microsoft.com/windows/pki/2009/01/enrollment"


@dataclass
class World:
    directory: Path
    config: Path
    daemon: Daemon
    keys: list[rsa.RSAPrivateKey]
    devices: dict[str, WindowsDevice] = field(default_factory=dict)
    # Certificates (and keys) the renewing device had, by name.
    certs: dict[str, tuple[x509.Certificate, rsa.RSAPrivateKey]] = field(default_factory=dict)

    def restart(self, clock_offset: float, *, kill: bool = False) -> None:
        if kill:
            self.daemon.proc.kill()
            self.daemon.proc.wait()
        else:
            self.daemon.stop()
        self.daemon = start_daemon(self.config, clock_offset=clock_offset)

    def tls(self, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> Any:
        return client_tls_context(self.daemon, self.directory, cert, key)

    def enroll(self, name: str) -> WindowsDevice:
        device = WindowsDevice(key=self.keys[len(self.devices) % len(self.keys)], hostname=f"PC-{name}")
        assert isinstance(enroll_device(self.daemon, device), EnrollmentResult)
        self.devices[name] = device
        return device

    def current(self, name: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
        device = self.devices[name]
        assert device.enrollment is not None
        return device.enrollment.certificate, device.key


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("renewal")
    config = write_config(directory)
    daemon = start_daemon(config, clock_offset=ENROLLED_AT)
    w = World(directory, config, daemon, [pki.generate_rsa_key() for _ in range(6)])
    try:
        yield w
    finally:
        w.daemon.stop()


def stored(daemon: Daemon) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """Every certificate and device row, to compare before and after."""
    return (
        db_rows(daemon, "SELECT * FROM certificates ORDER BY serial"),
        db_rows(daemon, "SELECT * FROM devices ORDER BY device_id"),
    )


def fault(answer: bytes) -> tuple[str, str, str]:
    """(subcode, errortype, reason) of a SOAP fault answer."""
    root = etree.fromstring(answer)
    body = root.find(f"{{{S}}}Body/{{{S}}}Fault")
    assert body is not None, answer
    return (
        body.findtext(f"{{{S}}}Code/{{{S}}}Subcode/{{{S}}}Value") or "",
        body.findtext(f".//{{{WSTEP}}}errortype") or "",
        body.findtext(f"{{{S}}}Reason/{{{S}}}Text") or "",
    )


def refused_renewal(w: World, name: str, cert: x509.Certificate, key: rsa.RSAPrivateKey, **kw: Any) -> str:
    """Attempt a renewal that must be refused with NotEligibleToRenew,
    changing nothing stored; the fault's reason."""
    device = w.devices[name]
    before = stored(w.daemon)
    answer = renewal_exchange(w.daemon, device, w.tls(cert, key), pki.generate_rsa_key(), **kw)
    subcode, errortype, reason = fault(answer)
    assert (subcode, errortype) == ("s:Authorization", "NotEligibleToRenew"), answer
    assert stored(w.daemon) == before
    # One log line, naming the check that failed.
    lines = [line for line in log_lines(w.daemon, "renew fault") if reason in line]
    assert len(lines) == 1, lines
    return reason


def log_lines(daemon: Daemon, needle: str, expected: int = 1) -> list[str]:
    deadline = time.monotonic() + 10
    while True:
        found = [line for line in daemon.log_text().splitlines() if needle in line]
        if len(found) >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def checkin(w: World, name: str, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> int:
    """One session's first message with *cert*; the server's SyncHdr status."""
    device = w.devices[name]
    assert device.enrollment is not None
    client = ManagementClient(device)
    response, body = w.daemon.request(
        "POST",
        MANAGEMENT_PATH,
        client.session_start(device.enrollment.management_url),
        SYNCML,
        section="management",
        context=w.tls(cert, key),
    )
    assert response.status == 200, body
    status = client.read(body).hdr_status
    assert status is not None
    return status


def device_json(daemon: Daemon, device: WindowsDevice) -> dict[str, Any]:
    status, body = daemon.admin("GET", f"/api/v1/devices/{device.device_id}")
    assert status == 200 and isinstance(body, dict)
    return body


def iso(cert: x509.Certificate) -> str:
    return cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_1_before_its_window_a_certificate_is_not_renewed(world: World) -> None:
    for name in ("renewing", "superseded", "unenrolled", "ends"):
        world.enroll(name)
    device = world.devices["renewing"]
    cert, key = world.current("renewing")
    world.certs["A"] = (cert, key)
    assert device.enrollment is not None and device.enrollment.renewal is not None
    assert checkin(world, "renewing", cert, key) == 200
    reason = refused_renewal(world, "renewing", cert, key)
    assert f"certificate {pki.serial_hex(cert)}: outside the renewal window: it opens" in reason


def test_2_inside_the_window_refusals_change_nothing_and_a_lost_answer_is_renewed_again(world: World) -> None:
    world.restart(clock_offset=0.0)  # 326 days after enrollment: 39 days left
    now = time.time()
    device = world.devices["renewing"]
    cert_a, key_a = world.certs["A"]
    assert device.renewal_due(now)
    assert device_json(world.daemon, device)["renewal"] == {
        "state": "none",
        "renewed_at": None,
        "reason": None,
    }

    # Revoked: the device re-enrolled since (new key, new certificate).
    superseded = world.devices["superseded"]
    old_cert, old_key = world.current("superseded")
    superseded.key = pki.generate_rsa_key()
    assert isinstance(mdm_enroll(world.daemon, superseded), EnrollmentResult)
    assert refused_renewal(world, "superseded", old_cert, old_key).endswith(
        "certificate revoked (superseded)"
    )

    # Revoked: the user unenrolled the device (Alert 1226).
    unenrolled = world.devices["unenrolled"]
    assert unenrolled.enrollment is not None
    client = ManagementClient(unenrolled)
    response, _ = world.daemon.request(
        "POST",
        MANAGEMENT_PATH,
        client.session_start(unenrolled.enrollment.management_url, unenroll=True),
        SYNCML,
        section="management",
        context=world.tls(*world.current("unenrolled")),
    )
    assert response.status == 200
    assert refused_renewal(world, "unenrolled", *world.current("unenrolled")).endswith(
        "certificate revoked (unenrolled)"
    )

    # Unknown: signed by the identity CA, never issued by mdmd.
    identity = x509.load_pem_x509_certificate((world.daemon.state / "wstep-identity.pem").read_bytes())
    identity_key = pki.load_pem_private_key((world.daemon.state / "wstep-identity.key").read_bytes(), "key")
    assert isinstance(identity_key, rsa.RSAPrivateKey)
    stranger_key = pki.generate_rsa_key()
    stranger = pki.issue_device_certificate(
        identity,
        identity_key,
        stranger_key.public_key(),
        device.device_id,
        days=365,
        now=cert_a.not_valid_before_utc,
    )
    assert refused_renewal(world, "renewing", stranger, stranger_key).endswith(
        "not a certificate mdmd issued"
    )

    # Not yet in its window: enrolled today.
    world.enroll("fresh")
    assert "outside the renewal window: it opens" in refused_renewal(world, "fresh", *world.current("fresh"))

    # A PKCS#7 not signed with the certificate's key.
    forged = refused_renewal(world, "renewing", cert_a, key_a, signer_key=pki.generate_rsa_key())
    assert forged.endswith("bad PKCS#7: PKCS#7 signature does not verify")

    # The answer is lost: the device never gets certificate B ...
    answer = renewal_exchange(world.daemon, device, world.tls(cert_a, key_a), pki.generate_rsa_key())
    assert b"DeviceEnrollmentProvisionDoc" in answer
    (b_serial,) = [
        row[0]
        for row in db_rows(
            world.daemon, "SELECT serial FROM certificates WHERE renewed_from = ?", pki.serial_hex(cert_a)
        )
    ]
    assert db_rows(
        world.daemon, "SELECT revoked_at FROM certificates WHERE serial = ?", pki.serial_hex(cert_a)
    ) == [(None,)]
    # ... and renews again with A, which still works: C supersedes B.
    key_c = pki.generate_rsa_key()
    answer = renewal_exchange(world.daemon, device, world.tls(cert_a, key_a), key_c)
    result = device.renewed(answer, key_c)
    cert_c = result.certificate
    world.certs["C"] = (cert_c, key_c)
    assert cert_c.subject == cert_a.subject and cert_c.public_key() != cert_a.public_key()
    assert result.renewal == device.enrollment.renewal  # type: ignore[union-attr]
    rows = dict(
        (str(r[0]), r[1:])
        for r in db_rows(
            world.daemon,
            "SELECT serial, renewed_from, revoked_at IS NOT NULL, revoke_reason FROM certificates"
            " WHERE device_id = ?",
            device.device_id,
        )
    )
    a, c = pki.serial_hex(cert_a), pki.serial_hex(cert_c)
    assert rows == {a: (None, 0, None), b_serial: (a, 1, "superseded"), c: (a, 0, None)}
    assert len(log_lines(world.daemon, "renewed certificate " + a, expected=2)) == 2

    # Killed between issuing C and C's first session: nothing may be lost.
    world.restart(clock_offset=0.0, kill=True)


def test_3_the_old_certificate_works_until_the_new_one_is_used(world: World) -> None:
    device = world.devices["renewing"]
    cert_a, key_a = world.certs["A"]
    cert_c, key_c = world.certs["C"]
    assert checkin(world, "renewing", cert_a, key_a) == 200  # A survived the kill
    assert checkin(world, "renewing", cert_c, key_c) == 200  # so did C
    assert log_lines(world.daemon, f"first session with renewed certificate {pki.serial_hex(cert_c)}")
    revoked = db_rows(
        world.daemon, "SELECT revoke_reason FROM certificates WHERE serial = ?", pki.serial_hex(cert_a)
    )
    assert revoked == [("renewed",)]
    assert checkin(world, "renewing", cert_a, key_a) == 403
    (line,) = log_lines(world.daemon, "management request refused from")
    assert f"revoked (renewed): certificate of device {device.device_id}" in line
    assert f"serial {pki.serial_hex(cert_a)} issuer " in line
    assert checkin(world, "renewing", cert_c, key_c) == 200
    shown = device_json(world.daemon, device)
    assert shown["cert_not_after"] == iso(cert_c)
    assert shown["renewal"]["state"] == "renewed" and shown["renewal"]["renewed_at"]
    # Renewing with a retired certificate is refused.
    reason = refused_renewal(world, "renewing", cert_a, key_a)
    assert reason.endswith("certificate revoked (renewed)")


def test_4_months_later_old_certificates_are_pruned_and_an_ended_one_is_refused(world: World) -> None:
    # New enrollments switched off meanwhile: renewals are still served.
    world.config.write_text(edit_ini(world.config.read_text(), {"enrollment": {"windows_mdm": "no"}}))
    world.restart(clock_offset=91 * DAY)
    device = world.devices["renewing"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = {
            str(r[0])
            for r in db_rows(
                world.daemon, "SELECT serial FROM certificates WHERE device_id = ?", device.device_id
            )
        }
        if left == {pki.serial_hex(world.certs["C"][0])}:
            break
        time.sleep(0.05)
    assert left == {pki.serial_hex(world.certs["C"][0])}, "A (renewed) and B (superseded) pruned"
    assert log_lines(world.daemon, "revoked more than 90 days ago deleted")
    assert checkin(world, "renewing", *world.certs["C"]) == 200

    # "ends" never renewed: by mdmd's clock its certificate ended 52 days ago.
    ends = world.devices["ends"]
    assert checkin(world, "ends", *world.current("ends")) == 403
    (line,) = log_lines(world.daemon, "management request refused from")
    assert f"expired: certificate of device {ends.device_id}; certificate subject" in line
    shown = device_json(world.daemon, ends)
    assert shown["renewal"]["state"] == "failed"
    assert shown["renewal"]["reason"].startswith("certificate ended ")
    # Too late to renew (no grace configured); and this is the renewal
    # service answering, not the switched-off enrollment.
    reason = refused_renewal(world, "ends", *world.current("ends"))
    assert "outside the renewal window: certificate ended" in reason
