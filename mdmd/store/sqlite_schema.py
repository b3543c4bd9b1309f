"""The SQLite schema, as data: each migration is a list of statements that
takes the database from version *i* to *i + 1* (``PRAGMA user_version``
says how far a file has come).  Never edit a released migration: append.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

_V1: Final = (
    """
    CREATE TABLE hosts (
        id INTEGER PRIMARY KEY,
        hardware_uuid TEXT NOT NULL UNIQUE,
        node_key_hash BLOB NOT NULL UNIQUE,
        platform TEXT NOT NULL,
        hostname TEXT NOT NULL,
        hardware_serial TEXT NOT NULL,
        info TEXT NOT NULL,
        enrolled_at REAL NOT NULL,
        last_seen REAL,
        unenroll_requested INTEGER NOT NULL DEFAULT 0
    )
    """,
    """
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        host_id INTEGER REFERENCES hosts(id),
        hw_dev_id TEXT,
        enrollment_type TEXT NOT NULL,
        device_name TEXT,
        os_version TEXT,
        context TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('enrolled', 'unenrolled')),
        hw_dev_id_collision INTEGER NOT NULL DEFAULT 0,
        enrolled_at REAL NOT NULL,
        unenrolled_at REAL,
        last_seen REAL,
        inventory TEXT NOT NULL DEFAULT '{}'
    )
    """,
    "CREATE INDEX devices_by_host ON devices(host_id)",
    "CREATE INDEX devices_by_hw_dev_id ON devices(hw_dev_id)",
    """
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices(device_id),
        thumbprint TEXT NOT NULL UNIQUE,
        not_before REAL NOT NULL,
        not_after REAL NOT NULL,
        issued_at REAL NOT NULL,
        revoked_at REAL,
        revoke_reason TEXT
    )
    """,
    "CREATE INDEX certificates_by_device ON certificates(device_id)",
    """
    CREATE TABLE commands (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        uuid TEXT NOT NULL UNIQUE,
        device_id TEXT NOT NULL REFERENCES devices(device_id),
        verb TEXT NOT NULL,
        body TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'acknowledged', 'failed')),
        status INTEGER,
        created_at REAL NOT NULL,
        sent_at REAL,
        acked_at REAL,
        session_id TEXT,
        msg_id INTEGER
    )
    """,
    "CREATE INDEX commands_queue ON commands(device_id, state, seq)",
    """
    CREATE TABLE command_results (
        id INTEGER PRIMARY KEY,
        command_uuid TEXT NOT NULL REFERENCES commands(uuid),
        kind TEXT NOT NULL CHECK (kind IN ('status', 'results')),
        cmd_id TEXT,
        cmd TEXT,
        status INTEGER,
        loc_uri TEXT,
        format TEXT,
        type TEXT,
        data TEXT,
        received_at REAL NOT NULL
    )
    """,
    "CREATE INDEX command_results_by_command ON command_results(command_uuid, id)",
    """
    CREATE TABLE syncml_sessions (
        device_id TEXT PRIMARY KEY REFERENCES devices(device_id),
        state TEXT NOT NULL,
        updated_at REAL NOT NULL
    )
    """,
    """
    CREATE TABLE device_alerts (
        device_id TEXT NOT NULL REFERENCES devices(device_id),
        code TEXT NOT NULL,
        type TEXT NOT NULL,
        source TEXT NOT NULL,
        format TEXT,
        data TEXT,
        received_at REAL NOT NULL,
        count INTEGER NOT NULL DEFAULT 1,
        PRIMARY KEY (device_id, code, type, source)
    )
    """,
)

# 2: with several worker processes, two messages of one device can be
# processed at once in different processes; the session step is a
# compare-and-swap on this counter.
_V2: Final = ("ALTER TABLE devices ADD COLUMN session_seq INTEGER NOT NULL DEFAULT 0",)

# 3: the last reply and the pieces of a large object leave the session row,
# so that a small message writes a small row whatever came before it.
# Version-1 session rows carried both inline (the reply base64-encoded,
# each object's pieces joined in "chunks"): move them out.
_V3: Final = (
    """
    CREATE TABLE syncml_replies (
        device_id TEXT PRIMARY KEY REFERENCES devices(device_id),
        reply BLOB NOT NULL,
        base64 INTEGER NOT NULL DEFAULT 0
    )
    """,
    """
    INSERT INTO syncml_replies (device_id, reply, base64)
    SELECT device_id, json_extract(state, '$.rep'), 1 FROM syncml_sessions
    WHERE json_valid(state) AND json_extract(state, '$.rep') IS NOT NULL
    """,
    """
    CREATE TABLE large_object_chunks (
        id INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices(device_id),
        object_key TEXT NOT NULL,
        data TEXT NOT NULL
    )
    """,
    "CREATE INDEX large_object_chunks_by_object ON large_object_chunks(device_id, object_key, id)",
    """
    INSERT INTO large_object_chunks (device_id, object_key, data)
    SELECT s.device_id, c.key, json_extract(c.value, '$.data')
    FROM syncml_sessions s, json_each(s.state, '$.chunks') c
    WHERE json_valid(s.state) AND json_extract(c.value, '$.data') IS NOT NULL
    """,
)

# 4 (configuration profiles and device groups): profiles and their
# assignment to groups; the built-in group "all" is not stored, it is every
# enrolled device.  Each device's record of each profile, the queued
# commands that work for a profile (until answered), and a short history.
_V4: Final = (
    """
    CREATE TABLE profiles (
        name TEXT PRIMARY KEY,
        version TEXT NOT NULL,
        items TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        deleted_at REAL
    )
    """,
    """
    CREATE TABLE device_groups (
        name TEXT PRIMARY KEY,
        created_at REAL NOT NULL
    )
    """,
    """
    CREATE TABLE group_members (
        group_name TEXT NOT NULL REFERENCES device_groups(name) ON DELETE CASCADE,
        device_id TEXT NOT NULL REFERENCES devices(device_id),
        added_at REAL NOT NULL,
        PRIMARY KEY (group_name, device_id)
    )
    """,
    "CREATE INDEX group_members_by_device ON group_members(device_id)",
    """
    CREATE TABLE profile_assignments (
        profile_name TEXT NOT NULL REFERENCES profiles(name) ON DELETE CASCADE,
        group_name TEXT NOT NULL,
        PRIMARY KEY (profile_name, group_name)
    )
    """,
    "CREATE INDEX profile_assignments_by_group ON profile_assignments(group_name)",
    """
    CREATE TABLE device_profiles (
        device_id TEXT NOT NULL REFERENCES devices(device_id),
        profile_name TEXT NOT NULL,
        version TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'verifying', 'verified', 'failed',
                                             'drifted', 'removing', 'removed')),
        status INTEGER,
        detail TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        verified_at REAL,
        updated_at REAL NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (device_id, profile_name)
    )
    """,
    "CREATE INDEX device_profiles_by_profile ON device_profiles(profile_name, state)",
    """
    CREATE TABLE profile_commands (
        command_uuid TEXT PRIMARY KEY REFERENCES commands(uuid),
        device_id TEXT NOT NULL REFERENCES devices(device_id),
        profile_name TEXT NOT NULL,
        version TEXT NOT NULL,
        purpose TEXT NOT NULL,
        loc_uri TEXT
    )
    """,
    "CREATE INDEX profile_commands_by_device ON profile_commands(device_id)",
    """
    CREATE TABLE device_profile_events (
        id INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices(device_id),
        profile_name TEXT NOT NULL,
        version TEXT NOT NULL,
        state TEXT NOT NULL,
        status INTEGER,
        detail TEXT,
        at REAL NOT NULL
    )
    """,
    "CREATE INDEX device_profile_events_by_device ON device_profile_events(device_id, profile_name, id)",
)

# 5 (certificate renewal): a certificate knows the one it renewed and
# when it opened its first session; looking up a device's live certificates
# (re-enrollment, renewal, the current certificate) reads a partial index of
# the live ones only, whatever the device's history; retiring ended
# predecessors and pruning old revoked rows read their own small indexes.
_V5: Final = (
    "ALTER TABLE certificates ADD COLUMN renewed_from TEXT",
    "ALTER TABLE certificates ADD COLUMN activated_at REAL",
    "CREATE INDEX certificates_live ON certificates(device_id, issued_at) WHERE revoked_at IS NULL",
    "CREATE INDEX certificates_live_by_end ON certificates(not_after) WHERE revoked_at IS NULL",
    "CREATE INDEX certificates_by_predecessor ON certificates(renewed_from) WHERE renewed_from IS NOT NULL",
    "CREATE INDEX certificates_revoked ON certificates(revoked_at) WHERE revoked_at IS NOT NULL",
)


# 6 (issue 14, operating at scale): indexes for the paged, searchable device
# list (device IDs and names case-insensitively, the agent hosts' hostname,
# serial and hardware UUID for search, each sort order with the device ID as
# tie-breaker, the filters), for the fleet-wide counts of the metrics, and the
# administrators' named tokens and audit log.
_V6: Final = (
    "CREATE INDEX devices_by_id_nocase ON devices(device_id COLLATE NOCASE)",
    "CREATE INDEX devices_by_name_nocase ON devices(device_name COLLATE NOCASE)",
    # The two orders of the list, each with the device ID as tie-breaker and
    # then every small column a filter or the search tests, so that walking
    # an order checks the filters on the index alone and reads the table
    # only for the rows it lists.  Never seen sorts (and filters) as seen at
    # 0, so that a position in the list is never NULL.
    """
    CREATE INDEX devices_by_enrolled_at ON devices(
        enrolled_at, device_id, state, os_version, hw_dev_id_collision, last_seen, host_id, device_name)
    """,
    """
    CREATE INDEX devices_by_last_seen ON devices(
        coalesce(last_seen, 0), device_id, state, os_version, hw_dev_id_collision, enrolled_at, host_id,
        device_name)
    """,
    # Partial: an index on state alone would look selective to the planner
    # (no statistics) and lure the device-facing queries that test
    # state = 'enrolled' away from their own indexes.
    "CREATE INDEX devices_unenrolled ON devices(device_id) WHERE state = 'unenrolled'",
    "CREATE INDEX devices_by_os_version ON devices(os_version)",
    "CREATE INDEX devices_with_hw_dev_id_collision ON devices(device_id) WHERE hw_dev_id_collision = 1",
    "CREATE INDEX hosts_by_hostname_nocase ON hosts(hostname COLLATE NOCASE)",
    "CREATE INDEX hosts_by_serial_nocase ON hosts(hardware_serial COLLATE NOCASE)",
    "CREATE INDEX hosts_by_uuid_nocase ON hosts(hardware_uuid COLLATE NOCASE)",
    "CREATE INDEX commands_by_state ON commands(state)",
    """
    CREATE TABLE admin_tokens (
        name TEXT PRIMARY KEY,
        token_hash BLOB NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        created_by TEXT,
        revoked_at REAL,
        revoked_by TEXT
    )
    """,
    """
    CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT,
        detail TEXT NOT NULL DEFAULT '{}',
        client TEXT,
        request_id TEXT
    )
    """,
    "CREATE INDEX audit_by_actor ON audit_log(actor, id)",
    "CREATE INDEX audit_by_target ON audit_log(target, id)",
    "CREATE INDEX audit_by_action ON audit_log(action, id)",
    # One row the readiness check rewrites: proof that a commit still works.
    "CREATE TABLE store_health (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at REAL NOT NULL)",
)


# 7 (issue 12, device actions and group operations): each action asked of
# a device beside the command that carries it out; what a wipe or an
# unenrollment makes of the device (``lifecycle``: wipe_pending,
# unenroll_pending, wiped) as a column of its own, so that the devices
# table keeps its state CHECK and needs no rebuild; a command's operation
# and why it was cancelled; group operations with their progress counters
# and the lease of the process fanning them out.
_V7: Final = (
    "ALTER TABLE devices ADD COLUMN lifecycle TEXT",
    "ALTER TABLE commands ADD COLUMN operation_id TEXT",
    "ALTER TABLE commands ADD COLUMN detail TEXT",
    "CREATE INDEX commands_by_operation ON commands(operation_id, state) WHERE operation_id IS NOT NULL",
    """
    CREATE TABLE device_actions (
        action_id TEXT PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices(device_id),
        action TEXT NOT NULL,
        options TEXT NOT NULL,
        command_uuid TEXT NOT NULL UNIQUE REFERENCES commands(uuid),
        operation_id TEXT,
        state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'awaiting_restart', 'acknowledged',
                                             'failed', 'cancelled')),
        status INTEGER,
        detail TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )
    """,
    "CREATE INDEX device_actions_by_device ON device_actions(device_id, created_at)",
    """
    CREATE INDEX device_actions_open ON device_actions(device_id, action)
    WHERE state IN ('pending', 'sent', 'awaiting_restart')
    """,
    """
    CREATE TABLE operations (
        operation_id TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('action', 'command')),
        group_name TEXT NOT NULL,
        action TEXT,
        options TEXT,
        verb TEXT NOT NULL,
        body TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'queuing', 'delivering', 'done')),
        cursor TEXT,
        total INTEGER,
        queued INTEGER NOT NULL DEFAULT 0,
        skipped INTEGER NOT NULL DEFAULT 0,
        acknowledged INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT,
        lease_until REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        finished_at REAL
    )
    """,
    "CREATE INDEX operations_open ON operations(created_at) WHERE state IN ('pending', 'queuing')",
)

# 8 (issue 16, several nodes on PostgreSQL): who runs a background job
# (certificate housekeeping) until when, so that of several nodes sharing a
# database one runs it at a time.
_V8: Final = (
    """
    CREATE TABLE job_leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        until REAL NOT NULL
    )
    """,
)

# 9 (issue 17, web console): each device's SyncML message log, the latest
# [management] message_log messages in and out, written with the step of the
# message they belong to; bodies zlib-compressed, at most the first 64 KiB of
# a message kept.
_MESSAGE_LOG: Final = (
    """
    CREATE TABLE device_messages (
        id INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices(device_id),
        direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
        at REAL NOT NULL,
        session_id TEXT,
        msg_id INTEGER,
        size INTEGER NOT NULL,
        truncated INTEGER NOT NULL DEFAULT 0,
        body BLOB NOT NULL
    )
    """,
    "CREATE INDEX device_messages_by_device ON device_messages(device_id, id)",
)

# 10: the web console's sessions, in the store so that every node knows them
# and a restart keeps them (only the SHA-256 of a session's ID and of its
# token are kept).
_CONSOLE_SESSIONS: Final = (
    """
    CREATE TABLE console_sessions (
        id_hash BLOB PRIMARY KEY,
        token_name TEXT NOT NULL,
        token_hash BLOB NOT NULL,
        csrf TEXT NOT NULL,
        created_at REAL NOT NULL,
        used_at REAL NOT NULL
    )
    """,
)

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    _V1,
    _V2,
    _V3,
    _V4,
    _V5,
    _V6,
    _V7,
    _V8,
    _MESSAGE_LOG,
    _CONSOLE_SESSIONS,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)
