"""``twistd mdmd``: options and service maker (see twisted/plugins/mdmd_plugin.py)."""

from __future__ import annotations

import sys
from typing import NoReturn

from twisted.application.service import IService
from twisted.python import usage

from mdmd.config import ConfigError, MdmdConfig, load_config

__all__ = ["Options", "makeService"]

DEFAULT_CONFIG = "/etc/mdmd/mdmd.ini"


#: EX_CONFIG: a configuration mistake; the systemd unit does not restart.
EXIT_CONFIG = 78
#: EX_UNAVAILABLE: the database did not answer at start-up; the systemd
#: unit restarts the daemon (Restart=on-failure) until it does.
EXIT_UNAVAILABLE = 69


def _fail(error: Exception, status: int = EXIT_CONFIG) -> NoReturn:
    # One line and a non-zero exit before the reactor starts: twistd would
    # otherwise print its whole usage text (UsageError) or a traceback.
    sys.stderr.write(f"mdmd: {error}\n")
    sys.stderr.flush()
    raise SystemExit(status)


class Options(usage.Options):
    synopsis = "[--config /etc/mdmd/mdmd.ini]"
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "Path of the INI configuration file."],
    ]

    config: MdmdConfig

    def postOptions(self) -> None:
        try:
            self.config = load_config(self["config"])
        except ConfigError as e:
            _fail(e)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from mdmd.material import prepare
    from mdmd.service import build_service
    from mdmd.store.service import DatabaseUnavailable

    try:
        material = prepare(options.config)
        return build_service(options.config, material, reactor)
    except ConfigError as e:
        _fail(e)
    except DatabaseUnavailable as e:
        _fail(e, EXIT_UNAVAILABLE)
