"""``twistd mdmd``: options and service maker (see twisted/plugins/mdmd_plugin.py)."""

from __future__ import annotations

import sys
from typing import NoReturn

from twisted.application.service import IService
from twisted.python import usage

from mdmd.config import ConfigError, MdmdConfig, load_config

__all__ = ["Options", "makeService"]

DEFAULT_CONFIG = "/etc/mdmd/mdmd.ini"


def _fail(error: ConfigError) -> NoReturn:
    # One line and a non-zero exit before the reactor starts: twistd would
    # otherwise print its whole usage text (UsageError) or a traceback.
    sys.stderr.write(f"mdmd: {error}\n")
    sys.stderr.flush()
    raise SystemExit(78)  # EX_CONFIG: systemd will not spin on a bad config


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

    try:
        material = prepare(options.config)
        return build_service(options.config, material, reactor)
    except ConfigError as e:
        _fail(e)
