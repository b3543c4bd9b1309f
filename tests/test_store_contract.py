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

from mdmd.actions import ActionRequest, ActionStep, action_command, settle, shown_state
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
from mdmd.store import (
    AdminToken,
    AssignmentOutcome,
    AuditEntry,
    AuditQuery,
    CertificateRenewal,
    ConsoleSessionRecord,
    DeviceQuery,
    LoggedMessage,
    MessageLogWrite,
    NewAction,
    NewOperation,
    OperationRecord,
    RenewalRefused,
    SessionConflict,
    Store,
)
from store_helpers import (
    BACKENDS,
    ListFleet,
    build_list_fleet,
    enrollment,
    expected_devices,
    host,
    read_all_pages,
    wait,
)


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


def test_the_enrolling_host_and_the_devices_owner_are_read_together(store: Store) -> None:
    a = wait(store.enroll_host(host(1), now=1.0))
    b = wait(store.enroll_host(host(2), now=1.0))
    key_a = hashlib.sha256(b"key-1").digest()
    looked = wait(store.enrolling_host(key_a, "DEV1"))
    assert looked.host is not None and looked.host.id == a.id
    assert not looked.device_enrolled and looked.device_host_id is None
    assert wait(store.enrolling_host(hashlib.sha256(b"nope").digest(), "DEV1")).host is None
    wait(store.record_device_enrollment(enrollment("DEV1", b.id, "aa"), now=2.0))
    for spelling in ("DEV1", "dev1"):
        looked = wait(store.enrolling_host(key_a, spelling))
        assert looked.host is not None and looked.host.id == a.id
        assert looked.device_enrolled and looked.device_host_id == b.id
    # The host's next device replaces DEV1, which is enrolled no more.
    wait(store.record_device_enrollment(enrollment("DEV2", b.id, "bb"), now=3.0))
    looked = wait(store.enrolling_host(key_a, "DEV1"))
    assert not looked.device_enrolled and looked.device_host_id is None


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
    assert ctx.last_reply is None and [c.uuid for c in ctx.queue] == ["cmd-DEV1"]
    assert wait(store.last_reply("DEV1")) == b"<SyncML>1</SyncML>"
    # The same message again reads its reply instead of the queue.
    again = wait(store.management_context("serial1", request_digest="ab" * 32))
    assert again is not None and again.last_reply == b"<SyncML>1</SyncML>" and again.queue == ()
    other = wait(store.management_context("serial1", request_digest="ef" * 32))
    assert other is not None and other.last_reply is None and len(other.queue) == 1
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
    # The same, read along with a message's context when asked for (and only then).
    with_it = wait(store.management_context("serial1", with_profile_context=True))
    assert with_it is not None and with_it.profile_context == context
    without = wait(store.management_context("serial1"))
    assert without is not None and without.profile_context is None


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
    # DEV1 (its record kept) is replaced on its host by DEV3: the group all
    # now means DEV2 and DEV3, neither of which has had the profile.
    h = wait(store.enroll_host(host(1), now=4.0))
    wait(store.record_device_enrollment(enrollment("DEV3", h.id, "serial3", hw=None), now=4.0))
    assert wait(store.profile_status("p1")) == {"pending": 2, "failed": 1}


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


# --- the device list ---

LIST_QUERIES = [
    DeviceQuery(),
    DeviceQuery(descending=True),
    DeviceQuery(sort="last_seen"),
    DeviceQuery(sort="last_seen", descending=True),
    DeviceQuery(state="enrolled"),
    DeviceQuery(state="unenrolled", sort="last_seen"),
    DeviceQuery(last_seen_before=105.0),
    DeviceQuery(last_seen_after=105.0, sort="last_seen", descending=True),
    DeviceQuery(last_seen_after=101.0, last_seen_before=110.0),
    DeviceQuery(os_version="10.0.22631"),
    DeviceQuery(os_version="10.0.19045.1", descending=True),
    DeviceQuery(cert_expiring_before=1250.0),
    DeviceQuery(hw_dev_id_collision=True),
    DeviceQuery(hw_dev_id_collision=False, sort="last_seen"),
    DeviceQuery(search="desktop-0"),
    DeviceQuery(search="0A"),
    DeviceQuery(search="sn3"),
    DeviceQuery(search="1AAB-U"),
    DeviceQuery(search="pc-2", state="enrolled", sort="last_seen"),
    DeviceQuery(search="nothing-like-this"),
]


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def listed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Store, ListFleet]]:
    """A store holding the reference fleet (read only: built once)."""
    s = BACKENDS[request.param](tmp_path_factory.mktemp("list"))
    s.start()
    try:
        yield s, build_list_fleet(s)
    finally:
        s.stop()


@pytest.mark.parametrize("query", LIST_QUERIES, ids=repr)
def test_the_device_list_pages_through_exactly_the_matching_devices_in_order(
    listed: tuple[Store, ListFleet], query: DeviceQuery
) -> None:
    store, fleet = listed
    expected = expected_devices(store, fleet, query)
    for limit in (1, 4, 100):
        assert read_all_pages(store, query, limit) == expected, limit


def test_the_reference_fleet_exercises_every_filter(listed: tuple[Store, ListFleet]) -> None:
    # The listing test proves little if a filter matches everything or nothing.
    store, fleet = listed
    total = len(wait(store.devices()))
    for query in LIST_QUERIES[4:-1]:
        assert 0 < len(expected_devices(store, fleet, query)) < total, query


def test_a_page_knows_whether_more_follow(listed: tuple[Store, ListFleet]) -> None:
    store, fleet = listed
    everything = expected_devices(store, fleet, DeviceQuery())
    page = wait(store.device_page(DeviceQuery(), limit=len(everything)))
    assert [d.device_id for d in page.devices] == everything and page.after is None
    page = wait(store.device_page(DeviceQuery(), limit=len(everything) - 1))
    assert page.after == (page.devices[-1].enrolled_at, page.devices[-1].device_id)


def test_devices_are_found_by_id_in_any_letter_case(store: Store) -> None:
    h = wait(store.enroll_host(host(1), now=1.0))
    wait(store.record_device_enrollment(enrollment("AbCdEf01", h.id, "aa"), now=2.0))
    for spelling in ("AbCdEf01", "abcdef01", "ABCDEF01"):
        found = wait(store.device(spelling))
        assert found is not None and found.device_id == "AbCdEf01"
        record = wait(store.queue_command(spelling, f"u-{spelling}", "Get", "<Get/>", now=3.0))
        assert record is not None and record.device_id == "AbCdEf01"
    assert wait(store.request_unenrollment("abcDEF01")) is True
    assert wait(store.device("abcdef0")) is None


def test_another_host_cannot_enroll_a_device_id_differing_only_in_case(store: Store) -> None:
    from mdmd.store import DeviceConflict

    a = wait(store.enroll_host(host(1), now=1.0))
    b = wait(store.enroll_host(host(2), now=1.0))
    wait(store.record_device_enrollment(enrollment("DEV1", a.id, "aa"), now=2.0))
    with pytest.raises(DeviceConflict):
        wait(store.record_device_enrollment(enrollment("dev1", b.id, "bb"), now=3.0))
    assert wait(store.certificate("bb")) is None


# --- administrators: tokens and the audit log ---


def _token(name: str, secret: bytes, at: float = 1.0) -> AdminToken:
    return AdminToken(
        name=name, token_hash=hashlib.sha256(secret).digest(), created_at=at, created_by="admin"
    )


def _entry(action: str, target: str, at: float = 5.0, actor: str = "admin") -> AuditEntry:
    return AuditEntry(at=at, actor=actor, action=action, target=target, detail={"n": 1}, client="127.0.0.1")


def test_tokens_are_created_listed_and_revoked_with_their_audit(store: Store) -> None:
    assert wait(store.adopt_bootstrap_token("admin", hashlib.sha256(b"boot").digest(), now=1.0)) == "created"
    created = wait(store.create_admin_token(_token("ci", b"one"), audit=_entry("token.create", "ci")))
    assert created is True
    assert wait(store.create_admin_token(_token("ci", b"two"))) is False
    tokens = {t.name: t for t in wait(store.admin_tokens())}
    assert set(tokens) == {"admin", "ci"}
    assert tokens["ci"].token_hash == hashlib.sha256(b"one").digest() and tokens["ci"].revoked_at is None
    assert wait(store.revoke_admin_token("nope", 2.0)) == "unknown"
    result = wait(store.revoke_admin_token("ci", 3.0, by="admin", audit=_entry("token.revoke", "ci")))
    assert result == "revoked"
    revoked = {t.name: t for t in wait(store.admin_tokens())}["ci"]
    assert revoked.revoked_at == 3.0 and revoked.revoked_by == "admin"
    # The last active token stays: nobody can lock every administrator out.
    assert wait(store.revoke_admin_token("admin", 4.0)) == "last"
    # A revoked name can be given to a new token.
    assert wait(store.create_admin_token(_token("ci", b"three", at=6.0))) is True
    again = {t.name: t for t in wait(store.admin_tokens())}["ci"]
    assert again.revoked_at is None and again.token_hash == hashlib.sha256(b"three").digest()
    actions = [r.entry.action for r in wait(store.audit_log(AuditQuery()))]
    assert actions == ["token.revoke", "token.create"]


def _console_session(n: int, at: float) -> ConsoleSessionRecord:
    return ConsoleSessionRecord(bytes([n]) * 32, "alice", b"\x01" * 32, f"csrf-{n}", at, at)


def test_console_sessions_are_used_until_they_end_and_the_newest_are_kept(store: Store) -> None:
    ends = {"lifetime": 100.0, "idle": 30.0}
    wait(store.start_console_session(_console_session(1, 10.0), keep=3, **ends))
    used = wait(store.use_console_session(bytes([1]) * 32, 30.0, **ends))
    assert used == replace(_console_session(1, 10.0), used_at=30.0)
    assert wait(store.use_console_session(bytes([1]) * 32, 55.0, **ends)) is not None  # idle 25 s
    assert wait(store.use_console_session(bytes([1]) * 32, 85.0, **ends)) is None  # idle 30 s: ended
    assert wait(store.use_console_session(bytes([1]) * 32, 86.0, **ends)) is None  # and gone
    assert wait(store.use_console_session(b"\x09" * 32, 86.0, **ends)) is None
    # The lifetime, however busy.
    wait(store.start_console_session(_console_session(2, 100.0), keep=3, **ends))
    for at in (125.0, 150.0, 175.0):
        assert wait(store.use_console_session(bytes([2]) * 32, at, **ends)) is not None
    assert wait(store.use_console_session(bytes([2]) * 32, 200.0, **ends)) is None
    # At most keep: the oldest go first.
    for n in range(3, 8):
        wait(store.start_console_session(_console_session(n, 200.0 + n), keep=3, **ends))
    alive = [wait(store.use_console_session(bytes([n]) * 32, 210.0, **ends)) is not None for n in range(3, 8)]
    assert alive == [False, False, True, True, True]
    ended = wait(store.end_console_session(bytes([7]) * 32))
    assert ended is not None and ended.csrf == "csrf-7"
    assert wait(store.end_console_session(bytes([7]) * 32)) is None
    assert wait(store.use_console_session(bytes([7]) * 32, 211.0, **ends)) is None


def test_a_new_console_session_makes_room_from_the_ended_ones_first(store: Store) -> None:
    ends = {"lifetime": 100.0, "idle": 30.0}
    wait(store.start_console_session(_console_session(1, 10.0), keep=2, **ends))
    wait(store.start_console_session(_console_session(2, 20.0), keep=2, **ends))
    assert wait(store.use_console_session(bytes([1]) * 32, 35.0, **ends)) is not None
    # At 50 the second (unused since 20) has ended, the older first has not:
    # the third takes the ended one's place.
    wait(store.start_console_session(_console_session(3, 50.0), keep=2, **ends))
    assert wait(store.use_console_session(bytes([1]) * 32, 51.0, **ends)) is not None
    assert wait(store.use_console_session(bytes([3]) * 32, 51.0, **ends)) is not None


def test_the_bootstrap_token_follows_its_file_unless_revoked(store: Store) -> None:
    first, second = hashlib.sha256(b"first").digest(), hashlib.sha256(b"second").digest()
    assert wait(store.adopt_bootstrap_token("admin", first, now=1.0)) == "created"
    assert wait(store.adopt_bootstrap_token("admin", first, now=2.0)) == "unchanged"
    assert wait(store.adopt_bootstrap_token("admin", second, now=3.0)) == "updated"
    assert {t.name: t.token_hash for t in wait(store.admin_tokens())} == {"admin": second}
    wait(store.create_admin_token(_token("other", b"x")))
    assert wait(store.revoke_admin_token("admin", 4.0)) == "revoked"
    assert wait(store.adopt_bootstrap_token("admin", first, now=5.0)) == "revoked"
    admin = {t.name: t for t in wait(store.admin_tokens())}["admin"]
    assert admin.revoked_at == 4.0 and admin.token_hash == second


def test_an_audited_write_and_its_record_commit_together(store: Store) -> None:
    h = wait(store.enroll_host(host(1), now=1.0))
    wait(store.record_device_enrollment(enrollment("DEV1", h.id, "aa"), now=2.0))
    entry = _entry("command.queue", "DEV1")
    assert wait(store.queue_command("DEV1", "u1", "Get", "<Get/>", now=3.0, audit=entry)) is not None
    # Nothing written, nothing recorded.
    assert wait(store.queue_command("NOPE", "u2", "Get", "<Get/>", now=3.0, audit=entry)) is None
    assert wait(store.request_unenrollment("NOPE", audit=_entry("device.unenroll", "NOPE"))) is False
    assert wait(store.request_unenrollment("dev1", audit=_entry("device.unenroll", "DEV1"))) is True
    records = wait(store.audit_log(AuditQuery()))
    assert [(r.entry.action, r.entry.target) for r in records] == [
        ("device.unenroll", "DEV1"),
        ("command.queue", "DEV1"),
    ]
    assert records[1].entry == entry


def test_the_audit_log_pages_newest_first_and_filters(store: Store) -> None:
    for n in range(7):
        wait(store.record_audit(_entry("a" if n % 2 else "b", f"t{n % 3}", at=float(n), actor=f"u{n % 2}")))
    first = wait(store.audit_log(AuditQuery(limit=3)))
    assert [r.entry.at for r in first] == [6.0, 5.0, 4.0]
    rest = wait(store.audit_log(AuditQuery(limit=10, before_id=first[-1].id)))
    assert [r.entry.at for r in rest] == [3.0, 2.0, 1.0, 0.0]
    assert [r.entry.at for r in wait(store.audit_log(AuditQuery(actor="u1")))] == [5.0, 3.0, 1.0]
    assert [r.entry.at for r in wait(store.audit_log(AuditQuery(action="b", target="t0")))] == [6.0, 0.0]


# --- operations ---


def test_fleet_counts_for_the_metrics(store: Store) -> None:
    now = 1_000_000.0
    a = wait(store.enroll_host(host(1), now=1.0))
    b = wait(store.enroll_host(host(2), now=1.0))
    soon = replace(enrollment("DEV1", a.id, "aa"), cert_not_after=now + 86400)
    later = replace(enrollment("DEV2", b.id, "bb", hw="other"), cert_not_after=now + 40 * 86400)
    wait(store.record_device_enrollment(soon, now=2.0))
    wait(store.record_device_enrollment(later, now=2.0))
    wait(
        store.record_device_enrollment(
            replace(enrollment("DEV3", b.id, "cc"), cert_not_after=now + 10), now=3.0
        )
    )
    wait(store.queue_command("DEV1", "u1", "Get", "<Get/>", now=3.0))
    wait(store.queue_command("DEV1", "u2", "Get", "<Get/>", now=3.0))
    wait(store.commit_management_step(ManagementStep("DEV1", session=None, answered=(("u1", 200),)), now=4.0))
    counts = wait(store.fleet_counts(now))
    assert counts["devices"] == {"enrolled": 2, "unenrolled": 1}
    assert counts["commands"] == {"pending": 1, "sent": 0, "acknowledged": 1, "failed": 0}
    # DEV2's certificate was revoked when DEV3 replaced it on host b.
    assert counts["certificates_expiring"] == {"": 2}


def test_the_store_says_its_schema_version(store: Store) -> None:
    assert isinstance(store.schema_version, int) and store.schema_version >= 1


def test_a_writable_store_commits_the_readiness_probe(store: Store) -> None:
    wait(store.check_writable(1.0))
    wait(store.check_writable(2.0))


def test_the_device_list_filters_by_group(store: Store) -> None:
    for n, device_id in enumerate(("DEV1", "DEV2", "DEV3"), start=1):
        _enrolled_with_command(store, device_id, n)
    wait(store.create_group("g", 1.0))
    wait(store.change_group_members("g", ["DEV3", "DEV1"], [], 2.0))
    assert read_all_pages(store, DeviceQuery(group="g"), 1) == ["DEV1", "DEV3"]
    assert read_all_pages(store, DeviceQuery(group="g", descending=True), 5) == ["DEV3", "DEV1"]
    assert read_all_pages(store, DeviceQuery(group="all"), 2) == ["DEV1", "DEV2", "DEV3"]
    assert read_all_pages(store, DeviceQuery(group="nobody"), 2) == []


# --- device actions and group operations ---


def _new_action(kind: str, n: int, **options: object) -> NewAction:
    request = ActionRequest.from_options(kind, options)
    queued = action_command(request, provider_id="mdmd")
    return NewAction(f"act-{n}", f"cmd-act-{n}", kind, request.options(), queued.verb, queued.body)


def _enrolled_for_actions(store: Store, device_id: str, n: int) -> None:
    h = wait(store.enroll_host(host(n), now=1.0))
    wait(store.record_device_enrollment(enrollment(device_id, h.id, f"serial{n}", hw=None), now=2.0))


def _settle_and_commit(store: Store, serial: str, step: ManagementStep, now: float) -> ActionStep:
    ctx = wait(store.management_context(serial))
    assert ctx is not None
    actions = settle(ctx.actions, step)
    wait(store.commit_management_step(step, now, actions=actions))
    return actions


def test_an_action_is_queued_with_its_command_and_shown_on_the_device(store: Store) -> None:
    assert wait(store.request_action("NOPE", _new_action("restart", 0), now=3.0)).result == "no_device"
    _enrolled_for_actions(store, "DEV1", 1)
    outcome = wait(store.request_action("DEV1", _new_action("wipe", 1, mode="protected"), now=3.0))
    assert outcome.result == "queued" and outcome.action is not None
    assert (outcome.action.state, outcome.action.options) == ("pending", {"mode": "protected"})
    command = wait(store.command("cmd-act-1"))
    assert command is not None and command.verb == "Exec" and "doWipeProtected" in command.body
    device = wait(store.device("DEV1"))
    assert device is not None and device.lifecycle == "wipe_pending" and device.pending_actions == ("wipe",)
    # The same action again is refused while it is queued; another is not.
    assert (
        wait(store.request_action("DEV1", _new_action("wipe", 2, mode="wipe"), now=4.0)).result == "pending"
    )
    assert wait(store.request_action("DEV1", _new_action("restart", 3), now=4.0)).result == "queued"
    listed = {d.device_id: d for d in wait(store.devices())}
    assert listed["DEV1"].pending_actions == ("wipe", "restart")
    assert [a.action_id for a in wait(store.device_actions("DEV1"))] == ["act-3", "act-1"]
    ctx = wait(store.management_context("serial1"))
    assert ctx is not None and {a.action for a in ctx.actions} == {"wipe", "restart"}
    assert wait(store.command("act-2")) is None and wait(store.command("cmd-act-2")) is None


def test_an_mdm_unenrollment_also_asks_the_agent(store: Store) -> None:
    _enrolled_for_actions(store, "DEV1", 1)
    assert wait(store.request_action("DEV1", _new_action("unenroll", 1), now=3.0)).result == "queued"
    found = wait(store.host_by_node_key(hashlib.sha256(b"key-1").digest()))
    assert found is not None and found.unenroll_requested
    device = wait(store.device("DEV1"))
    assert device is not None and device.lifecycle == "unenroll_pending"


def test_an_accepted_wipe_unenrolls_revokes_and_cancels_what_is_queued(store: Store) -> None:
    _enrolled_for_actions(store, "DEV1", 1)
    wait(store.request_action("DEV1", _new_action("wipe", 1), now=3.0))
    wait(store.request_action("DEV1", _new_action("defender_update", 2), now=3.0))
    wait(store.queue_command("DEV1", "plain", "Get", "<Get/>", now=3.0))
    sent = ManagementStep("DEV1", session=_session(), sent=(("cmd-act-1", "1A", 1),))
    _settle_and_commit(store, "serial1", sent, now=4.0)
    device = wait(store.device("DEV1"))
    assert device is not None and device.lifecycle == "wipe_pending"
    answered = ManagementStep("DEV1", session=None, answered=(("cmd-act-1", 200),))
    assert _settle_and_commit(store, "serial1", answered, now=5.0).ended == "wiped"
    device = wait(store.device("DEV1"))
    assert device is not None and (device.state, device.lifecycle) == ("unenrolled", "wiped")
    assert shown_state(device.state, device.lifecycle) == "wiped" and device.pending_actions == ()
    cert = wait(store.certificate("serial1"))
    assert cert is not None and cert.revoked_at == 5.0
    wipe, plain = wait(store.command("cmd-act-1")), wait(store.command("plain"))
    assert wipe is not None and (wipe.state, wipe.status) == ("acknowledged", 200)
    assert plain is not None and (plain.state, plain.status) == ("failed", None)
    assert plain.detail == "cancelled: the device was wiped"
    states = {a.action: a.state for a in wait(store.device_actions("DEV1"))}
    assert states == {"wipe": "acknowledged", "defender_update": "cancelled"}
    ctx = wait(store.management_context("serial1"))
    assert ctx is not None and ctx.queue == () and ctx.session is None
    # Nothing more for it.
    assert wait(store.request_action("DEV1", _new_action("restart", 3), now=6.0)).result == "wiped"
    assert wait(store.queue_command("DEV1", "late", "Get", "<Get/>", now=6.0)) is None
    # A fresh enrollment of the same ID is an enrolled device again.
    wait(store.record_device_enrollment(enrollment("DEV1", 1, "serial9", hw=None), now=7.0))
    device = wait(store.device("DEV1"))
    assert device is not None and shown_state(device.state, device.lifecycle) == "enrolled"


def test_a_failed_wipe_leaves_the_device_as_it_was(store: Store) -> None:
    _enrolled_for_actions(store, "DEV1", 1)
    wait(store.request_action("DEV1", _new_action("wipe", 1), now=3.0))
    _settle_and_commit(
        store, "serial1", ManagementStep("DEV1", _session(), answered=(("cmd-act-1", 404),)), 4.0
    )
    device = wait(store.device("DEV1"))
    assert device is not None and (device.state, device.lifecycle) == ("enrolled", None)
    (wipe,) = wait(store.device_actions("DEV1"))
    assert (wipe.state, wipe.status) == ("failed", 404) and "404 Not found" in (wipe.detail or "")
    # It may be asked again.
    assert wait(store.request_action("DEV1", _new_action("wipe", 2), now=5.0)).result == "queued"


def test_alert_1226_confirms_an_unenrollment_the_device_never_answered(store: Store) -> None:
    _enrolled_for_actions(store, "DEV1", 1)
    wait(store.request_action("DEV1", _new_action("unenroll", 1), now=3.0))
    _settle_and_commit(
        store, "serial1", ManagementStep("DEV1", _session(), sent=(("cmd-act-1", "1A", 2),)), 4.0
    )
    _settle_and_commit(store, "serial1", ManagementStep("DEV1", session=None, unenroll=True), 5.0)
    device = wait(store.device("DEV1"))
    assert device is not None and (device.state, device.lifecycle) == ("unenrolled", None)
    assert shown_state(device.state, device.lifecycle) == "unenrolled"
    command = wait(store.command("cmd-act-1"))
    assert command is not None and (command.state, command.status) == ("acknowledged", None)
    assert command.detail == "confirmed by the device's Alert 1226"
    (unenroll,) = wait(store.device_actions("DEV1"))
    assert unenroll.state == "acknowledged"
    cert = wait(store.certificate("serial1"))
    assert cert is not None and cert.revoked_at == 5.0
    assert wait(store.request_action("DEV1", _new_action("unenroll", 2), now=6.0)).result == "unenrolled"


def test_a_new_rename_replaces_one_waiting_for_a_restart(store: Store) -> None:
    _enrolled_for_actions(store, "DEV1", 1)
    wait(store.request_action("DEV1", _new_action("rename", 1, name="A-1"), now=3.0))
    assert (
        wait(store.request_action("DEV1", _new_action("rename", 2, name="A-2"), now=3.0)).result == "pending"
    )
    _settle_and_commit(
        store, "serial1", ManagementStep("DEV1", _session(), answered=(("cmd-act-1", 200),)), 4.0
    )
    (first,) = wait(store.device_actions("DEV1"))
    assert first.state == "awaiting_restart"
    assert (
        wait(store.request_action("DEV1", _new_action("rename", 3, name="A-3"), now=5.0)).result == "queued"
    )
    states = {a.options["name"]: a.state for a in wait(store.device_actions("DEV1"))}
    assert states == {"A-1": "cancelled", "A-3": "pending"}


def _operation(group: str, n: int, kind: str = "action") -> NewOperation:
    queued = action_command(ActionRequest("restart"), provider_id="mdmd")
    return NewOperation(
        f"op-{n}", kind, group, queued.verb, queued.body, "restart" if kind == "action" else None, {}
    )


def test_operations_need_an_existing_group(store: Store) -> None:
    assert wait(store.create_operation(_operation("nope", 1), now=1.0)) is False
    assert wait(store.operation("op-1")) is None
    assert wait(store.create_operation(_operation("all", 2), now=1.0)) is True
    op = wait(store.operation("op-2"))
    assert op is not None and (op.state, op.total, op.queued) == ("pending", None, 0)


def test_a_lease_is_held_by_one_owner_until_it_expires_or_its_owner_is_dead(store: Store) -> None:
    wait(store.create_operation(_operation("all", 1), now=1.0))
    first = wait(store.claim_operation("node-a/1", now=10.0, lease_until=40.0))
    assert first is not None and (first.state, first.lease_owner) == ("queuing", "node-a/1")
    assert wait(store.claim_operation("node-b/1", now=20.0, lease_until=50.0)) is None
    # Its own owner may claim it again (a restart on the same node).
    again = wait(store.claim_operation("node-a/1", now=20.0, lease_until=50.0))
    assert again is not None and again.lease_until == 50.0
    # A dead owner's lease is taken over at once; an expired one by anyone.
    taken = wait(store.claim_operation("node-a/2", now=21.0, lease_until=51.0, takeover=["node-a/1"]))
    assert taken is not None and taken.lease_owner == "node-a/2"
    assert wait(store.fan_out("op-1", "node-a/1", 22.0, 52.0, limit=10)) is None  # lost it
    expired = wait(store.claim_operation("node-b/1", now=60.0, lease_until=90.0))
    assert expired is not None and expired.lease_owner == "node-b/1"
    leases = wait(store.operation_leases())
    assert [(o.operation_id, o.lease_owner) for o in leases] == [("op-1", "node-b/1")]
    wait(store.release_operation("op-1", "node-b/1"))
    released = wait(store.claim_operation("node-c/1", now=61.0, lease_until=91.0))
    assert released is not None and released.lease_owner == "node-c/1"


def test_a_fan_out_queues_each_member_once_in_batches_and_counts_progress(store: Store) -> None:
    ids = [f"DEV{n}" for n in range(5)]
    for n, device_id in enumerate(ids, start=1):
        _enrolled_for_actions(store, device_id, n)
    wait(store.create_group("desks", now=1.0))
    wait(store.change_group_members("desks", ids, [], now=1.0))
    # DEV0 has a restart pending already, DEV1 left: both are skipped.
    wait(store.request_action("DEV0", _new_action("restart", 1), now=2.0))
    _settle_and_commit(store, "serial2", ManagementStep("DEV1", None, unenroll=True), 2.0)
    wait(store.create_operation(_operation("desks", 7), now=3.0))
    claimed = wait(store.claim_operation("me", now=3.0, lease_until=30.0))
    assert claimed is not None
    first = wait(store.fan_out("op-7", "me", 4.0, 34.0, limit=2, total=5))
    assert first is not None and (first.state, first.total, first.queued, first.skipped) == (
        "queuing",
        5,
        0,
        2,
    )
    assert first.lease_until == 34.0
    second = wait(store.fan_out("op-7", "me", 5.0, 35.0, limit=2))
    assert second is not None and (second.state, second.queued) == ("queuing", 2)
    last = wait(store.fan_out("op-7", "me", 6.0, 36.0, limit=2))
    assert last is not None and (last.state, last.total, last.queued, last.skipped) == ("delivering", 5, 3, 2)
    assert last.lease_owner is None
    assert wait(store.fan_out("op-7", "me", 7.0, 37.0, limit=2)) is None  # nothing left to do
    per_device = {d: [a for a in wait(store.device_actions(d)) if a.operation_id == "op-7"] for d in ids}
    assert {d: len(a) for d, a in per_device.items()} == {
        "DEV0": 0,
        "DEV1": 0,
        "DEV2": 1,
        "DEV3": 1,
        "DEV4": 1,
    }
    # Answers count, and the last one finishes it.
    for n, device_id in enumerate(ids[2:], start=3):
        (act,) = per_device[device_id]
        code = 200 if device_id != "DEV4" else 404
        _settle_and_commit(
            store, f"serial{n}", ManagementStep(device_id, None, answered=((act.command_uuid, code),)), 8.0
        )
    done = wait(store.operation("op-7"))
    assert done is not None and (done.state, done.acknowledged, done.failed) == ("done", 2, 1)
    assert done.finished_at == 8.0


def test_a_command_operation_reaches_every_enrolled_device_of_all(store: Store) -> None:
    for n, device_id in enumerate(["A", "B", "C"], start=1):
        _enrolled_for_actions(store, device_id, n)
    wait(store.create_operation(_operation("all", 1, kind="command"), now=3.0))
    assert wait(store.claim_operation("me", now=3.0, lease_until=30.0)) is not None
    done = wait(store.fan_out("op-1", "me", 4.0, 34.0, limit=10))
    assert done is not None and (done.state, done.total, done.queued) == ("delivering", 3, 3)
    for device_id in ("A", "B", "C"):
        (command,) = wait(store.device_commands(device_id))
        assert command.operation_id == "op-1" and command.verb == "Exec"
    # A device that leaves counts its cancelled command as failed.
    _settle_and_commit(store, "serial1", ManagementStep("A", None, unenroll=True), 5.0)
    op = wait(store.operation("op-1"))
    assert op is not None and (op.failed, op.state) == (1, "delivering")


def test_a_group_wipe_or_unenrollment_sets_each_members_lifecycle(store: Store) -> None:
    for n, device_id in enumerate(["A", "B", "C"], start=1):
        _enrolled_for_actions(store, device_id, n)
    wait(store.request_action("A", _new_action("wipe", 1), now=2.0))
    wait(store.request_action("B", _new_action("unenroll", 2), now=2.0))

    def fan(kind: str, n: int, **options: object) -> OperationRecord:
        queued = action_command(ActionRequest.from_options(kind, options), provider_id="mdmd")
        wait(
            store.create_operation(
                NewOperation(f"op-{n}", "action", "all", queued.verb, queued.body, kind, options), 3.0
            )
        )
        assert wait(store.claim_operation("me", now=3.0, lease_until=30.0)) is not None
        done = wait(store.fan_out(f"op-{n}", "me", 4.0, 34.0, limit=10))
        assert done is not None
        return done

    unenroll = fan("unenroll", 7)
    assert (unenroll.queued, unenroll.skipped) == (2, 1)  # B has one pending
    lifecycles = {d.device_id: d.lifecycle for d in wait(store.devices())}
    assert lifecycles == {"A": "wipe_pending", "B": "unenroll_pending", "C": "unenroll_pending"}
    found = wait(store.host_by_node_key(hashlib.sha256(b"key-3").digest()))
    assert found is not None and found.unenroll_requested
    wipe = fan("wipe", 8, mode="wipe")
    assert (wipe.queued, wipe.skipped) == (2, 1)  # A has one pending
    assert {d.lifecycle for d in wait(store.devices())} == {"wipe_pending"}


# --- the web console (issue 17): message log, fleet counts, lists ---


def _logged(direction: str, at: float, msg_id: int, body: bytes = b"<SyncML/>") -> LoggedMessage:
    return LoggedMessage(direction, at, "7", msg_id, len(body), body)


def test_the_message_log_keeps_the_latest_messages_of_each_device(store: Store) -> None:
    _enrolled_with_command(store, "DEV1", 1)
    _enrolled_with_command(store, "DEV2", 2)
    for n in range(1, 5):
        messages = MessageLogWrite(
            (_logged("in", float(n), n), _logged("out", float(n), n, b"<r%d/>" % n)), 5
        )
        wait(store.commit_management_step(ManagementStep("DEV1", _session()), float(n), messages=messages))
    other = MessageLogWrite((_logged("in", 9.0, 1, b"\x00" * 100_000),), 5)
    wait(store.commit_management_step(ManagementStep("DEV2", _session()), 9.0, messages=other))
    log = wait(store.device_messages("DEV1", limit=50))
    # The latest 5 of 8, newest first, bodies as given.
    assert [(m.direction, m.msg_id) for m in log] == [
        ("out", 4),
        ("in", 4),
        ("out", 3),
        ("in", 3),
        ("out", 2),
    ]
    assert log[0].body == b"<r4/>" and log[0].size == 5 and log[0].session_id == "7" and log[0].at == 4.0
    assert [m.msg_id for m in wait(store.device_messages("DEV1", limit=2))] == [4, 4]
    (big,) = wait(store.device_messages("DEV2"))
    assert big.body == b"\x00" * 100_000 and big.size == 100_000 and big.truncated is False
    # keep 0 (the log switched off) empties the device's log; the other's stays.
    wait(
        store.commit_management_step(
            ManagementStep("DEV1", _session()), 10.0, messages=MessageLogWrite((), 0)
        )
    )
    assert wait(store.device_messages("DEV1")) == []
    assert len(wait(store.device_messages("DEV2"))) == 1


def test_a_refused_step_logs_no_message(store: Store) -> None:
    _enrolled_with_command(store, "DEV1", 1)
    ctx = wait(store.management_context("serial1"))
    assert ctx is not None
    wait(store.commit_management_step(ManagementStep("DEV1", _session()), 2.0))
    messages = MessageLogWrite((_logged("in", 3.0, 2),), 50)
    with pytest.raises(SessionConflict):
        wait(
            store.commit_management_step(
                ManagementStep("DEV1", _session()), 3.0, expected_seq=ctx.session_seq, messages=messages
            )
        )
    assert wait(store.device_messages("DEV1")) == []


def test_a_devices_groups_and_a_profiles_devices_page_by_page(store: Store) -> None:
    for n in range(1, 6):
        _enrolled_with_command(store, f"DEV{n}", n)
    wait(store.create_group("b", 1.0))
    wait(store.create_group("a", 1.0))
    wait(store.change_group_members("b", ["DEV1", "DEV2"], [], 1.0))
    wait(store.change_group_members("a", ["DEV1"], [], 1.0))
    assert wait(store.device_groups("DEV1")) == ["a", "b"]
    assert wait(store.group_names()) == ["all", "a", "b"]
    assert wait(store.device_groups("DEV3")) == []
    wait(store.create_profile(_profile("p1"), 1.0))
    for n, state in ((1, "verified"), (2, "failed"), (3, "verified"), (4, "pending")):
        record = DeviceProfile("p1", "v1", state, status=500 if state == "failed" else None, updated_at=2.0)
        wait(
            store.commit_management_step(
                ManagementStep(f"DEV{n}", _session()), 2.0, profiles=ProfileStep((record,))
            )
        )
    seen: list[tuple[str, str]] = []
    after = None
    while True:
        page = wait(store.profile_devices("p1", after=after, limit=3))
        seen += [(r.device_id, r.state) for r in page]
        if len(page) < 3:
            break
        after = page[-1].position
    assert sorted(seen) == [
        ("DEV1", "verified"),
        ("DEV2", "failed"),
        ("DEV3", "verified"),
        ("DEV4", "pending"),
    ]
    assert [s for _, s in seen] == sorted(s for _, s in seen)  # by state
    failed = wait(store.profile_devices("p1", state="failed"))
    assert [(r.device_id, r.status) for r in failed] == [("DEV2", 500)]
    assert wait(store.profile_devices("nope")) == []


def test_operations_are_listed_newest_first(store: Store) -> None:
    for n in range(3):
        wait(store.create_operation(_operation("all", n), now=float(n)))
    assert [o.operation_id for o in wait(store.operations())] == ["op-2", "op-1", "op-0"]
    assert [o.operation_id for o in wait(store.operations(limit=1))] == ["op-2"]


def test_fleet_counts_for_the_console(store: Store) -> None:
    now = 100 * 86400.0 + 3600.0
    seen_at = {1: now - 60, 2: now - 7200, 3: now - 3 * 86400, 4: now - 30 * 86400}
    for n in range(1, 7):
        h = wait(store.enroll_host(host(n), now=1.0))
        enrolled_at = now - 86400 * (n - 1) if n < 6 else now - 90 * 86400
        wait(
            store.record_device_enrollment(enrollment(f"DEV{n}", h.id, f"s{n}", hw=f"hw{n}"), now=enrolled_at)
        )
    # DEV5 never checked in; DEV6 leaves.
    wait(store.commit_management_step(ManagementStep("DEV6", None, unenroll=True), now - 90 * 86400))
    wait(store.create_profile(_profile("everyone"), 1.0))
    wait(store.create_profile(_profile("some"), 1.0))
    wait(store.create_profile(_profile("nobody"), 1.0))
    wait(store.create_group("g", 1.0))
    wait(store.change_group_members("g", ["DEV1", "DEV2", "DEV6"], [], 1.0))
    wait(store.assign_profile("everyone", ["all"], 1.0))
    wait(store.assign_profile("some", ["g"], 1.0))
    for device_id, profile, state in (
        ("DEV1", "everyone", "verified"),
        ("DEV2", "everyone", "drifted"),
        ("DEV6", "everyone", "verified"),  # unenrolled: not one of all's devices
        ("DEV1", "some", "failed"),
    ):
        record = DeviceProfile(profile, "v1", state, updated_at=2.0)
        wait(
            store.commit_management_step(
                ManagementStep(device_id, _session()), 2.0, profiles=ProfileStep((record,))
            )
        )
    # A step records when its device was last seen (the profile records'
    # steps above included).
    for n, at in seen_at.items():
        wait(store.commit_management_step(ManagementStep(f"DEV{n}", _session()), at))
    counts = wait(store.fleet_counts(now))
    assert counts["devices"] == {"enrolled": 5, "unenrolled": 1}
    assert counts["checkins"] == {"1h": 1, "24h": 1, "7d": 1, "older": 1, "never": 1}
    enrollments = counts["enrollments"]
    assert len(enrollments) == 30 and sum(enrollments.values()) == 5
    assert [enrollments[d] for d in sorted(enrollments)[-5:]] == [1, 1, 1, 1, 1]
    assert counts["profile:everyone"] == {"verified": 2, "drifted": 1, "pending": 3}
    assert counts["profile:some"] == {"failed": 1, "pending": 1}
    assert counts["profile:nobody"] == {}
    wait(store.delete_profile("nobody", 3.0))
    assert "profile:nobody" not in wait(store.fleet_counts(now))
