"""The web console on the admin listener (``/ui/``): server-rendered pages
over the same store calls and admin functions as the JSON API, behind a
session that a named admin token opens.  See :mod:`mdmd.console.pages`."""

from mdmd.console.pages import console_routes

__all__ = ["console_routes"]
