#!/usr/bin/env python3
"""What one OMA-DM session start costs mdmd, step by step, without TLS or
HTTP: the same calls the management endpoint makes, in its order, against a
real SQLite store (a throwaway file, ``synchronous=FULL``).

    .venv/bin/python bench/session_cost.py            # 500 session starts
    .venv/bin/python bench/session_cost.py --sessions 2000

Prints the CPU time (this process, every thread, so the store's writer and
its fsync included) per session start for each step.  bench/anchor.py
measures the whole request beside nginx; this says what the part above the
connection is made of.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from mdmd import pki  # noqa: E402
from mdmd.actions import ends_enrollment, settle  # noqa: E402
from mdmd.actions import plan_session as plan_action_session  # noqa: E402
from mdmd.management import digest, process_message  # noqa: E402
from mdmd.management_endpoint import _message_log  # noqa: E402
from mdmd.profiles import DeviceVars, ProfilePlanner, ProfileSettings  # noqa: E402
from mdmd.sim.device import ManagementClient, WindowsDevice  # noqa: E402
from mdmd.store.sqlite import SQLiteStore  # noqa: E402
from mdmd.syncml import parse_message  # noqa: E402
from store_helpers import ThreadReactor, enrollment, host, wait  # noqa: E402

SERVER_URL = "https://mdm.example.com/api/mdm/microsoft/management"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/session_cost", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=500, help="session starts to time (500)")
    a = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mdmd-session-cost-"))
    store = SQLiteStore(str(workdir / "mdmd.sqlite3"), ThreadReactor())  # type: ignore[arg-type]
    store.open()
    store.start()
    try:
        now = datetime.now(UTC)
        ca_key = pki.generate_rsa_key()
        ca = pki.create_ca_certificate(ca_key, "identity", days=1, now=now)
        device = WindowsDevice(key=pki.generate_rsa_key(), hostname="PC")
        cert = pki.issue_device_certificate(
            ca, ca_key, device.key.public_key(), device.device_id, days=1, now=now
        )
        h = wait(store.enroll_host(host(1), now=1.0))
        record = enrollment(device.device_id, h.id, pki.serial_hex(cert), hw=None)
        record = replace(
            record, cert_thumbprint=pki.thumbprint(cert), cert_not_after=cert.not_valid_after_utc.timestamp()
        )
        wait(store.record_device_enrollment(record, now=2.0))
        client = ManagementClient(device)
        serial = pki.serial_hex(cert)
        spent: dict[str, float] = {}

        def step(name: str, started: float) -> None:
            spent[name] = spent.get(name, 0.0) + time.process_time() - started

        for _ in range(a.sessions):
            body = client.session_start(SERVER_URL)
            t = time.process_time()
            ctx = wait(
                store.management_context(serial, request_digest=digest(body), with_profile_context=True)
            )
            assert ctx is not None
            step("context read, profile context included (reader thread)", t)
            t = time.process_time()
            message = parse_message(body)
            step("SyncML parse", t)
            t = time.process_time()
            planner = ProfilePlanner.for_device(
                DeviceVars(device.device_id, "", ""),
                ctx.profiles,
                ctx.profile_links,
                now=10.0,
                settings=ProfileSettings(86400.0, 3),
                new_uuid=lambda: str(uuid.uuid4()),
            )
            wanted = ctx.profile_context
            assert wanted is not None
            planner.device = wanted.device
            planned = planner.plan_session(wanted.desired)
            asked, started = plan_action_session(ctx.actions, ctx.device.inventory, lambda: str(uuid.uuid4()))
            step("profiles and actions planned", t)
            t = time.process_time()
            reply = process_message(
                message,
                body,
                device_id=device.device_id,
                session=ctx.session,
                queue=ctx.queue,
                server_url=SERVER_URL,
                default_max_msg_size=65536,
                new_commands=[*planned, *asked],
                followups=planner.followups,
                ends_session=ends_enrollment(ctx.actions),
            )
            step("session rules and the reply built", t)
            t = time.process_time()
            profiles = planner.finish(reply.step)
            actions = settle(ctx.actions, reply.step, started)
            messages = _message_log(50, 10.0, message.hdr.session_id, message.hdr.msg_id, body, reply)
            step("profile/action outcome, message log", t)
            t = time.process_time()
            wait(
                store.commit_management_step(
                    reply.step,
                    10.0,
                    expected_seq=ctx.session_seq,
                    profiles=profiles,
                    actions=actions,
                    messages=messages,
                )
            )
            step("commit (writer thread, COMMIT and fsync)", t)
        print(f"\nOne session start, CPU ms (mean of {a.sessions}):\n")
        print("| step | CPU ms |\n|---|---|")
        for name, seconds in spent.items():
            print(f"| {name} | {seconds * 1000 / a.sessions:.3f} |")
        print(f"| all | {sum(spent.values()) * 1000 / a.sessions:.3f} |")
    finally:
        store.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
