"""mdmd: a Windows MDM server (MS-MDE2 enrollment, OMA-DM management) on Twisted."""

#: The release; setup.cfg reads it from here.  ``twistd mdmd`` logs it at
#: start-up and ``GET /api/v1/version`` answers it.
__version__ = "0.1.0"
