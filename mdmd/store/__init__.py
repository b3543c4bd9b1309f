"""The state store: hosts, MDM devices, issued certificates, the command
queue with its results, and OMA-DM session state.

- :mod:`mdmd.store.interface`: :class:`Store`, the one interface handlers use;
- :mod:`mdmd.store.records`: the records it hands out and its errors;
- :mod:`mdmd.store.engine`: transactions off the reactor with group commit;
- :mod:`mdmd.store.sqlite` (with :mod:`mdmd.store.sqlite_schema`): the
  embedded SQLite backend.
"""

from mdmd.store.interface import Store
from mdmd.store.records import (
    AssignmentOutcome,
    CertificateRecord,
    CertificateRenewal,
    CommandRecord,
    DeviceConflict,
    DeviceEnrollment,
    DeviceProfileEntry,
    DeviceRecord,
    EnrollmentOutcome,
    GroupChange,
    GroupRecord,
    HostEnrollment,
    HostRecord,
    ManagementContext,
    ProfileContext,
    ProfileRecord,
    RenewalOutcome,
    RenewalRefused,
    SessionConflict,
    StoredAlert,
    StoreError,
    StoreUnavailable,
)

__all__ = [
    "AssignmentOutcome",
    "CertificateRecord",
    "CertificateRenewal",
    "CommandRecord",
    "DeviceConflict",
    "DeviceEnrollment",
    "DeviceProfileEntry",
    "DeviceRecord",
    "EnrollmentOutcome",
    "GroupChange",
    "GroupRecord",
    "HostEnrollment",
    "HostRecord",
    "ManagementContext",
    "ProfileContext",
    "ProfileRecord",
    "RenewalOutcome",
    "RenewalRefused",
    "SessionConflict",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "StoredAlert",
]
