"""twistd plugin: ``twistd -n mdmd --config /etc/mdmd/mdmd.ini``."""

from twisted.application.service import ServiceMaker

mdmd = ServiceMaker(
    "mdmd",
    "mdmd.tap",
    "Windows MDM server: enrollment (TLS), management (mutual TLS), admin API",
    "mdmd",
)
