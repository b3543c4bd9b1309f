"""The store contract: every behaviour the handlers rely on, through the
:class:`~mdmd.store.Store` interface only, run against every backend in
``store_helpers.BACKENDS``.  A new backend is done when it passes this."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mdmd.management import (
    AlertRecord,
    CommandResult,
    CompletedObject,
    ManagementStep,
    NewCommand,
    QueuedCommand,
    SentRef,
    SessionState,
)
from mdmd.profiles import (
    AppliedItem,
    DeviceProfile,
    DeviceVars,
    Profile,
    ProfileCommand,
    ProfileEvent,
    ProfileItem,
    ProfileStep,
    profile_version,
)
from mdmd.store import AssignmentOutcome, CertificateRenewal, RenewalRefused, SessionConflict, Store
from store_helpers import BACKENDS, enrollment, host, wait


@pytest.fixture(params=sorted(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = BACKENDS[request.param](tmp_path)
    s.start()
    yield s
    s.stop()


def _session(**changes: Any) -> SessionState:
    return replace(SessionState(session_id="1A", last_msg_id=1, next_msg_id=2, max_msg_size=65536), **changes)


def _enrolled_with_command(store: Store, device_id: str, n: int) -> str:
    h = wait(store.enroll_host(host(n), now=1.0))
    wait(store.record_device_enrollment(enrollment(device_id, h.id, f"serial{n}", hw=None), now=2.0))
    record = wait(store.queue_command(device_id, f"cmd-{device_id}", "Get", "<Get/>", now=3.0))
    assert record is not None and record.state == "pending"
    return record.uuid


# --- hosts ---


def test_host_reenrollment_keeps_the_host_and_replaces_the_key(store: Store) -> None:
    first = wait(store.enroll_host(host(1, b"old"), now=10.0))
    again = wait(store.enroll_host(host(1, b"new"), now=20.0))
    assert again.id == first.id
    assert wait(store.host_by_node_key(hashlib.sha256(b"old").digest())) is None
    found = wait(store.host_by_node_key(hashlib.sha256(b"new").digest()))
    assert found is not None and found.id == first.id and found.enrolled_at == 10.0


def test_a_node_key_lookup_records_last_seen_only_when_asked(store: Store) -> None:
    h = wait(store.enroll_host(host(1), now=1.0))
    key = hashlib.sha256(b"key-1").digest()
    seen = wait(store.host_by_node_key(key))
    assert seen is not None and seen.last_seen == 1.0
    seen = wait(store.host_by_node_key(key, seen_at=9.0))
    assert seen is not None and seen.id == h.id and seen.last_seen == 9.0
    again = wait(store.host_by_node_key(key))
    assert again is not None and again.last_seen == 9.0


def test_unenrollment_is_requested_of_the_enrolled_devices_host_only(store: Store) -> None:
    assert wait(store.request_unenrollment("NOPE")) is False
    h = wait(store.enroll_host(host(1), now=1.0))
    wait(store.record_device_enrollment(enrollment("DEV1", h.id, "aa"), now=2.0))
    assert wait(store.request_unenrollment("DEV1")) is True
    found = wait(store.host_by_node_key(hashlib.sha256(b"key-1").digest()))
    assert found is not None and found.unenroll_requested and found.mdm_device_id == "DEV1"


# --- devices and certificates ---


def test_device_reenrollment_revokes_the_old_certificate(store: Store) -> None:
    h = wait(store.enroll_host(host(1), now=1.0))
    wait(store.record_device_enrollment(enrollment("DEV1", h.id, "aa"), now=2.0))
    outcome = wait(store.record_device_enrollment(enrollment("DEV1", h.id, "bb"), now=3.0))
    assert outcome.revoked_serials == ("aa",)
    old, new = wait(store.certificate("aa")), wait(store.certificate("bb"))
    assert old is not None and old.revoked_at == 3.0
    assert new is not None and new.revoked_at is None
    assert [c.serial for c in wait(store.device_certificates("DEV1"))] == ["bb", "aa"]


def test_new_device_id_on_the_same_host_replaces_the_old_device(store: Store) -> None:
    h = wait(store.enroll_host(host(1), now=1.0))
    wait(store.record_device_enrollment(enrollment("DEV1", h.id, "aa"), now=2.0))
    outcome = wait(store.record_device_enrollment(enrollment("DEV2", h.id, "bb"), now=3.0))
    assert outcome.replaced_device_ids == ("DEV1",) and outcome.revoked_serials == ("aa",)
    old = wait(store.device("DEV1"))
    assert old is not None and old.state == "unenrolled"
    refreshed = wait(store.host_by_node_key(hashlib.sha256(b"key-1").digest()))
    assert refreshed is not None and refreshed.mdm_device_id == "DEV2"


def test_a_device_id_enrolled_for_another_host_is_refused(store: Store) -> None:
    from mdmd.store import DeviceConflict

    a = wait(store.enroll_host(host(1), now=1.0))
    b = wait(store.enroll_host(host(2), now=1.0))
    wait(store.record_device_enrollment(enrollment("DEV1", a.id, "aa"), now=2.0))
    with pytest.raises(DeviceConflict):
        wait(store.record_device_enrollment(enrollment("DEV1", b.id, "bb"), now=3.0))
    assert wait(store.certificate("bb")) is None
    device = wait(store.device("DEV1"))
    assert device is not None and device.host_id == a.id


def test_hw_dev_id_collision_is_flagged_not_merged(store: Store) -> None:
    a = wait(store.enroll_host(host(1), now=1.0))
    b = wait(store.enroll_host(host(2), now=1.0))
    wait(store.record_device_enrollment(enrollment("DEV-A", a.id, "aa", hw="CLONE"), now=2.0))
    outcome = wait(store.record_device_enrollment(enrollment("DEV-B", b.id, "bb", hw="CLONE"), now=3.0))
    assert outcome.hw_dev_id_collisions == ("DEV-A",) and outcome.revoked_serials == ()
    first, second = wait(store.device("DEV-A")), wait(store.device("DEV-B"))
    assert first is not None and first.state == "enrolled" and first.hw_dev_id_collision
    assert second is not None and second.hw_dev_id_collision
    cert = wait(store.certificate("aa"))
    assert cert is not None and cert.revoked_at is None
    assert [d.device_id for d in wait(store.devices())] == ["DEV-A", "DEV-B"]


def test_a_failed_transaction_changes_nothing(store: Store) -> None:
    h = wait(store.enroll_host(host(1), now=1.0))
    wait(store.record_device_enrollment(enrollment("DEV1", h.id, "aa"), now=2.0))
    # The same serial again violates a uniqueness rule after the revocation
    # step: the whole transaction, revocation included, must roll back.
    with pytest.raises(Exception):  # noqa: B017 - the backend's own integrity error
        wait(store.record_device_enrollment(enrollment("DEV1", h.id, "aa"), now=3.0))
    cert = wait(store.certificate("aa"))
    assert cert is not None and cert.revoked_at is None


# --- certificate renewal ---


def _renewal(
    renewed: str, serial: str, device_id: str = "DEV1", not_after: float = 500.0
) -> CertificateRenewal:
    return CertificateRenewal(
        device_id=device_id,
        renewed_serial=renewed,
        cert_serial=serial,
        cert_thumbprint=serial.upper() * 2,
        cert_not_before=10.0,
        cert_not_after=not_after,
    )


def _enrolled(store: Store, device_id: str = "DEV1", serial: str = "aa", n: int = 1) -> int:
    h = wait(store.enroll_host(host(n), now=1.0))
    wait(store.record_device_enrollment(enrollment(device_id, h.id, serial), now=2.0))
    return h.id


def _live(store: Store, device_id: str = "DEV1") -> list[str]:
    return sorted(c.serial for c in wait(store.device_certificates(device_id)) if c.revoked_at is None)


def test_a_renewal_adds_a_certificate_and_keeps_the_old_one_working(store: Store) -> None:
    _enrolled(store)
    outcome = wait(store.record_renewal(_renewal("aa", "bb"), now=20.0))
    assert outcome.superseded_serials == ()
    new = wait(store.certificate("bb"))
    assert new is not None and new.renewed_from == "aa" and new.issued_at == 20.0
    assert new.activated_at is None and new.revoked_at is None and new.not_after == 500.0
    assert _live(store) == ["aa", "bb"]
    # The old certificate still opens sessions until the new one is used.
    ctx = wait(store.management_context("aa"))
    assert ctx is not None and ctx.certificate.revoked_at is None
    # The device's current certificate is the newest one.
    device = wait(store.device("DEV1"))
    assert device is not None and device.certificate is not None
    assert (device.certificate.serial, device.certificate.renewed_from) == ("bb", "aa")
    (listed,) = wait(store.devices())
    assert listed.certificate is not None and listed.certificate.serial == "bb"


def test_a_renewal_again_with_the_old_certificate_supersedes_the_lost_one(store: Store) -> None:
    _enrolled(store)
    wait(store.record_renewal(_renewal("aa", "bb"), now=20.0))
    outcome = wait(store.record_renewal(_renewal("aa", "cc"), now=30.0))
    assert outcome.superseded_serials == ("bb",)
    lost = wait(store.certificate("bb"))
    assert lost is not None and lost.revoked_at == 30.0 and lost.revoke_reason == "superseded"
    assert _live(store) == ["aa", "cc"]


def test_the_first_session_of_the_new_certificate_retires_the_old_one(store: Store) -> None:
    _enrolled(store)
    wait(store.record_renewal(_renewal("aa", "bb"), now=20.0))
    wait(store.record_renewal(_renewal("aa", "cc"), now=30.0))
    assert wait(store.confirm_renewal("aa", now=40.0)) == ()  # not a renewed certificate
    revoked: tuple[str, ...] = wait(store.confirm_renewal("cc", now=40.0))
    assert revoked == ("aa",)
    old = wait(store.certificate("aa"))
    assert old is not None and old.revoked_at == 40.0 and old.revoke_reason == "renewed"
    new = wait(store.certificate("cc"))
    assert new is not None and new.activated_at == 40.0 and new.revoked_at is None
    assert _live(store) == ["cc"]
    assert wait(store.confirm_renewal("cc", now=50.0)) == ()  # only the first session counts
    again = wait(store.certificate("cc"))
    assert again is not None and again.activated_at == 40.0


def test_a_confirmed_renewal_supersedes_any_other_live_certificate(store: Store) -> None:
    _enrolled(store)
    wait(store.record_renewal(_renewal("aa", "bb"), now=20.0))
    wait(store.record_renewal(_renewal("bb", "cc"), now=30.0))  # renewed again before bb was used
    revoked: tuple[str, ...] = wait(store.confirm_renewal("cc", now=40.0))
    assert set(revoked) == {"aa", "bb"}
    reasons = {c.serial: c.revoke_reason for c in wait(store.device_certificates("DEV1"))}
    assert reasons == {"aa": "superseded", "bb": "renewed", "cc": None}


@pytest.mark.parametrize("case", ["unknown", "revoked", "unenrolled", "other device"])
def test_a_refused_renewal_changes_nothing(store: Store, case: str) -> None:
    h = _enrolled(store)
    renewed = "aa"
    device_id = "DEV1"
    if case == "unknown":
        renewed = "zz"
    elif case == "revoked":
        wait(store.record_device_enrollment(enrollment("DEV1", h, "a2"), now=3.0))
    elif case == "unenrolled":
        wait(store.commit_management_step(ManagementStep("DEV1", session=None, unenroll=True), now=3.0))
    else:
        _enrolled(store, "DEV2", "dd", n=2)
        device_id = "DEV2"
    before = (wait(store.device_certificates("DEV1")), wait(store.device_certificates("DEV2")))
    with pytest.raises(RenewalRefused):
        wait(store.record_renewal(_renewal(renewed, "bb", device_id=device_id), now=20.0))
    assert wait(store.certificate("bb")) is None
    assert (wait(store.device_certificates("DEV1")), wait(store.device_certificates("DEV2"))) == before


def test_reenrollment_revokes_renewed_certificates_too(store: Store) -> None:
    h = _enrolled(store)
    wait(store.record_renewal(_renewal("aa", "bb"), now=20.0))
    outcome = wait(store.record_device_enrollment(enrollment("DEV1", h, "cc"), now=30.0))
    assert set(outcome.revoked_serials) == {"aa", "bb"}
    assert _live(store) == ["cc"]
    assert wait(store.confirm_renewal("bb", now=40.0)) == ()
    assert _live(store) == ["cc"]


def test_an_unenrolled_device_has_no_current_certificate(store: Store) -> None:
    _enrolled(store)
    wait(store.commit_management_step(ManagementStep("DEV1", session=None, unenroll=True), now=3.0))
    device = wait(store.device("DEV1"))
    assert device is not None and device.certificate is None


def test_ended_certificates_that_were_renewed_are_retired_in_batches(store: Store) -> None:
    # enrollment() certificates end at 2.0.
    for n in range(1, 4):
        _enrolled(store, f"DEV{n}", f"a{n}", n=n)
        wait(store.record_renewal(_renewal(f"a{n}", f"b{n}", device_id=f"DEV{n}"), now=1.5))
    _enrolled(store, "DEV9", "a9", n=9)  # ended, never renewed: stays as it is
    assert wait(store.retire_renewed_certificates(1.9, limit=10)) == 0  # not ended yet
    assert wait(store.retire_renewed_certificates(5.0, limit=2)) == 2
    assert wait(store.retire_renewed_certificates(5.0, limit=2)) == 1
    assert wait(store.retire_renewed_certificates(5.0, limit=2)) == 0
    for n in range(1, 4):
        old = wait(store.certificate(f"a{n}"))
        assert old is not None and old.revoke_reason == "renewed" and old.revoked_at == 2.0
        assert _live(store, f"DEV{n}") == [f"b{n}"]
    lonely = wait(store.certificate("a9"))
    assert lonely is not None and lonely.revoked_at is None


def test_old_superseded_and_renewed_certificates_are_pruned_in_batches(store: Store) -> None:
    h = _enrolled(store)
    for n, now in enumerate((10.0, 20.0, 30.0)):
        wait(store.record_device_enrollment(enrollment("DEV1", h, f"r{n}"), now=now))
    wait(store.record_renewal(_renewal("r2", "bb"), now=40.0))
    wait(store.confirm_renewal("bb", now=50.0))  # r2 renewed at 50
    _enrolled(store, "DEV2", "u1", n=2)
    wait(store.commit_management_step(ManagementStep("DEV2", session=None, unenroll=True), now=3.0))
    # aa (10), r0 (20), r1 (30) superseded; r2 renewed (50); u1 unenrolled (3).
    assert wait(store.prune_certificates(35.0, limit=2)) == 2
    assert wait(store.prune_certificates(35.0, limit=2)) == 1
    assert wait(store.prune_certificates(35.0, limit=2)) == 0
    assert sorted(c.serial for c in wait(store.device_certificates("DEV1"))) == ["bb", "r2"]
    assert wait(store.prune_certificates(60.0, limit=10)) == 1
    assert [c.serial for c in wait(store.device_certificates("DEV1"))] == ["bb"]
    # An unenrolled device keeps its record of what it had.
    assert [c.serial for c in wait(store.device_certificates("DEV2"))] == ["u1"]


# --- the command queue ---


def test_commands_are_queued_for_enrolled_devices_only(store: Store) -> None:
    assert wait(store.queue_command("NOPE", "u0", "Get", "<Get/>", now=1.0)) is None
    _enrolled_with_command(store, "DEV1", 1)
    wait(store.queue_command("DEV1", "u2", "Get", "<Get/>", now=4.0))
    assert [c.uuid for c in wait(store.device_commands("DEV1"))] == ["u2", "cmd-DEV1"]
    assert [c.uuid for c in wait(store.device_commands("DEV1", limit=1))] == ["u2"]
    ctx = wait(store.management_context("serial1"))
    assert ctx is not None
    assert ctx.queue == (QueuedCommand("cmd-DEV1", "<Get/>"), QueuedCommand("u2", "<Get/>"))


def test_a_management_step_only_touches_its_own_devices_commands(store: Store) -> None:
    mine = _enrolled_with_command(store, "DEV1", 1)
    theirs = _enrolled_with_command(store, "DEV2", 2)
    step = ManagementStep(
        "DEV1",
        session=None,
        answered=((mine, 200), (theirs, 200)),
        results=((theirs, CommandResult("results", "5", "Get", None, "./X", "chr", None, "forged")),),
    )
    wait(store.commit_management_step(step, now=5.0))
    own, other = wait(store.command(mine)), wait(store.command(theirs))
    assert own is not None and own.state == "acknowledged" and own.status == 200
    assert other is not None and other.state == "pending" and other.results == ()


def test_a_step_records_sending_answers_results_and_inventory(store: Store) -> None:
    uuid = _enrolled_with_command(store, "DEV1", 1)
    wait(store.queue_command("DEV1", "bad", "Get", "<Get/>", now=3.5))
    sent = ManagementStep("DEV1", session=_session(), sent=((uuid, "1A", 1),), failed=(("bad", 416),))
    wait(store.commit_management_step(sent, now=5.0))
    record = wait(store.command(uuid))
    assert record is not None and record.state == "sent" and record.sent_at == 5.0
    refused = wait(store.command("bad"))
    assert refused is not None and refused.state == "failed" and refused.status == 416
    ctx = wait(store.management_context("serial1"))
    assert ctx is not None and ctx.queue == (QueuedCommand(uuid, "<Get/>"),)  # sent, unanswered

    result = CommandResult("results", "3", "Get", None, "./DevDetail/SwV", "chr", "text/plain", "10.0")
    answered = ManagementStep(
        "DEV1",
        session=_session(last_msg_id=2, next_msg_id=3),
        inventory={"./DevInfo/Mod": "VM"},
        answered=((uuid, 200),),
        results=((uuid, CommandResult("status", "3", "Get", 200)), (uuid, result)),
    )
    wait(store.commit_management_step(answered, now=6.0))
    record = wait(store.command(uuid))
    assert record is not None and record.state == "acknowledged" and record.acked_at == 6.0
    assert [(r.kind, r.status, r.data) for r in record.results] == [
        ("status", 200, None),
        ("results", None, "10.0"),
    ]
    device = wait(store.device("DEV1"))
    assert device is not None and device.inventory == {"./DevInfo/Mod": "VM"} and device.last_seen == 6.0
    ctx = wait(store.management_context("serial1"))
    assert ctx is not None and ctx.queue == ()


def test_alerts_keep_the_latest_of_each_kind(store: Store) -> None:
    _enrolled_with_command(store, "DEV1", 1)
    for now, data in ((10.0, "user"), (20.0, "others")):
        alert = AlertRecord("1224", "com.microsoft/MDM/LoginStatus", "chr", None, data)
        wait(store.commit_management_step(ManagementStep("DEV1", session=_session(), alerts=(alert,)), now))
    (kept,) = wait(store.device_alerts("DEV1"))
    assert (kept.code, kept.data, kept.received_at, kept.count) == ("1224", "others", 20.0, 2)


# --- OMA-DM session state ---


def test_the_session_and_its_reply_are_kept_until_the_session_ends(store: Store) -> None:
    _enrolled_with_command(store, "DEV1", 1)
    state = _session(
        refs={"1:4": SentRef("cmd-DEV1", "Get", True)},
        sent=frozenset({"cmd-DEV1"}),
        request_digest="ab" * 32,
        package_open=True,
    )
    wait(store.commit_management_step(ManagementStep("DEV1", state, reply=b"<SyncML>1</SyncML>"), 5.0))
    ctx = wait(store.management_context("serial1"))
    assert ctx is not None and ctx.session == state
    assert wait(store.last_reply("DEV1")) == b"<SyncML>1</SyncML>"
    # A later message's step replaces both.
    later = _session(last_msg_id=2, next_msg_id=3)
    wait(store.commit_management_step(ManagementStep("DEV1", later, reply=b"<SyncML>2</SyncML>"), 6.0))
    assert wait(store.last_reply("DEV1")) == b"<SyncML>2</SyncML>"
    # Ending the session (unenrollment here) forgets both.
    wait(store.commit_management_step(ManagementStep("DEV1", None, unenroll=True), 7.0))
    ctx = wait(store.management_context("serial1"))
    assert ctx is not None and ctx.session is None and ctx.device.state == "unenrolled"
    assert ctx.certificate.revoked_at == 7.0
    assert wait(store.last_reply("DEV1")) is None


def test_a_large_object_is_kept_in_pieces_and_joined_once(store: Store) -> None:
    uuid = _enrolled_with_command(store, "DEV1", 1)
    for i, piece in enumerate(("aaa", "bbb", "ccc")):
        step = ManagementStep("DEV1", _session(), chunks=(("1:4:0", piece),), new_session=i == 0)
        wait(store.commit_management_step(step, now=5.0 + i))
    last = CommandResult("results", "4", "Get", None, "./X", "chr", None, "ddd")
    wait(
        store.commit_management_step(
            ManagementStep("DEV1", _session(), completed=(CompletedObject("1:4:0", uuid, last),)), 9.0
        )
    )
    record = wait(store.command(uuid))
    assert record is not None and [r.data for r in record.results] == ["aaabbbcccddd"]
    # The pieces are gone: completing the same key again joins nothing.
    again = CommandResult("results", "4", "Get", None, "./X", "chr", None, "e")
    wait(
        store.commit_management_step(
            ManagementStep("DEV1", _session(), completed=(CompletedObject("1:4:0", uuid, again),)), 10.0
        )
    )
    record = wait(store.command(uuid))
    assert record is not None and [r.data for r in record.results] == ["aaabbbcccddd", "e"]


def test_a_new_session_or_a_dropped_object_discards_its_pieces(store: Store) -> None:
    uuid = _enrolled_with_command(store, "DEV1", 1)
    wait(store.commit_management_step(ManagementStep("DEV1", _session(), chunks=(("1:4:0", "old"),)), 5.0))
    wait(store.commit_management_step(ManagementStep("DEV1", _session(), chunks=(("1:5:0", "x"),)), 5.5))
    wait(store.commit_management_step(ManagementStep("DEV1", _session(), dropped=("1:5:0",)), 5.7))
    # A new session starts: pieces of the broken-off one must not join.
    wait(store.commit_management_step(ManagementStep("DEV1", _session(), new_session=True), 6.0))
    for key in ("1:4:0", "1:5:0"):
        done = CompletedObject(
            key, uuid, CommandResult("results", "4", "Get", None, "./X", None, None, "new")
        )
        wait(store.commit_management_step(ManagementStep("DEV1", _session(), completed=(done,)), 7.0))
    record = wait(store.command(uuid))
    assert record is not None and [r.data for r in record.results] == ["new", "new"]


def test_a_session_step_read_before_another_commits_is_refused_and_changes_nothing(store: Store) -> None:
    # Two processes read the same session, each processes a message; only
    # the first step may commit (compare-and-swap on session_seq).
    uuid = _enrolled_with_command(store, "DEV1", 1)
    ctx = wait(store.management_context("serial1"))
    assert ctx is not None
    first = ManagementStep("DEV1", _session(next_msg_id=2), reply=b"first", sent=((uuid, "1", 1),))
    second = ManagementStep(
        "DEV1", _session(next_msg_id=9), reply=b"second", answered=((uuid, 500),), inventory={"./X": "y"}
    )
    wait(store.commit_management_step(first, now=5.0, expected_seq=ctx.session_seq))
    with pytest.raises(SessionConflict):
        wait(store.commit_management_step(second, now=6.0, expected_seq=ctx.session_seq))
    after = wait(store.management_context("serial1"))
    assert after is not None
    assert after.session == _session(next_msg_id=2) and after.session_seq == ctx.session_seq + 1
    assert after.device.inventory == {} and after.device.last_seen == 5.0
    assert wait(store.last_reply("DEV1")) == b"first"
    command = wait(store.command(uuid))
    assert command is not None and command.state == "sent" and command.status is None
    # Read again, the step commits.
    wait(store.commit_management_step(second, now=6.0, expected_seq=after.session_seq))
    command = wait(store.command(uuid))
    assert command is not None and command.state == "failed" and command.status == 500


def test_re_enrollment_invalidates_a_session_step_read_before_it(store: Store) -> None:
    _enrolled_with_command(store, "DEV1", 1)
    wait(store.commit_management_step(ManagementStep("DEV1", _session(), reply=b"r"), 4.0))
    ctx = wait(store.management_context("serial1"))
    assert ctx is not None
    h = wait(store.enroll_host(host(1), now=7.0))
    wait(store.record_device_enrollment(enrollment("DEV1", h.id, "serial1b", hw=None), now=8.0))
    with pytest.raises(SessionConflict):
        wait(
            store.commit_management_step(
                ManagementStep("DEV1", _session()), 9.0, expected_seq=ctx.session_seq
            )
        )
    fresh = wait(store.management_context("serial1b"))
    assert fresh is not None and fresh.session is None
    assert wait(store.last_reply("DEV1")) is None


# --- configuration profiles and groups ---


def _profile(name: str, data: str = "1") -> Profile:
    items = (ProfileItem("Replace", "./Device/Vendor/MSFT/Policy/Config/A/B", "int", None, data),)
    return Profile(name, profile_version(items), items)


def test_profiles_are_created_once_updated_and_listed(store: Store) -> None:
    assert wait(store.create_profile(_profile("p1"), 1.0)) is True
    assert wait(store.create_profile(_profile("p1", "2"), 2.0)) is False
    assert wait(store.update_profile(_profile("nope"), 2.0)) is False
    assert wait(store.update_profile(_profile("p1", "3"), 3.0)) is True
    shown = wait(store.profile("p1"))
    assert shown is not None and shown.version == _profile("p1", "3").version and shown.items[0].data == "3"
    assert (shown.created_at, shown.updated_at, shown.deleted_at) == (1.0, 3.0, None)
    assert [p.name for p in wait(store.profiles())] == ["p1"]


def test_groups_members_and_assignments(store: Store) -> None:
    _enrolled_with_command(store, "DEV1", 1)
    _enrolled_with_command(store, "DEV2", 2)
    assert wait(store.create_group("team", 1.0)) is True
    assert wait(store.create_group("team", 1.0)) is False
    assert wait(store.create_group("all", 1.0)) is False  # built in
    change = wait(store.change_group_members("team", ["DEV2", "DEV1", "GHOST"], [], 2.0))
    assert change is not None and change.unknown == ("GHOST",) and change.added == 0
    assert wait(store.group_members("team")) == []  # nothing changed
    change = wait(store.change_group_members("team", ["DEV2", "DEV1", "DEV1"], [], 2.0))
    assert change is not None and (change.added, change.removed) == (2, 0)
    assert wait(store.group_members("team", limit=1)) == ["DEV1"]
    assert wait(store.group_members("team", after="DEV1")) == ["DEV2"]
    assert wait(store.change_group_members("nope", ["DEV1"], [], 2.0)) is None
    wait(store.create_profile(_profile("p1"), 1.0))
    outcome = wait(store.assign_profile("p1", ["team", "ghosts"], 3.0))
    assert outcome.found and outcome.unknown_groups == ("ghosts",)
    assert wait(store.assign_profile("nope", ["team"], 3.0)).found is False
    assert wait(store.assign_profile("p1", ["team", "all"], 3.0)) == AssignmentOutcome(found=True)
    groups = {g.name: g for g in wait(store.groups())}
    assert next(iter(groups)) == "all"
    assert (groups["all"].members, groups["all"].created_at, groups["all"].profiles) == (2, None, ("p1",))
    assert (groups["team"].members, groups["team"].profiles) == (2, ("p1",))
    assert wait(store.group_members("all")) == ["DEV1", "DEV2"]
    change = wait(store.change_group_members("team", [], ["DEV1"], 4.0))
    assert change is not None and change.removed == 1
    assert wait(store.delete_group("team")) is True and wait(store.group("team")) is None
    shown = wait(store.profile("p1"))
    assert shown is not None and shown.groups == ("all",)


def test_a_devices_desired_profiles_are_the_union_over_its_groups(store: Store) -> None:
    _enrolled_with_command(store, "DEV1", 1)
    for name in ("everyone", "mine", "others", "gone"):
        wait(store.create_profile(_profile(name), 1.0))
    wait(store.create_group("g1", 1.0))
    wait(store.create_group("g2", 1.0))
    wait(store.change_group_members("g1", ["DEV1"], [], 1.0))
    wait(store.assign_profile("everyone", ["all"], 1.0))
    wait(store.assign_profile("mine", ["g1", "g2"], 1.0))
    wait(store.assign_profile("others", ["g2"], 1.0))
    wait(store.assign_profile("gone", ["g1"], 1.0))
    wait(store.delete_profile("gone", 2.0))
    context = wait(store.profile_context("DEV1"))
    assert [p.name for p in context.desired] == ["everyone", "mine"]
    assert context.device == DeviceVars("DEV1", "host1", "serial1")


def test_a_profile_step_keeps_records_links_history_and_created_commands(store: Store) -> None:
    _enrolled_with_command(store, "DEV1", 1)
    wait(store.create_profile(_profile("p1"), 1.0))
    wait(store.assign_profile("p1", ["all"], 1.0))
    record = DeviceProfile(
        "p1",
        "v1",
        "sent",
        applied=(AppliedItem("./A", "int", "1"),),
        awaiting=frozenset({"./A"}),
        updated_at=5.0,
    )
    link = ProfileCommand("new-1", "p1", "v1", "apply", None)
    event = ProfileEvent("p1", "v1", "sent", None, None, 5.0)
    step = ManagementStep(
        "DEV1", _session(), created=(NewCommand("new-1", "Atomic", "<Atomic/>"),), sent=(("new-1", "1A", 1),)
    )
    wait(store.commit_management_step(step, 5.0, profiles=ProfileStep((record,), (link,), (), (event,))))
    ctx = wait(store.management_context("serial1"))
    assert ctx is not None
    assert ctx.profiles == (record,) and ctx.profile_links == (link,)
    assert QueuedCommand("new-1", "<Atomic/>") in ctx.queue
    sent = wait(store.command("new-1"))
    assert sent is not None and (sent.state, sent.verb) == ("sent", "Atomic")
    (entry,) = wait(store.device_profiles("DEV1"))
    assert entry.record == record and entry.history == (event,)
    assert wait(store.profile_status("p1")) == {"sent": 1}
    # The answer: link done, record verified.
    verified = DeviceProfile("p1", "v1", "verified", verified_at=6.0, updated_at=6.0, applied=record.applied)
    done = ProfileStep((verified,), (), ("new-1",), (ProfileEvent("p1", "v1", "verified", None, None, 6.0),))
    wait(
        store.commit_management_step(
            ManagementStep("DEV1", _session(), answered=(("new-1", 200),)), 6.0, profiles=done
        )
    )
    ctx = wait(store.management_context("serial1"))
    assert ctx is not None and ctx.profiles == (verified,) and ctx.profile_links == ()
    (entry,) = wait(store.device_profiles("DEV1", history=1))
    assert [e.state for e in entry.history] == ["verified"]


def test_a_deleted_profile_is_gone_once_no_device_has_it(store: Store) -> None:
    _enrolled_with_command(store, "DEV1", 1)
    wait(store.create_profile(_profile("p1"), 1.0))
    wait(store.create_profile(_profile("unused"), 1.0))
    wait(store.assign_profile("p1", ["all"], 1.0))
    applied = DeviceProfile("p1", "v1", "verified", updated_at=2.0, applied=(AppliedItem("./A", "int", "1"),))
    wait(
        store.commit_management_step(
            ManagementStep("DEV1", _session()), 2.0, profiles=ProfileStep((applied,))
        )
    )
    assert wait(store.delete_profile("unused", 3.0)) is True
    assert wait(store.profile("unused")) is None  # no device had it
    assert wait(store.delete_profile("p1", 3.0)) is True
    assert wait(store.delete_profile("p1", 3.0)) is False
    shown = wait(store.profile("p1"))
    assert shown is not None and shown.deleted_at == 3.0 and shown.groups == ()
    assert wait(store.update_profile(_profile("p1", "2"), 4.0)) is False
    assert wait(store.profile_context("DEV1")).desired == ()
    removed = replace(applied, state="removed", applied=(), updated_at=5.0)
    wait(
        store.commit_management_step(
            ManagementStep("DEV1", _session()), 5.0, profiles=ProfileStep((removed,))
        )
    )
    assert wait(store.profile("p1")) is None
    (entry,) = wait(store.device_profiles("DEV1"))
    assert entry.record.state == "removed"


def test_profile_status_counts_devices_that_have_not_had_it_yet_as_pending(store: Store) -> None:
    _enrolled_with_command(store, "DEV1", 1)
    _enrolled_with_command(store, "DEV2", 2)
    wait(store.create_profile(_profile("p1"), 1.0))
    wait(store.create_group("g", 1.0))
    wait(store.change_group_members("g", ["DEV1", "DEV2"], [], 1.0))
    wait(store.assign_profile("p1", ["g"], 1.0))
    assert wait(store.profile_status("p1")) == {"pending": 2}
    failed = DeviceProfile("p1", "v1", "failed", status=500, updated_at=2.0)
    wait(
        store.commit_management_step(ManagementStep("DEV1", _session()), 2.0, profiles=ProfileStep((failed,)))
    )
    assert wait(store.profile_status("p1")) == {"pending": 1, "failed": 1}
    wait(store.assign_profile("p1", ["all"], 3.0))
    assert wait(store.profile_status("p1")) == {"pending": 1, "failed": 1}


# --- several processes (several nodes) on one database ---


@pytest.fixture
def other(request: pytest.FixtureRequest, tmp_path: Path, store: Store) -> Iterator[Store]:
    """Another process's store on the same database (a worker process on
    SQLite, another node on PostgreSQL)."""
    s = BACKENDS[request.node.callspec.params["store"]](tmp_path)
    s.start()
    yield s
    s.stop()


def test_a_lease_is_its_holders_until_it_runs_out(store: Store) -> None:
    assert wait(store.claim_lease("job", "node-a", now=100.0, until=200.0)) is True
    assert wait(store.claim_lease("job", "node-b", now=150.0, until=250.0)) is False
    assert wait(store.claim_lease("job", "node-a", now=190.0, until=290.0)) is True  # renewed
    assert wait(store.claim_lease("job", "node-b", now=250.0, until=350.0)) is False
    assert wait(store.claim_lease("other-job", "node-b", now=250.0, until=350.0)) is True
    assert wait(store.claim_lease("job", "node-b", now=290.0, until=390.0)) is True  # ran out
    assert wait(store.claim_lease("job", "node-a", now=300.0, until=400.0)) is False


def test_of_two_nodes_claiming_a_lease_at_once_one_gets_it(store: Store, other: Store) -> None:
    for round_ in range(10):
        now = 100.0 * round_
        claims = [
            s.claim_lease("job", name, now=now + 100.0, until=now + 199.0)
            for s, name in ((store, f"a{round_}"), (other, f"b{round_}"))
        ]
        assert sorted(wait(d) for d in claims) == [False, True]


def test_of_two_nodes_stepping_one_session_at_once_one_commits(store: Store, other: Store) -> None:
    uuid = _enrolled_with_command(store, "DEV1", 1)
    for n in range(10):
        ctx = wait(store.management_context("serial1"))
        assert ctx is not None and ctx.session_seq == n + 1
        steps = [
            node.commit_management_step(
                ManagementStep("DEV1", _session(last_msg_id=n), reply=name.encode(), sent=((uuid, "1A", n),)),
                now=10.0 + n,
                expected_seq=ctx.session_seq,
            )
            for node, name in ((store, "a"), (other, "b"))
        ]
        outcomes = []
        for d in steps:
            try:
                wait(d)
                outcomes.append("committed")
            except SessionConflict:
                outcomes.append("conflict")
        assert sorted(outcomes) == ["committed", "conflict"]
        winner = "ab"[outcomes.index("committed")]
        # Either node reads what the winner committed, and only that.
        for node in (store, other):
            assert wait(node.last_reply("DEV1")) == winner.encode()
            after = wait(node.management_context("serial1"))
            assert after is not None and after.session_seq == ctx.session_seq + 1
            assert after.session is not None and after.session.last_msg_id == n


def test_a_command_queued_through_one_node_is_delivered_and_answered_through_another(
    store: Store, other: Store
) -> None:
    h = wait(store.enroll_host(host(1), now=1.0))
    wait(store.record_device_enrollment(enrollment("DEV1", h.id, "serial1", hw=None), now=2.0))
    queued = wait(store.queue_command("DEV1", "cmd-1", "Get", "<Get/>", now=3.0))
    assert queued is not None
    ctx = wait(other.management_context("serial1"))
    assert ctx is not None and ctx.queue == (QueuedCommand("cmd-1", "<Get/>"),)
    wait(
        other.commit_management_step(
            ManagementStep("DEV1", _session(), reply=b"r", answered=(("cmd-1", 200),)),
            now=4.0,
            expected_seq=ctx.session_seq,
        )
    )
    command = wait(store.command("cmd-1"))
    assert command is not None and command.state == "acknowledged" and command.status == 200


def test_of_two_hosts_enrolling_one_device_id_at_once_through_two_nodes_one_is_refused(
    store: Store, other: Store
) -> None:
    from mdmd.store import DeviceConflict

    for n in range(5):
        first = wait(store.enroll_host(host(2 * n + 1), now=1.0))
        second = wait(other.enroll_host(host(2 * n + 2), now=1.0))
        device_id = f"SHARED{n}"
        attempts = [
            store.record_device_enrollment(enrollment(device_id, first.id, f"s{n}a", hw=None), now=2.0),
            other.record_device_enrollment(enrollment(device_id, second.id, f"s{n}b", hw=None), now=2.0),
        ]
        outcomes = []
        for d in attempts:
            try:
                wait(d)
                outcomes.append("enrolled")
            except DeviceConflict:
                outcomes.append("refused")
        assert sorted(outcomes) == ["enrolled", "refused"]
        owner = (first, second)[outcomes.index("enrolled")]
        device = wait(other.device(device_id))
        assert device is not None and device.host_id == owner.id
        assert [c.serial for c in wait(store.device_certificates(device_id))] == [
            f"s{n}{'ab'[outcomes.index('enrolled')]}"
        ]
