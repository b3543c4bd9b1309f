"""``twistd mdmd``: options and service maker (see twisted/plugins/mdmd_plugin.py).

Start-up, in order: the configuration (:func:`mdmd.config.load_config`),
key material (bootstrapped when configured), the checks of
:mod:`mdmd.preflight`, the state_dir lock, then the daemon.  Every refusal
is one line and exit status 78 (EX_CONFIG), which the systemd unit does not
restart on.  ``--check`` runs the checks without starting.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import NoReturn

from twisted.application.service import IService
from twisted.python import usage

from mdmd.config import ConfigError, MdmdConfig, load_config

__all__ = ["Options", "makeService"]

DEFAULT_CONFIG = "/etc/mdmd/mdmd.ini"
EX_CONFIG = 78  # sysexits(3); mdmd.preflight.EX_CONFIG (not imported here: see makeService)
EX_TEMPFAIL = 75  # mdmd.preflight.EX_TEMPFAIL: the database did not answer; systemd retries
# The state_dir lock of this process, held until it exits.
_HELD: list[object] = []


def _fail(error: Exception, status: int = EX_CONFIG) -> NoReturn:
    # One line and a non-zero exit before the reactor starts: twistd would
    # otherwise print its whole usage text (UsageError) or a traceback.
    sys.stderr.write(f"mdmd: {error}\n")
    sys.stderr.flush()
    # EX_CONFIG: systemd will not spin on a bad config; EX_TEMPFAIL: it retries.
    raise SystemExit(status)


class Options(usage.Options):
    synopsis = "[--config /etc/mdmd/mdmd.ini] [--check]"
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "Path of the INI configuration file."],
    ]
    optFlags = [
        [
            "check",
            None,
            "Run every start-up check without starting, print one line, "
            "exit 0 when mdmd would start and 78 when not.",
        ],
    ]

    config: MdmdConfig

    def postOptions(self) -> None:
        try:
            self.config = load_config(self["config"])
        except ConfigError as e:
            _fail(e)
        if self["check"]:
            from mdmd.preflight import run_check

            status, line = run_check(self.config)
            (sys.stdout if status == 0 else sys.stderr).write(line + "\n")
            raise SystemExit(status)


def _metrics_for_workers(config: MdmdConfig) -> None:
    """With worker processes, metrics are summed over every process through
    files in state_dir/metrics (prometheus_client's multiprocess mode); the
    environment variable must be set before prometheus_client is imported,
    and the folder emptied of a previous run's files."""
    if config.workers <= 1:
        return
    if "prometheus_client" in sys.modules:
        raise ConfigError(config.path, "mdmd", "workers", "internal: prometheus_client imported too early")
    directory = os.path.join(config.state_dir, "metrics")
    shutil.rmtree(directory, ignore_errors=True)
    os.mkdir(directory, 0o700)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from mdmd.material import TLSMaterial, prepare
    from mdmd.preflight import StateLock, start_up_checks
    from mdmd.store.service import DatabaseUnavailable

    config = options.config
    try:
        material = prepare(config)
        tls = TLSMaterial(
            material.enrollment_chain,
            material.enrollment_key,
            material.management_chain,
            material.management_key,
        )
        warnings = start_up_checks(config, tls)
        # Held for the life of this process (the descriptor is not inherited
        # by worker processes; it is by a daemonising fork, which keeps it).
        _HELD.append(StateLock.acquire(config))
        _metrics_for_workers(config)
        # Imported only now: the daemon's modules import prometheus_client.
        from mdmd.service import build_service

        return build_service(config, material, reactor, warnings)
    except ConfigError as e:
        _fail(e)
    except DatabaseUnavailable as e:
        _fail(e, EX_TEMPFAIL)
