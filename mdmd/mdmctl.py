"""``mdmctl``: the administrator's command line.

``mdmctl init DIR`` creates the key material a production deployment needs
without starting the server.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from mdmd import pki

__all__ = ["main"]


def _init(args: argparse.Namespace) -> int:
    directory = os.path.abspath(args.dir)
    hosts: list[str] = args.host or ["localhost"]
    plan = pki.BootstrapPlan(
        identity_cert=os.path.join(directory, "wstep-identity.pem"),
        identity_key=os.path.join(directory, "wstep-identity.key"),
        tls_cert=None if args.no_tls else os.path.join(directory, "tls-server.pem"),
        tls_key=None if args.no_tls else os.path.join(directory, "tls-server.key"),
        tls_root_cert=os.path.join(directory, "tls-root.pem"),
        tls_root_key=os.path.join(directory, "tls-root.key"),
        tls_hosts=hosts,
        enroll_secret_file=os.path.join(directory, "enroll_secret"),
        admin_token_file=os.path.join(directory, "admin_token"),
    )
    old_umask = os.umask(0o077)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        created = pki.bootstrap(plan, now=datetime.now(UTC))
    except (OSError, pki.BootstrapError) as e:
        print(f"mdmctl init: {e}", file=sys.stderr)
        return 1
    finally:
        os.umask(old_umask)
    for path in created:
        print(f"created {path}")
    if not created:
        print(f"nothing to do: every file already exists in {directory}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdmctl", description="Administer an mdmd server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser(
        "init",
        help="create key material and secrets in DIR (never overwrites)",
        description=(
            "Create the WSTEP identity CA, a server TLS certificate signed by a local "
            "root (unless --no-tls), the enroll secret and the admin token in DIR. "
            "Existing files are kept as they are."
        ),
    )
    init.add_argument("dir", metavar="DIR", help="the state directory ([mdmd] state_dir)")
    init.add_argument(
        "--host",
        action="append",
        metavar="NAME",
        help="host name or IP for the server TLS certificate (repeatable; default localhost)",
    )
    init.add_argument(
        "--no-tls",
        action="store_true",
        help="do not create a server TLS certificate (you bring a public one)",
    )
    init.set_defaults(run=_init)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
