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

# 6 (issue 16, several nodes on PostgreSQL): who runs a background job
# (certificate housekeeping) until when, so that of several nodes sharing a
# database one runs it at a time.
_V6: Final = (
    """
    CREATE TABLE job_leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        until REAL NOT NULL
    )
    """,
)

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (_V1, _V2, _V3, _V4, _V5, _V6)
SCHEMA_VERSION: Final = len(MIGRATIONS)
