"""The web console on the admin listener (``/ui/``): server-rendered pages
over the same store calls and admin functions as the JSON API, behind a
session that a named admin token opens (:mod:`mdmd.console.pages`,
:mod:`mdmd.console.session`, :mod:`mdmd.console.charts`)."""
