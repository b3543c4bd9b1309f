"""The emulated Windows device's management tree: how it answers the
server's OMA-DM commands (sans I/O, through ManagementClient.respond)."""

from __future__ import annotations

import base64
import random
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from lxml import etree

from mdmd.sim.device import (
    METINF,
    SYNCML,
    Drift,
    EnrollmentResult,
    ManagementClient,
    ProtocolError,
    ServerMessage,
    WindowsDevice,
)

NS = f"{{{SYNCML}}}"
CAMERA = "./Device/Vendor/MSFT/Policy/Config/Camera/AllowCamera"
USER_POLICY = "./User/Vendor/MSFT/Policy/Config/Start/HideAppList"
TELEMETRY = "./Vendor/MSFT/Policy/Config/System/AllowTelemetry"
CUSTOM = "./Device/Vendor/MSFT/Custom/Setting"


@pytest.fixture(scope="module")
def device() -> WindowsDevice:
    # The tree never uses the key; one for the module is enough.
    return WindowsDevice(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture
def client(device: WindowsDevice) -> ManagementClient:
    return ManagementClient(device, rng=random.Random(7))


_ids: Iterator[int] = iter(range(100, 1_000_000))


def item(uri: str, data: str | None = None, fmt: str | None = None, kind: str | None = None) -> str:
    meta = ""
    if fmt or kind:
        meta = (
            "<Meta>"
            + (f'<Format xmlns="{METINF}">{fmt}</Format>' if fmt else "")
            + (f'<Type xmlns="{METINF}">{kind}</Type>' if kind else "")
            + "</Meta>"
        )
    body = f"<Data>{data}</Data>" if data is not None else ""
    return f"<Item><Target><LocURI>{uri}</LocURI></Target>{meta}{body}</Item>"


def cmd(verb: str, ref: str, *items: str) -> str:
    return f"<{verb}><CmdID>{ref}</CmdID>{''.join(items)}</{verb}>"


Answer = tuple[list[tuple[str, str, int]], dict[str, list[tuple[str, str, str | None, str]]]]


def run(client: ManagementClient, *commands: str) -> Answer:
    """Send *commands* in one server message: the device's statuses
    (CmdRef, Cmd, code) in order, without the SyncHdr's, and its Results by
    CmdRef (LocURI, Format, Type, Data)."""
    body = etree.fromstring(f'<SyncBody xmlns="{SYNCML}">{"".join(commands)}</SyncBody>')
    message = ServerMessage(msg_id=2, hdr_status=200, commands=list(body), final=True, statuses=[])
    answer = client.respond(message)
    assert answer is not None
    root = etree.fromstring(answer)
    statuses = [
        (s.findtext(f"{NS}CmdRef") or "", s.findtext(f"{NS}Cmd") or "", int(s.findtext(f"{NS}Data") or 0))
        for s in root.iter(f"{NS}Status")
    ]
    assert statuses[0][:2] == ("0", "SyncHdr")
    results = {
        r.findtext(f"{NS}CmdRef") or "": [
            (
                i.findtext(f"{NS}Source/{NS}LocURI") or "",
                i.findtext(f"{NS}Meta/{{{METINF}}}Format") or "",
                i.findtext(f"{NS}Meta/{{{METINF}}}Type"),
                i.findtext(f"{NS}Data") or "",
            )
            for i in r.findall(f"{NS}Item")
        ]
        for r in root.iter(f"{NS}Results")
    }
    return statuses[1:], results


def status(client: ManagementClient, verb: str, *items: str) -> int:
    (only,), _ = run(client, cmd(verb, "1", *items))
    return only[2]


def get(client: ManagementClient, uri: str) -> tuple[int, tuple[str, str, str | None, str] | None]:
    statuses, results = run(client, cmd("Get", "9", item(uri)))
    assert [s[:2] for s in statuses] == [("9", "Get")]
    found = results.get("9")
    return statuses[0][2], (found[0] if found else None)


# -- Get --


def test_get_of_an_unknown_node_is_404_without_results(client: ManagementClient) -> None:
    assert get(client, "./Device/Vendor/MSFT/Nothing/Here") == (404, None)


def test_get_returns_the_value_with_its_format_and_type(client: ManagementClient) -> None:
    assert get(client, "./DevDetail/SwV") == (200, ("./DevDetail/SwV", "chr", None, client.device.os_version))
    assert status(client, "Replace", item(CAMERA, "0", "int", "text/plain")) == 200
    assert get(client, CAMERA) == (200, (CAMERA, "int", "text/plain", "0"))


def test_values_come_back_as_written(client: ManagementClient) -> None:
    # No normalisation: the data as received, with the format it came with.
    status(client, "Replace", item(TELEMETRY, "01", "int"))
    status(client, "Replace", item(USER_POLICY, "True", "bool"))
    status(client, "Add", item(CUSTOM, "a &amp; b", "chr"))
    assert get(client, TELEMETRY)[1] == (TELEMETRY, "int", None, "01")
    assert get(client, USER_POLICY)[1] == (USER_POLICY, "bool", None, "True")
    assert get(client, CUSTOM)[1] == (CUSTOM, "chr", None, "a & b")
    assert client.nodes[CUSTOM] == ("chr", "a & b")


def test_a_value_without_format_is_chr(client: ManagementClient) -> None:
    assert status(client, "Add", item(CUSTOM, "x")) == 200
    assert client.nodes[CUSTOM] == ("chr", "x")


def test_a_get_of_several_nodes_fails_whole_on_a_missing_one(client: ManagementClient) -> None:
    statuses, results = run(client, cmd("Get", "4", item("./DevInfo/Lang"), item(CAMERA)))
    assert statuses == [("4", "Get", 404)] and results == {}
    statuses, results = run(client, cmd("Get", "5", item("./DevInfo/Lang"), item("./DevInfo/DmV")))
    assert statuses == [("5", "Get", 200)]
    assert [r[3] for r in results["5"]] == ["en-US", "1.3"]


def test_an_interior_node_answers_with_its_children(client: ManagementClient) -> None:
    status(client, "Replace", item(CAMERA, "0", "int"))
    status(client, "Replace", item("./Device/Vendor/MSFT/Policy/Config/Camera/AllowSomething", "1", "int"))
    assert get(client, "./Device/Vendor/MSFT/Policy/Config/Camera") == (
        200,
        ("./Device/Vendor/MSFT/Policy/Config/Camera", "node", None, "AllowCamera/AllowSomething"),
    )
    assert get(client, "./DevDetail/Ext/Microsoft")[1][3] == (  # type: ignore[index]
        "DNSComputerName/DeviceName/OSPlatform/ProcessorArchitecture/TotalRAM"
    )
    # The policy roots exist before any policy is set.
    fresh = ManagementClient(client.device)
    assert get(fresh, "./User/Vendor/MSFT/Policy/Config") == (
        200,
        ("./User/Vendor/MSFT/Policy/Config", "node", None, ""),
    )


# -- Add, Replace, Delete, Exec --


def test_add_creates_a_node_and_an_existing_one_is_418(client: ManagementClient) -> None:
    assert status(client, "Add", item(CUSTOM, "1", "int")) == 200
    assert status(client, "Add", item(CUSTOM, "2", "int")) == 418
    assert client.nodes[CUSTOM] == ("int", "1")
    # Also for an interior node that exists because of its children, and a built-in one.
    assert status(client, "Add", item("./Device/Vendor/MSFT/Custom", fmt="node")) == 418
    assert status(client, "Add", item("./DevInfo/Man", "Contoso")) == 418
    assert client.nodes["./DevInfo/Man"] == ("chr", "Microsoft Corporation")


def test_add_creates_missing_parents(client: ManagementClient) -> None:
    # "Add (Implicit Add supported)".
    assert status(client, "Add", item("./Vendor/MSFT/A/B/C", "x")) == 200
    assert get(client, "./Vendor/MSFT/A") == (200, ("./Vendor/MSFT/A", "node", None, "B"))
    assert status(client, "Add", item("./Vendor/MSFT/Interior", fmt="node")) == 200
    assert get(client, "./Vendor/MSFT/Interior") == (200, ("./Vendor/MSFT/Interior", "node", None, ""))


@pytest.mark.parametrize("policy", [CAMERA, USER_POLICY, TELEMETRY])
def test_replace_of_a_policy_not_set_yet_creates_it(client: ManagementClient, policy: str) -> None:
    assert get(client, policy)[0] == 404
    assert status(client, "Replace", item(policy, "1", "int")) == 200
    assert get(client, policy) == (200, (policy, "int", None, "1"))
    assert status(client, "Replace", item(policy, "2", "int")) == 200
    assert client.nodes[policy] == ("int", "2")


def test_replace_of_an_unknown_node_elsewhere_is_404(client: ManagementClient) -> None:
    for uri in (
        CUSTOM,
        "./Device/Vendor/MSFT/Policy/Config/Camera",  # an area, not a policy
        "./Device/Vendor/MSFT/Policy/Result/Camera/AllowCamera",
        "./Device/Vendor/MSFT/Policy/Config/Camera/AllowCamera/Deeper",
    ):
        assert status(client, "Replace", item(uri, "1", "int")) == 404, uri
        assert uri not in client.nodes
    assert status(client, "Add", item(CUSTOM, "1", "int")) == 200
    assert status(client, "Replace", item(CUSTOM, "two", "chr", "text/plain")) == 200
    assert get(client, CUSTOM) == (200, (CUSTOM, "chr", "text/plain", "two"))


def test_built_in_and_interior_nodes_refuse_replace_and_delete_with_405(client: ManagementClient) -> None:
    # DevInfo and DevDetail: "Supported operation is Get".
    assert status(client, "Replace", item("./DevInfo/Man", "Contoso")) == 405
    assert status(client, "Delete", item("./DevDetail/SwV")) == 405
    assert status(client, "Delete", item("./DevDetail")) == 405
    assert status(client, "Delete", item("./Device/Vendor/MSFT/Policy/Config")) == 405
    status(client, "Replace", item(CAMERA, "0", "int"))
    assert status(client, "Replace", item("./Device/Vendor/MSFT/Policy/Config/Camera", "x")) == 405
    assert client.nodes["./DevInfo/Man"] == ("chr", "Microsoft Corporation")
    assert "./DevDetail/SwV" in client.nodes and client.nodes[CAMERA] == ("int", "0")


def test_delete_restores_the_policy_default(client: ManagementClient) -> None:
    status(client, "Replace", item(CAMERA, "0", "int", "text/plain"))
    assert status(client, "Delete", item(CAMERA)) == 200
    assert get(client, CAMERA) == (404, None)
    assert CAMERA not in client.nodes and CAMERA not in client.types and CAMERA not in client.server_set
    assert status(client, "Delete", item(CAMERA)) == 404


def test_delete_removes_the_subtree(client: ManagementClient) -> None:
    other = "./Device/Vendor/MSFT/Policy/Config/Camera/AllowSomething"
    status(client, "Replace", item(CAMERA, "0", "int"))
    status(client, "Replace", item(other, "0", "int"))
    status(client, "Replace", item(TELEMETRY, "1", "int"))
    assert status(client, "Delete", item("./Device/Vendor/MSFT/Policy/Config/Camera")) == 200
    assert get(client, CAMERA)[0] == get(client, other)[0] == 404
    assert client.nodes[TELEMETRY] == ("int", "1")


def test_exec_is_recorded(client: ManagementClient) -> None:
    assert status(client, "Exec", item("./Device/Vendor/MSFT/Reboot/RebootNow")) == 200
    assert client.executed == ["./Device/Vendor/MSFT/Reboot/RebootNow"]


def test_a_command_stops_at_its_first_failing_item(client: ManagementClient) -> None:
    assert status(client, "Replace", item(CAMERA, "0", "int"), item(CUSTOM, "1"), item(TELEMETRY, "1")) == 404
    assert CAMERA in client.nodes and TELEMETRY not in client.nodes


# -- Atomic --


def test_an_atomic_that_succeeds_applies_everything(client: ManagementClient) -> None:
    statuses, _ = run(
        client,
        cmd(
            "Atomic",
            "10",
            cmd("Replace", "11", item(CAMERA, "0", "int")),
            cmd("Add", "12", item(CUSTOM, "x")),
            cmd("Exec", "13", item("./Device/Vendor/MSFT/Reboot/RebootNow")),
        ),
        cmd("Get", "14", item(CAMERA)),
    )
    assert statuses == [
        ("10", "Atomic", 200),
        ("11", "Replace", 200),
        ("12", "Add", 200),
        ("13", "Exec", 200),
        ("14", "Get", 200),
    ]
    assert client.nodes[CAMERA] == ("int", "0") and client.nodes[CUSTOM] == ("chr", "x")


def _state(client: ManagementClient) -> object:
    return (dict(client.nodes), dict(client.types), set(client.server_set), list(client.executed))


def test_a_failing_atomic_is_rolled_back_whole(client: ManagementClient) -> None:
    status(client, "Replace", item(CAMERA, "1", "int", "text/plain"))
    status(client, "Add", item(CUSTOM, "keep"))
    before = _state(client)
    statuses, _ = run(
        client,
        cmd(
            "Atomic",
            "20",
            cmd("Replace", "21", item(CAMERA, "0", "int")),  # applied, then undone
            cmd("Delete", "22", item(CUSTOM)),  # likewise
            cmd("Exec", "23", item("./Device/Vendor/MSFT/Reboot/RebootNow")),
            cmd("Replace", "24", item(TELEMETRY, "3", "int")),
            cmd("Add", "25", item(CAMERA, "5", "int")),  # 418: fails the Atomic
            cmd("Replace", "26", item(USER_POLICY, "1", "int")),  # never run
        ),
        cmd("Get", "27", item(CAMERA)),
    )
    assert statuses == [
        ("20", "Atomic", 507),
        ("21", "Replace", 216),
        ("22", "Delete", 216),
        ("23", "Exec", 216),
        ("24", "Replace", 216),
        ("25", "Add", 418),
        ("26", "Replace", 216),
        ("27", "Get", 200),
    ]
    assert _state(client) == before
    assert get(client, CAMERA) == (200, (CAMERA, "int", "text/plain", "1"))
    assert get(client, TELEMETRY)[0] == get(client, USER_POLICY)[0] == 404


def test_a_get_inside_an_atomic_fails_it(client: ManagementClient) -> None:
    statuses, results = run(
        client,
        cmd(
            "Atomic",
            "30",
            cmd("Replace", "31", item(CAMERA, "0", "int")),
            cmd("Get", "32", item("./DevDetail/SwV")),
            cmd("Replace", "33", item(TELEMETRY, "1", "int")),
        ),
    )
    assert statuses == [
        ("30", "Atomic", 507),
        ("31", "Replace", 216),
        ("32", "Get", 500),
        ("33", "Replace", 216),
    ]
    assert results == {} and CAMERA not in client.nodes and TELEMETRY not in client.nodes


def test_a_nested_atomic_fails_with_500_and_its_parent_with_507(client: ManagementClient) -> None:
    statuses, _ = run(
        client,
        cmd(
            "Atomic",
            "40",
            cmd("Replace", "41", item(CAMERA, "0", "int")),
            cmd("Atomic", "42", cmd("Replace", "43", item(TELEMETRY, "1", "int"))),
            cmd("Add", "44", item(CUSTOM, "x")),
        ),
    )
    assert statuses == [
        ("40", "Atomic", 507),
        ("41", "Replace", 216),
        ("42", "Atomic", 500),
        ("43", "Replace", 216),
        ("44", "Add", 216),
    ]
    assert not {CAMERA, TELEMETRY, CUSTOM} & set(client.nodes)


def test_a_sequence_inside_an_atomic_is_rolled_back_with_it(client: ManagementClient) -> None:
    statuses, _ = run(
        client,
        cmd(
            "Atomic",
            "50",
            cmd("Sequence", "51", cmd("Replace", "52", item(CAMERA, "0", "int"))),
            cmd("Replace", "53", item(CUSTOM, "x")),  # 404
        ),
    )
    assert statuses == [
        ("50", "Atomic", 507),
        ("51", "Sequence", 216),
        ("52", "Replace", 216),
        ("53", "Replace", 404),
    ]
    assert CAMERA not in client.nodes


def test_a_sequence_outside_an_atomic_runs_each_command(client: ManagementClient) -> None:
    statuses, results = run(
        client,
        cmd(
            "Sequence",
            "60",
            cmd("Replace", "61", item(CAMERA, "0", "int")),
            cmd("Replace", "62", item(CUSTOM, "x")),
            cmd("Get", "63", item(CAMERA)),
        ),
    )
    assert statuses == [
        ("60", "Sequence", 200),
        ("61", "Replace", 200),
        ("62", "Replace", 404),
        ("63", "Get", 200),
    ]
    assert results["63"] == [(CAMERA, "int", None, "0")]


# -- write-only nodes, refused LocURIs --


def test_a_write_only_node_answers_get_with_405(client: ManagementClient) -> None:
    password = "./Device/Vendor/MSFT/Accounts/Users/alice/Password"
    assert status(client, "Add", item(password, "s3cret")) == 200
    assert get(client, password) == (405, None)
    assert client.nodes[password] == ("chr", "s3cret")
    # A test's own write-only node: 405 even after a successful Replace.
    client.write_only.add("./Device/Vendor/MSFT/Policy/Config/Secret/*")
    secret = "./Device/Vendor/MSFT/Policy/Config/Secret/Key"
    assert status(client, "Replace", item(secret, "k", "chr")) == 200
    assert get(client, secret) == (405, None)
    assert get(client, "./Device/Vendor/MSFT/Policy/Config/Secret")[0] == 200


def test_a_refused_locuri_fails_writes_with_its_code(client: ManagementClient) -> None:
    client.refuse(CAMERA)
    client.refuse("./Device/Vendor/MSFT/BitLocker", 404)
    assert status(client, "Replace", item(CAMERA, "0", "int")) == 500
    assert status(client, "Add", item(CAMERA, "0", "int")) == 500
    assert status(client, "Exec", item("./Device/Vendor/MSFT/BitLocker/RotateRecoveryPasswords")) == 404
    assert status(client, "Add", item("./Device/Vendor/MSFT/BitLocker/RequireDeviceEncryption", "1")) == 404
    assert CAMERA not in client.nodes and client.executed == []
    # Reads are not affected, and other nodes are written as usual.
    assert get(client, CAMERA) == (404, None)
    assert status(client, "Replace", item(TELEMETRY, "1", "int")) == 200
    # Inside an Atomic the refusal keeps its code and fails the Atomic.
    statuses, _ = run(
        client,
        cmd(
            "Atomic",
            "70",
            cmd("Replace", "71", item(TELEMETRY, "3", "int")),
            cmd("Replace", "72", item(CAMERA, "0", "int")),
        ),
    )
    assert statuses == [("70", "Atomic", 507), ("71", "Replace", 216), ("72", "Replace", 500)]
    assert client.nodes[TELEMETRY] == ("int", "1")


def test_refusals_and_write_only_nodes_can_be_given_at_construction(device: WindowsDevice) -> None:
    client = ManagementClient(
        device, refused={"./Device/Vendor/MSFT/Policy/Config/*/AllowCamera": 404}, write_only=()
    )
    assert status(client, "Replace", item(CAMERA, "0", "int")) == 404
    password = "./Device/Vendor/MSFT/Accounts/Users/alice/Password"
    status(client, "Add", item(password, "s3cret"))
    assert get(client, password) == (200, (password, "chr", None, "s3cret"))


# -- drift --


def _set_policies(client: ManagementClient) -> None:
    status(client, "Replace", item(CAMERA, "0", "int"))
    status(client, "Replace", item(USER_POLICY, "true", "bool"))
    status(client, "Add", item(CUSTOM, "corp", "chr", "text/plain"))
    status(client, "Add", item("./Device/Vendor/MSFT/Custom/Interior", fmt="node"))


def test_drift_changes_exactly_one_server_set_node_and_keeps_its_format(client: ManagementClient) -> None:
    _set_policies(client)
    before = dict(client.nodes)
    change = client.drift()
    assert isinstance(change, Drift) and change.locuri in (CAMERA, USER_POLICY, CUSTOM)
    changed = {uri for uri in client.nodes if client.nodes[uri] != before[uri]}
    assert changed == {change.locuri}
    fmt, value = client.nodes[change.locuri]
    assert fmt == before[change.locuri][0] == change.format
    assert (change.before, change.after) == (before[change.locuri][1], value) and value != change.before
    assert client.drifts == [change]
    # The server reads the drifted value back, in its format and type.
    code, found = get(client, change.locuri)
    assert code == 200 and found is not None and found[1:] == (fmt, client.types.get(change.locuri), value)


def test_drift_of_a_given_node(client: ManagementClient) -> None:
    _set_policies(client)
    assert client.drift(CAMERA) == Drift(CAMERA, "int", "0", "1")
    assert client.drift(USER_POLICY) == Drift(USER_POLICY, "bool", "true", "false")
    assert client.drift(CUSTOM) == Drift(CUSTOM, "chr", "corp", "corp-local")
    assert client.nodes[CUSTOM] == ("chr", "corp-local") and client.types[CUSTOM] == "text/plain"
    for bad in ("./DevInfo/Man", "./Device/Vendor/MSFT/Custom/Interior", "./Nothing"):
        with pytest.raises(ValueError):
            client.drift(bad)


def test_drift_leaves_built_in_and_write_only_nodes_alone(client: ManagementClient) -> None:
    assert client.drift() is None
    status(client, "Add", item("./Device/Vendor/MSFT/Accounts/Users/bob/Password", "pw"))
    status(client, "Add", item("./Device/Vendor/MSFT/Custom/Interior", fmt="node"))
    assert client.drift() is None and client.drifts == []


@pytest.mark.parametrize(
    ("fmt", "before", "after"),
    [
        ("int", "0", "1"),
        ("int", "1", "0"),
        ("int", "42", "43"),
        ("int", str(2**31 - 1), str(2**31 - 2)),
        ("bool", "false", "true"),
        ("bool", "TRUE", "false"),
        ("chr", "", "local"),
        ("float", "1.5", "2.5"),
        ("b64", base64.b64encode(b"ab").decode(), base64.b64encode(b"ab\x00").decode()),
    ],
)
def test_a_drifted_value_is_another_value_of_the_same_format(
    client: ManagementClient, fmt: str, before: str, after: str
) -> None:
    status(client, "Add", item(CUSTOM, before, fmt))
    assert client.drift(CUSTOM) == Drift(CUSTOM, fmt, before, after)


def test_drift_rate_drifts_at_session_start_deterministically(device: WindowsDevice) -> None:
    def sessions(seed: int, rate: float) -> list[Drift]:
        client = ManagementClient(device, drift_rate=rate, rng=random.Random(seed))
        _set_policies(client)
        for _ in range(20):
            client.session_start("https://mdm.example/manage")
        return client.drifts

    always = sessions(1, 1.0)
    assert len(always) == 20
    assert sessions(1, 1.0) == always  # same seed, same drifts
    assert sessions(1, 0.0) == []
    sometimes = sessions(2, 0.5)
    assert 0 < len(sometimes) < 20 and sessions(2, 0.5) == sometimes
    with pytest.raises(ValueError):
        ManagementClient(device, drift_rate=1.5)


def test_the_tree_survives_a_save_and_load(client: ManagementClient) -> None:
    _set_policies(client)
    client.nodes["./Vendor/MSFT/Test"] = ("chr", "put by a test")
    state = client.tree_state()
    assert "./DevInfo/Man" not in state
    again = ManagementClient(client.device)
    again.restore_tree(state)
    assert again.nodes == client.nodes and again.types == client.types
    assert again.server_set == client.server_set == {CAMERA, USER_POLICY, CUSTOM}


# -- device actions: what Windows does after them --

REBOOT = "./Device/Vendor/MSFT/Reboot/RebootNow"
DNS_NAME = "./DevDetail/Ext/Microsoft/DNSComputerName"


@pytest.fixture
def pc(device: WindowsDevice) -> ManagementClient:
    """A PC of its own (actions change its identity), enrolled with
    provider ID "mdmd"."""
    own = WindowsDevice(key=device.key, hostname="DESK-OLD")
    own.enrollment = EnrollmentResult(
        certificate=None,  # type: ignore[arg-type]  # sessions need no certificate sans I/O
        root_certificates=(),
        management_url="https://mdm.example/api/mdm/microsoft/management",
        provider_id="mdmd",
        provisioning_doc=b"",
    )
    return ManagementClient(own)


def _session_id(package: bytes) -> str:
    return etree.fromstring(package).findtext(f"{NS}SyncHdr/{NS}SessionID") or ""


def _alerts(package: bytes) -> list[str]:
    return [a.findtext(f"{NS}Data") or "" for a in etree.fromstring(package).iter(f"{NS}Alert")]


def test_only_the_nodes_a_pc_executes_answer_exec(pc: ManagementClient) -> None:
    for node in (
        "./Device/Vendor/MSFT/Defender/UpdateSignature",
        "./Vendor/MSFT/Defender/UpdateSignature",  # device scope either way
        "./Device/Vendor/MSFT/BitLocker/RotateRecoveryPasswords",
    ):
        assert status(pc, "Exec", item(node)) == 200
    for node in (
        "./Vendor/MSFT/RemoteLock/Lock",  # Windows 10 Mobile only
        "./Device/Vendor/MSFT/Reboot",
        "./Device/Vendor/MSFT/NoSuchCSP/Go",
        "./Vendor/MSFT/DMClient/Provider/SomeoneElse/Unenroll",
    ):
        assert status(pc, "Exec", item(node)) == 404
    assert not pc.gone and not pc.restart_pending


def test_a_defender_scan_takes_1_or_2(pc: ManagementClient) -> None:
    scan = "./Device/Vendor/MSFT/Defender/Scan"
    assert status(pc, "Exec", item(scan, "1", "chr")) == 200
    assert status(pc, "Exec", item(scan, "2", "chr")) == 200
    assert status(pc, "Exec", item(scan, "3", "chr")) == 500
    assert status(pc, "Exec", item(scan)) == 500
    assert pc.scans == ["1", "2"]


def test_after_rebootnow_the_next_session_starts_over_with_the_new_name(pc: ManagementClient) -> None:
    url = "https://mdm.example/api/mdm/microsoft/management"
    pc.session_id = 41
    pc.session_start(url)
    assert status(pc, "Replace", item(DNS_NAME, "DESK-NEW", "chr")) == 200
    # Not before a restart.
    assert get(pc, DNS_NAME) == (200, (DNS_NAME, "chr", None, "DESK-OLD"))
    assert status(pc, "Exec", item(REBOOT, fmt="null")) == 200
    assert pc.restart_pending and pc.restarts == 0
    package = pc.session_start(url)
    assert _session_id(package) == "0" and pc.restarts == 1
    assert get(pc, DNS_NAME)[1] == (DNS_NAME, "chr", None, "DESK-NEW")
    assert pc.nodes["./DevDetail/Ext/Microsoft/DeviceName"] == ("chr", "DESK-NEW")
    assert _session_id(pc.session_start(url)) == "1"


def test_a_name_windows_refuses_fails_the_replace(pc: ManagementClient) -> None:
    assert status(pc, "Replace", item(DNS_NAME, "12345", "chr")) == 500
    assert status(pc, "Replace", item(DNS_NAME, "no spaces", "chr")) == 500
    assert pc.pending_name is None


def test_after_a_wipe_the_pc_answers_and_is_gone(pc: ManagementClient) -> None:
    assert status(pc, "Exec", item("./Device/Vendor/MSFT/RemoteWipe/doWipeProtected", fmt="chr")) == 200
    assert pc.wiped and pc.gone
    with pytest.raises(ProtocolError, match="wiped"):
        pc.session_start("https://mdm.example/api/mdm/microsoft/management")


def test_after_unenroll_the_pc_ends_the_session_and_reports_alert_1226(pc: ManagementClient) -> None:
    url = "https://mdm.example/api/mdm/microsoft/management"
    pc.session_start(url)
    body = etree.fromstring(
        f'<SyncBody xmlns="{SYNCML}">'
        f"{cmd('Exec', '5', item('./Vendor/MSFT/DMClient/Provider/mdmd/Unenroll', 'mdmd', 'chr'))}</SyncBody>"
    )
    message = ServerMessage(msg_id=2, hdr_status=200, commands=list(body), final=True, statuses=[])
    assert pc.respond(message) is None  # no answer: the session is aborted
    assert pc.unenrolling and not pc.gone
    package = pc.session_start(url)
    assert "1226" in _alerts(package) and b"com.microsoft:mdm.unenrollment.userrequest" in package
    assert pc.gone
    with pytest.raises(ProtocolError, match="unenrolled"):
        pc.session_start(url)


def test_an_action_rolled_back_in_an_atomic_does_nothing(pc: ManagementClient) -> None:
    statuses, _ = run(
        pc,
        cmd(
            "Atomic",
            "30",
            cmd("Exec", "31", item(REBOOT)),
            cmd("Replace", "32", item(DNS_NAME, "DESK-X", "chr")),
            cmd("Add", "33", item("./DevInfo/Man", "x")),  # 418: fails the Atomic
        ),
    )
    assert statuses[0] == ("30", "Atomic", 507)
    assert not pc.restart_pending and pc.pending_name is None and pc.executed == []
